"""What spt_dist needs to know about a timm model family, in one place per family (a `BackboneSpec`).

A spec says which Linears are weight matrices and their row blocks (a fused qkv is three matrices q, k, v),
which parameters SPT scores and which GPS freezes besides the norms, the block modules (FSDP2 wrap units and
the heat map's rows), the classifier and the class token, and how timm converts a checkpoint into its keys.
The layout (selection/layout.py), LoRA placement (peft/lora.py), FSDP wrapping and the model factory ask the
spec of the model they hold; the heat map's columns and rows (selection/report.py) come from all the specs
(all_matrix_types, block_pattern), and config.MATRIX_TYPES, the names method.lora_targets knows, is tested
equal to all_matrix_types(). Adding a family is one spec file registered here, plus its tests.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from spt_dist.errors import UserError


@dataclass(frozen=True)
class BackboneSpec:
    family: str  # e.g. 'vit'
    names: tuple[str, ...]  # timm model names of the family (fnmatch patterns), e.g. ('vit_*', 'deit_*')
    model_class: type  # timm's class (subclasses match too unless listed in `refused`)
    block: str  # regex of a block module's path, e.g. r'blocks\.\d+' (FSDP2 wrap units, heat-map rows)
    # Linears whose weights are matrices: regex of the module path (full match), then the Linear's leaf name ->
    # its row blocks' matrix types (one type: the whole Linear; several: equal row blocks, in order).
    matrix_scope: str
    matrices: Mapping[str, tuple[str, ...]]
    # Not scored by SPT (regexes matched at the start of the parameter name): head, tokens, embeddings.
    spt_excluded: tuple[str, ...]
    # Frozen by GPS besides every norm (regexes matched at the start of the parameter name): tokens and position
    # tables. SPEC 3 names pos_embed and cls_token; the others are their kin in other families.
    gps_frozen: tuple[str, ...]
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None  # timm's key conversion for the family
    # Per-module refinements of `matrices` (path, module, parent module) -> row-block types or None.
    matrix_override: Callable[[str, nn.Module, nn.Module], tuple[str, ...] | None] | None = None
    prepare: Callable[[nn.Module], None] | None = None  # run once on a freshly created model
    refused: Mapping[type, str] = field(default_factory=dict)  # subclasses not supported -> why

    # ---------------------------------------------------------------------------------------------- naming

    def accepts_name(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)

    def accepts_model(self, model: nn.Module) -> bool:
        return self.refusal(model) is None

    def refusal(self, model: nn.Module) -> str | None:
        """Why this family does not take `model` (None: it does): the one place the refused classes are read."""
        if not isinstance(model, self.model_class):
            return f"not a plain {self.model_class.__name__}"
        return self.refused.get(type(model))

    # ---------------------------------------------------------------------------------------------- structure

    def block_paths(self, model: nn.Module) -> list[str]:
        """The block modules' paths in module order: one FSDP2 unit and one heat-map row each."""
        pattern = re.compile(self.block)
        return [path for path, _ in model.named_modules() if pattern.fullmatch(path)]

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(path) for path in self.block_paths(model)]

    def block_index(self, model: nn.Module) -> Callable[[str], int | None]:
        """name -> index of the block it lives in (0, 1, ... in module order), None outside the blocks."""
        index = {path: i for i, path in enumerate(self.block_paths(model))}
        pattern = re.compile(f"({self.block})\\.")

        def of(name: str) -> int | None:
            found = pattern.match(name)
            return index.get(found.group(1)) if found else None
        return of

    def matrix_blocks(self, model: nn.Module) -> dict[str, tuple[str, str, tuple[int, int]]]:
        """Every weight matrix -> (Linear's module path, matrix type, row range). A matrix is named
        '<parent>.<type>' ('blocks.3.attn.q' for a row block of 'blocks.3.attn.qkv', and for a separate
        'blocks.3.attn.q_proj'), or the Linear's own path where its type is its name ('blocks.3.mlp.fc1')."""
        scope = re.compile(self.matrix_scope)
        out = {}
        modules = dict(model.named_modules())
        for path, module in modules.items():
            if not isinstance(module, nn.Linear):
                continue
            parent, _, leaf = path.rpartition(".")
            if not scope.fullmatch(parent):
                continue
            kinds = self.matrix_override(path, module, modules[parent]) if self.matrix_override else None
            kinds = kinds or self.matrices.get(leaf)
            if not kinds:
                continue
            d = module.out_features // len(kinds)
            for i, kind in enumerate(kinds):
                name = path if (len(kinds) == 1 and kind == leaf) else f"{parent}.{kind}"
                out[name] = (path, kind, (i * d, (i + 1) * d))
        return out

    def matrix_types(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for kinds in self.matrices.values() for k in kinds))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.prepare is not None:
            self.prepare(model)
        return model

    def spt_scored(self, name: str) -> bool:
        return not any(re.match(p, name) for p in self.spt_excluded)

    def gps_frozen_name(self, name: str) -> bool:
        return any(re.match(p, name) for p in self.gps_frozen)

    def class_token_numel(self, model: nn.Module) -> int:
        token = getattr(model, "cls_token", None)
        return token.numel() if isinstance(token, nn.Parameter) else 0


_SPECS: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    _SPECS[spec.family] = spec
    return spec


def backbones() -> dict[str, BackboneSpec]:
    _load_families()
    return dict(_SPECS)


def all_matrix_types() -> tuple[str, ...]:
    """Every family's matrix types, each family's order kept (a type first met goes right after the one before
    it in its family): q, k, v, proj, fc1, fc1_g, fc1_x, fc2, reduction."""
    out: list[str] = []
    for spec in backbones().values():
        previous = None
        for kind in spec.matrix_types():
            if kind not in out:
                out.insert(out.index(previous) + 1 if previous is not None else len(out), kind)
            previous = kind
    return tuple(out)


def block_pattern() -> str:
    """A regex matching any family's block path (e.g. 'blocks.3', 'layers.2.blocks.5')."""
    return "|".join(f"(?:{block})" for block in dict.fromkeys(spec.block for spec in backbones().values()))


FAMILIES = ("vit", "swin", "eva")  # modules of spt_dist.backbones, each registering its spec


def _load_families() -> None:
    for family in FAMILIES:
        importlib.import_module(f"spt_dist.backbones.{family}")


def spec_for_name(name: str) -> BackboneSpec | None:
    _load_families()
    for spec in _SPECS.values():
        if spec.accepts_name(name):
            return spec
    return None


def spec_for(model: nn.Module) -> BackboneSpec:
    """The spec of a model's family; one line naming the supported families otherwise."""
    _load_families()
    for spec in _SPECS.values():
        if isinstance(model, spec.model_class):
            why = spec.refusal(model)
            if why is not None:
                raise UserError(f"model: {type(model).__name__} is not supported: {why}")
            return spec
    raise UserError(f"model: {type(model).__name__} is not a supported backbone (supported: "
                    + ", ".join(f"{s.model_class.__name__} ({', '.join(s.names)})" for s in _SPECS.values()) + ")")
