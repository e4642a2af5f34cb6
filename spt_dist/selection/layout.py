"""What is scored and what the allocation decides about: scored tensors, their canonical global index, and
decision units (matrices, with a fused qkv split into q/k/v; vectors, the fused qkv bias split the same
way); and what a method trains in full whatever the scores.

The canonical global index of an entry is (scored tensors in `named_parameters` order, concatenated) ×
(row-major flat offset). It is the tie-breaker of equal scores, so it depends only on the model, never on
world size, ZeRO stage or engine. Works on the meta device: planning a ViT-H needs no memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from spt_dist.backbones import spec_for

# What SPT does not score (SPEC 2: the new head and the embeddings) and the learned tokens and position
# embeddings GPS freezes (SPEC 3; the reference names pos_embed and cls_token) are the family's: its
# BackboneSpec (spt_dist/backbones/) says.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


@dataclass(frozen=True)
class ScoredTensor:
    name: str
    shape: tuple[int, ...]
    offset: int  # canonical global index of its first entry

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_length(self) -> int:
        """Entries per output row (conv weights count as [out, in·kh·kw])."""
        return self.numel // self.shape[0] if len(self.shape) >= 2 else self.numel


@dataclass(frozen=True)
class Unit:
    """One thing the allocation decides about: a matrix (or a q/k/v row block of the fused qkv) or a vector."""

    name: str  # e.g. 'blocks.3.attn.q', 'blocks.3.norm1.weight'
    tensor: str  # the parameter it lives in
    start: int  # flat range within the parameter
    stop: int
    kind: str  # 'matrix' | 'vector' | 'other' (other: sparse entries only, never structured)
    rows: int
    cols: int
    matrix_type: str  # q, k, v, proj, fc1, fc2, bias, norm, ... (the heat map's columns)
    block: int | None  # transformer block index, None outside the blocks

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    tensors: list[ScoredTensor]
    units: list[Unit]
    backbone_params: int  # every parameter except the head: what a fractional budget refers to
    # Trained in full whatever the scores, so always in the cost (name -> entries): SPT the cls_token; GPS the
    # biases of Linear/conv layers and layer scales (SPEC 2-3). The head trains too but is never in the cost.
    fixed_full: dict[str, int]

    @property
    def scored_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def fixed_full_params(self) -> int:
        return sum(self.fixed_full.values())

    def tensor(self, name: str) -> ScoredTensor:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, ScoredTensor]:
        return {t.name: t for t in self.tensors}

    def unit_spans(self) -> list[tuple[int, int, int]]:
        """(global start, global stop, unit index) of every unit, in global index order."""
        by_name = self._by_name
        spans = [(by_name[u.tensor].offset + u.start, by_name[u.tensor].offset + u.stop, i)
                 for i, u in enumerate(self.units)]
        return sorted(spans)


def _head_names(model: nn.Module) -> set[str]:
    head = {id(p) for p in model.get_classifier().parameters()}
    return {n for n, p in model.named_parameters() if id(p) in head}


def _norm_names(model: nn.Module) -> set[str]:
    """Parameters of normalisation layers: by type, and by name as the GPS reference tests ('norm' in it)."""
    out = {n for n, _ in model.named_parameters() if "norm" in n}
    for path, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d")):
            out |= {f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)}
    return out


def gps_roles(model: nn.Module) -> dict[str, str]:
    """GPS's rule for every parameter outside the head (SPEC 3), tested in the reference's order: norms (weight
    and bias) and the tokens 'frozen'; then biases and layer scales ('gamma') 'full'; every other weight matrix
    or conv kernel 'rows' (per-row top-K of its scores). The head trains in full."""
    head, norms, spec = _head_names(model), _norm_names(model), spec_for(model)
    roles = {}
    for name, p in model.named_parameters():
        if name in head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name in norms or spec.gps_frozen_name(name):
            roles[name] = "frozen"
        elif "bias" in leaf or "gamma" in leaf:
            roles[name] = "full"
        else:
            roles[name] = "rows" if p.ndim >= 2 else "frozen"
    return roles


def scored_names(model: nn.Module, method: str) -> list[str]:
    """SPT: every parameter of the blocks and the final norm (as the family's spec says). GPS: every weight
    (matrix or conv) but the head."""
    if method == "gps":
        return [name for name, role in gps_roles(model).items() if role == "rows"]
    spec = spec_for(model)
    return [name for name, _ in model.named_parameters() if spec.spt_scored(name)]


def build_layout(model: nn.Module, method: str) -> Layout:
    params = dict(model.named_parameters())
    names = scored_names(model, method)
    tensors, offset = [], 0
    for name in names:
        tensors.append(ScoredTensor(name, tuple(params[name].shape), offset))
        offset += params[name].numel()

    # Matrices: a fused Linear (timm's qkv) becomes one unit per row block (q, k, v); other block Linears one
    # each. The reference builds q, k and v as Linears of their own, so a fused bias is one vector per row
    # block too (SPEC 2): judged, charged and trained alone.
    blocks_of: dict[str, list[tuple[str, str, tuple[int, int]]]] = {}
    spec = spec_for(model)
    block_of = spec.block_index(model)
    for unit_name, (path, kind, rows) in spec.matrix_blocks(model).items():
        blocks_of.setdefault(path, []).append((unit_name, kind, rows))

    units = []
    for t in tensors:
        block = block_of(t.name)
        path, _, leaf = t.name.rpartition(".")
        fused = blocks_of.get(path, [])
        if leaf == "weight" and fused:
            cols = t.shape[1]
            for unit_name, kind, (r0, r1) in fused:
                units.append(Unit(unit_name, t.name, r0 * cols, r1 * cols, "matrix", r1 - r0, cols, kind, block))
        elif leaf == "bias" and len(fused) > 1:
            for unit_name, _, (r0, r1) in fused:
                units.append(Unit(f"{unit_name}.bias", t.name, r0, r1, "vector", 1, r1 - r0, "bias", block))
        elif len(t.shape) == 1:
            kind = "bias" if leaf == "bias" else "norm" if "norm" in t.name else leaf
            units.append(Unit(t.name, t.name, 0, t.numel, "vector", 1, t.numel, kind, block))
        else:
            units.append(Unit(t.name, t.name, 0, t.numel, "other", t.shape[0], t.row_length,
                              t.name.rsplit(".", 2)[-2], block))

    head_params = sum(p.numel() for p in model.get_classifier().parameters())
    backbone = sum(p.numel() for p in model.parameters()) - head_params
    if method == "gps":
        fixed = {n: params[n].numel() for n, role in gps_roles(model).items() if role == "full"}
    else:
        token = spec.class_token_numel(model)
        fixed = {"cls_token": token} if token else {}
    return Layout(tensors, units, backbone, fixed)


def module_cost(unit: Unit, structured: str, rank: int) -> int:
    """Parameters of the module a structured matrix gets (SPEC 2): LoRA r(d_in + d_out); Adapter 2 r d_out + r + d_out."""
    if structured == "lora":
        return rank * (unit.cols + unit.rows)
    if structured == "adapter":
        return 2 * rank * unit.rows + rank + unit.rows
    raise ValueError(structured)


class UnitCosts:
    """Cost of every unit as a function of its pick count, vectorised over units (and over candidate cuts).

    matrix: the module's cost once picks >= cost/alpha, else the picks; vector: its length once picks >=
    length/beta, else the picks; other tensors: the picks. Monotone in the picks, so the total cost is
    monotone in the global threshold.
    """

    def __init__(self, layout: Layout, structured: str, rank: int, alpha: float, beta: float) -> None:
        kinds = [u.kind for u in layout.units]
        full = []
        for u in layout.units:
            if u.kind == "matrix" and structured != "none":
                full.append(module_cost(u, structured, rank))
            elif u.kind == "vector":
                full.append(u.size)
            else:
                full.append(-1)  # never switches to a full/structured cost
        self.full_cost = torch.tensor(full, dtype=torch.float64)
        factor = [alpha if k == "matrix" else beta if k == "vector" else 0.0 for k in kinds]
        self.factor = torch.tensor(factor, dtype=torch.float64)
        self.base = layout.fixed_full_params

    def max_step(self) -> int:
        """The most one more pick can add to the total cost: 1, or a whole unit's full/structured cost when that
        pick switches the unit."""
        return max(1, int(self.full_cost.max())) if self.full_cost.numel() else 1

    def switched(self, picks: torch.Tensor) -> torch.Tensor:
        """Which units take their full/structured cost at these pick counts ([..., units] int64)."""
        n = picks.to(torch.float64)
        return (self.full_cost > 0) & (n > 0) & (n * self.factor >= self.full_cost)

    def per_unit(self, picks: torch.Tensor) -> torch.Tensor:
        return torch.where(self.switched(picks), self.full_cost.to(torch.int64), picks)

    def total(self, picks: torch.Tensor) -> torch.Tensor:
        """Total cost for pick counts [..., units] -> [...] (int64), cls_token included."""
        return self.per_unit(picks).sum(-1) + self.base
