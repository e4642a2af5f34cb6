"""From scores to an allocation: what trains, per unit, and the sparse indices (complete on rank 0).

`allocation.json` holds only what follows from the scores and the settings (no timings, no world size), so
the same scores give byte-identical files on any world size and engine.

The pair is checksummed: allocation.json's `sha256` holds the SHA-256 of allocation.safetensors (its bytes) and
of the record itself (the JSON less `sha256`, compact with sorted keys); `Allocation.load` refuses a pair that
does not match, or one without checksums (an older spt_dist's). What the record says is checked when it is
applied (spt_dist.peft.allocated.check_allocation): it must be the record `spt_record` / `gps_record` give for
its picks, settings and the model's layout, and its sparse units' picks the indices there are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from spt_dist import runfiles
from spt_dist.atomic import file_digest, json_digest, make_dirs, read_safetensors, write_safetensors, write_text

from spt_dist.config import SelectionConfig
from spt_dist.data.shards import read_json
from spt_dist.distributed import gather_to_main
from spt_dist.errors import UserError
from spt_dist.selection.gps_allocation import check_k, select_rows
from spt_dist.selection.layout import Layout, Unit, UnitCosts
from spt_dist.selection.scores import LocalScores
from spt_dist.selection.spt_allocation import ThresholdSearch, split_into_segments, target_cost

CHECKSUMS = "sha256"  # allocation.json's key for the pair's checksums


@dataclass
class Allocation:
    record: dict  # allocation.json
    indices: dict[str, torch.Tensor]  # parameter -> sorted flat indices of its sparse entries (int32)

    @property
    def method(self) -> str:
        return self.record["method"]

    def save(self, directory: str) -> None:
        """allocation.safetensors, then allocation.json with the checksums of both (written last: the pair is
        complete once it is there); each written whole (temporary file, then rename)."""
        make_dirs(directory, "allocation")
        indices = os.path.join(directory, runfiles.ALLOCATION_INDICES)
        write_safetensors(indices, self.indices, {"method": self.method})
        record = {k: v for k, v in self.record.items() if k != CHECKSUMS}
        record[CHECKSUMS] = {"record": json_digest(record), runfiles.ALLOCATION_INDICES: file_digest(indices)}
        write_text(os.path.join(directory, runfiles.ALLOCATION_JSON), json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str) -> "Allocation":
        """The pair as saved, or one line: a file missing or unreadable, no checksums (an older spt_dist's), or a
        file that does not match its checksum (damaged or edited). The record comes without its checksums."""
        json_path, indices_path = (os.path.join(directory, name)
                                   for name in (runfiles.ALLOCATION_JSON, runfiles.ALLOCATION_INDICES))
        for path in (json_path, indices_path):
            if not os.path.isfile(path):
                raise UserError(f"allocation: '{path}' does not exist")
        record = read_json(json_path)
        indices = read_safetensors(indices_path, "allocation")
        if not isinstance(record, dict):
            raise UserError(f"allocation: '{json_path}' is not an allocation (a JSON object)")
        sums = record.pop(CHECKSUMS, None)
        if sums is None:
            raise UserError(f"allocation: '{json_path}' has no checksum: written by an older spt_dist")
        if not isinstance(sums, dict) or not all(isinstance(sums.get(k), str)
                                                 for k in ("record", runfiles.ALLOCATION_INDICES)):
            raise UserError(f"allocation: '{json_path}': '{CHECKSUMS}' is not a table of checksums (record, "
                            f"{runfiles.ALLOCATION_INDICES})")
        if json_digest(record) != sums["record"]:
            raise UserError(f"allocation: '{json_path}' does not match its checksum (damaged or edited)")
        try:
            digest = file_digest(indices_path)
        except OSError as e:
            raise UserError(f"allocation: cannot read '{indices_path}' ({e.strerror or e})") from None
        if digest != sums[runfiles.ALLOCATION_INDICES]:
            raise UserError(f"allocation: '{indices_path}' does not match the checksum in "
                            f"{runfiles.ALLOCATION_JSON} (damaged or edited)")
        return cls(record, indices)


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


def spt_record(layout: Layout, settings: dict, picks: list[int], threshold: dict) -> dict:
    """allocation.json of an SPT allocation (SPEC 2): each unit's decision and cost, the totals, τ and the cost
    follow from its picks (per unit, in layout order), the settings and the layout; `threshold` (where the
    scores were cut) is recorded as given. allocate_spt writes it; check_allocation compares a record with it."""
    structured, rank = settings["structured"], settings["module_rank"]
    costs = UnitCosts(layout, structured, rank, settings["alpha"], settings["beta"])
    target = target_cost(settings["budget"], layout)
    counts = torch.tensor(picks, dtype=torch.int64)
    switched, unit_cost = costs.switched(counts).tolist(), costs.per_unit(counts).tolist()
    cost = int(costs.total(counts))

    units = []
    for i, u in enumerate(layout.units):
        if picks[i] == 0:
            decision = "frozen"
        elif switched[i]:
            decision = structured if u.kind == "matrix" else "full"
        else:
            decision = "sparse"
        entry = {"name": u.name, "tensor": u.tensor, "kind": u.kind, "size": u.size, "picks": picks[i],
                 "decision": decision, "cost": unit_cost[i]}
        entry.update(_rows(u, layout))
        if decision in ("lora", "adapter"):
            entry["rank"] = rank
        units.append(entry)

    by = lambda d: [u for u in units if u["decision"] == d]  # noqa: E731
    return {
        "method": "spt",
        "settings": settings,
        "target": target,
        "cost": cost,
        "cost_minus_target": cost - target,
        "tau": sum(picks),
        "threshold": threshold,
        "scored_params": layout.scored_params,
        "backbone_params": layout.backbone_params,
        "totals": {
            "sparse_entries": sum(u["cost"] for u in by("sparse")),
            "sparse_units": len(by("sparse")),
            "modules": len(by(structured)) if structured != "none" else 0,
            "module_params": sum(u["cost"] for u in by(structured)) if structured != "none" else 0,
            "full_vectors": len(by("full")),
            "full_vector_params": sum(u["cost"] for u in by("full")),
            "cls_token": layout.fixed_full.get("cls_token", 0),
        },
        "units": units,
    }


def allocate_spt(scores: LocalScores, layout: Layout, sel: SelectionConfig) -> Allocation:
    sel = sel.resolved()
    costs = UnitCosts(layout, sel.structured, sel.module_rank, sel.alpha, sel.beta)
    search = ThresholdSearch(split_into_segments(scores, layout), layout, costs)
    cut = search.closest_to(target_cost(sel.budget, layout))
    settings = {"budget": sel.budget, "structured": sel.structured, "module_rank": sel.module_rank,
                "alpha": sel.alpha, "beta": sel.beta}
    record = spt_record(layout, settings, cut.picks.tolist(), {"score": _score_of_key(cut.key), "tie_index": cut.index})

    sparse = {i for i, u in enumerate(record["units"]) if u["decision"] == "sparse"}
    local: dict[str, list[torch.Tensor]] = {}
    for unit, gidx in search.selected(cut, sparse):
        tensor = layout.tensor(layout.units[unit].tensor)
        local.setdefault(tensor.name, []).append(gidx - tensor.offset)
    return Allocation(record, _gather_indices(local, layout))


def gps_record(layout: Layout, k: int) -> dict:
    """allocation.json of a GPS allocation (SPEC 3): everything follows from k and the layout (k picks per output
    row of every scored tensor; Linear/conv biases and layer scales in full). allocate_gps writes it;
    check_allocation compares a record with it."""
    units = [{"name": u.name, "tensor": u.tensor, "kind": u.kind, "size": u.size, "picks": u.rows * k,
              "decision": "sparse", "cost": u.rows * k} for u in layout.units]
    for entry, u in zip(units, layout.units):
        entry.update(_rows(u, layout))
    # What GPS trains in full whatever the scores (SPEC 3): Linear/conv biases and layer scales.
    units += [{"name": name, "tensor": name, "kind": "vector", "size": numel, "decision": "full", "cost": numel}
              for name, numel in layout.fixed_full.items()]
    sparse = sum(u["cost"] for u in units if u["decision"] == "sparse")
    return {
        "method": "gps",
        "settings": {"k": k},
        "cost": sparse + layout.fixed_full_params,
        "scored_params": layout.scored_params,
        "backbone_params": layout.backbone_params,
        "totals": {"sparse_entries": sparse, "sparse_units": len(layout.units),
                   "full_vectors": len(layout.fixed_full), "full_vector_params": layout.fixed_full_params},
        "units": units,
    }


def allocate_gps(scores: LocalScores, layout: Layout, sel: SelectionConfig) -> Allocation:
    rows = select_rows(scores, layout, sel.k)
    indices = {name: idx.to(_index_dtype(layout)) for name, idx in rows.items()}
    return Allocation(gps_record(layout, sel.k), indices)


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
