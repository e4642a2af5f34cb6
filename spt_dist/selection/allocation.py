"""From scores to an allocation: what trains, per unit, and the sparse indices (complete on rank 0).

`allocation.json` holds only what follows from the scores and the settings (no timings, no world size), so
the same scores give byte-identical files on any world size and engine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from spt_dist import runfiles
from spt_dist.atomic import read_safetensors, write_safetensors, write_text

from spt_dist.config import SelectionConfig
from spt_dist.data.shards import read_json
from spt_dist.distributed import gather_to_main
from spt_dist.errors import UserError
from spt_dist.selection.gps_allocation import check_k, select_rows
from spt_dist.selection.layout import Layout, Unit, UnitCosts
from spt_dist.selection.scores import LocalScores
from spt_dist.selection.spt_allocation import ThresholdSearch, split_into_segments, target_cost




@dataclass
class Allocation:
    record: dict  # allocation.json
    indices: dict[str, torch.Tensor]  # parameter -> sorted flat indices of its sparse entries (int32)

    @property
    def method(self) -> str:
        return self.record["method"]

    def save(self, directory: str) -> None:
        """allocation.json and allocation.safetensors, each written whole (temporary file, then rename)."""
        os.makedirs(directory, exist_ok=True)
        write_text(os.path.join(directory, runfiles.ALLOCATION_JSON), json.dumps(self.record, indent=1) + "\n")
        write_safetensors(os.path.join(directory, runfiles.ALLOCATION_INDICES), self.indices, {"method": self.method})

    @classmethod
    def load(cls, directory: str) -> "Allocation":
        for name in (runfiles.ALLOCATION_JSON, runfiles.ALLOCATION_INDICES):
            if not os.path.isfile(os.path.join(directory, name)):
                raise UserError(f"allocation: '{os.path.join(directory, name)}' does not exist")
        return cls(read_json(os.path.join(directory, runfiles.ALLOCATION_JSON)),
                   read_safetensors(os.path.join(directory, runfiles.ALLOCATION_INDICES), "allocation"))


def _score_of_key(key: int) -> float | None:
    return None if key < 0 else torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


def _index_dtype(layout: Layout) -> torch.dtype:
    return torch.int32 if max(t.numel for t in layout.tensors) < 2**31 else torch.int64


def _rows(u: Unit, layout: Layout) -> dict:
    """A matrix unit's output rows (a q, k or v block of the fused qkv, or the whole Linear), and those of a
    vector that is part of its tensor (a fused bias's q, k or v): what training applies the decision to."""
    if u.kind == "matrix":
        return {"rows": [u.start // u.cols, u.stop // u.cols]}
    if u.size != layout.tensor(u.tensor).numel:
        return {"rows": [u.start, u.stop]}
    return {}


def _gather_indices(local: dict[str, list[torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """Rank 0 gets every rank's selected flat indices per tensor (budget-sized, not model-sized)."""
    mine = {name: torch.cat(parts) for name, parts in local.items() if parts}
    everyone = gather_to_main(mine)
    if everyone is None:
        return {}
    out, dtype = {}, _index_dtype(layout)  # once: it looks at every tensor
    for t in layout.tensors:
        parts = [part[t.name] for part in everyone if t.name in part]
        if parts:
            out[t.name] = torch.sort(torch.cat(parts)).values.to(dtype)
    return out


def allocate_spt(scores: LocalScores, layout: Layout, sel: SelectionConfig) -> Allocation:
    sel = sel.resolved()
    costs = UnitCosts(layout, sel.structured, sel.module_rank, sel.alpha, sel.beta)
    target = target_cost(sel.budget, layout)
    search = ThresholdSearch(split_into_segments(scores, layout), layout, costs)
    cut = search.closest_to(target)
    switched = costs.switched(cut.picks).tolist()
    unit_cost = costs.per_unit(cut.picks).tolist()
    picks = cut.picks.tolist()

    units, sparse = [], set()
    for i, u in enumerate(layout.units):
        if picks[i] == 0:
            decision = "frozen"
        elif switched[i]:
            decision = sel.structured if u.kind == "matrix" else "full"
        else:
            decision = "sparse"
            sparse.add(i)
        entry = {"name": u.name, "tensor": u.tensor, "kind": u.kind, "size": u.size, "picks": picks[i],
                 "decision": decision, "cost": unit_cost[i]}
        entry.update(_rows(u, layout))
        if decision in ("lora", "adapter"):
            entry["rank"] = sel.module_rank
        units.append(entry)

    local: dict[str, list[torch.Tensor]] = {}
    for unit, gidx in search.selected(cut, sparse):
        tensor = layout.tensor(layout.units[unit].tensor)
        local.setdefault(tensor.name, []).append(gidx - tensor.offset)
    indices = _gather_indices(local, layout)

    by = lambda d: [u for u in units if u["decision"] == d]  # noqa: E731
    record = {
        "method": "spt",
        "settings": {"budget": sel.budget, "structured": sel.structured, "module_rank": sel.module_rank,
                     "alpha": sel.alpha, "beta": sel.beta},
        "target": target,
        "cost": cut.cost,
        "cost_minus_target": cut.cost - target,
        "tau": cut.tau,
        "threshold": {"score": _score_of_key(cut.key), "tie_index": cut.index},
        "scored_params": layout.scored_params,
        "backbone_params": layout.backbone_params,
        "totals": {
            "sparse_entries": sum(u["cost"] for u in by("sparse")),
            "sparse_units": len(by("sparse")),
            "modules": len(by(sel.structured)) if sel.structured != "none" else 0,
            "module_params": sum(u["cost"] for u in by(sel.structured)) if sel.structured != "none" else 0,
            "full_vectors": len(by("full")),
            "full_vector_params": sum(u["cost"] for u in by("full")),
            "cls_token": layout.fixed_full.get("cls_token", 0),
        },
        "units": units,
    }
    return Allocation(record, indices)


def allocate_gps(scores: LocalScores, layout: Layout, sel: SelectionConfig) -> Allocation:
    rows = select_rows(scores, layout, sel.k)
    indices = {name: idx.to(_index_dtype(layout)) for name, idx in rows.items()}
    units = [{"name": u.name, "tensor": u.tensor, "kind": u.kind, "size": u.size, "picks": u.rows * sel.k,
              "decision": "sparse", "cost": u.rows * sel.k} for u in layout.units]
    for entry, u in zip(units, layout.units):
        entry.update(_rows(u, layout))
    # What GPS trains in full whatever the scores (SPEC 3): Linear/conv biases and layer scales.
    units += [{"name": name, "tensor": name, "kind": "vector", "size": numel, "decision": "full", "cost": numel}
              for name, numel in layout.fixed_full.items()]
    sparse = sum(u["cost"] for u in units if u["decision"] == "sparse")
    record = {
        "method": "gps",
        "settings": {"k": sel.k},
        "cost": sparse + layout.fixed_full_params,
        "scored_params": layout.scored_params,
        "backbone_params": layout.backbone_params,
        "totals": {"sparse_entries": sparse, "sparse_units": len(layout.units),
                   "full_vectors": len(layout.fixed_full), "full_vector_params": layout.fixed_full_params},
        "units": units,
    }
    return Allocation(record, indices)


def check_selection(layout: Layout, sel: SelectionConfig) -> None:
    """The settings' mistakes that need no scores (a budget beyond the scored parameters, a k wider than a row),
    found before a score pass is spent on them (the layout of a meta-device model is enough)."""
    sel = sel.resolved()
    if sel.method == "spt":
        target_cost(sel.budget, layout)
    else:
        check_k(layout, sel.k)


def allocate(scores: LocalScores, layout: Layout, sel: SelectionConfig) -> Allocation:
    return allocate_gps(scores, layout, sel) if sel.method == "gps" else allocate_spt(scores, layout, sel)
