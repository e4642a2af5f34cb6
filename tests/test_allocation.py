"""The distributed allocations against brute force: every τ's cost computed from one sorted list.

The scores are synthetic with many exact ties (also at the threshold), split over 1 or 2 real ranks at
arbitrary offsets (through rows and units), and the allocation must equal the brute-force answer exactly:
the τ, its cost, the picks per unit and every selected index.
"""

from __future__ import annotations

import json

import pytest
import torch

from spt_dist.config import SelectionConfig
from spt_dist.models import create_model
from spt_dist.selection.layout import UnitCosts, build_layout, module_cost
from spt_dist.selection.spt_allocation import target_cost
from spt_dist.errors import UserError
from tests.conftest import check, run_job
from tests.workers.allocate_synthetic import BUDGETS, synthetic_scores

LAYOUT_MODEL = ("vit_test_tiny_patch8_32", 10)


def full_scores(layout) -> torch.Tensor:
    return torch.cat([synthetic_scores(t.numel, 7 + t.offset) for t in layout.tensors])


def brute_force_spt(layout, sel: SelectionConfig) -> dict:
    scores = full_scores(layout)
    order = torch.sort(-scores, stable=True).indices.tolist()  # score descending, index ascending
    unit_of = torch.empty(layout.scored_params, dtype=torch.int64)
    for start, stop, unit in layout.unit_spans():
        unit_of[start:stop] = unit
    unit_of = unit_of.tolist()
    full, factor = [], []
    for u in layout.units:
        if u.kind == "matrix" and sel.structured != "none":
            full.append(module_cost(u, sel.structured, sel.module_rank))
            factor.append(sel.alpha)
        elif u.kind == "vector":
            full.append(u.size)
            factor.append(sel.beta)
        else:
            full.append(None)
            factor.append(None)

    def unit_cost(i: int, n: int) -> int:
        return full[i] if full[i] is not None and n > 0 and n * factor[i] >= full[i] else n

    picks = [0] * len(layout.units)
    cost = layout.fixed_full_params
    costs = [cost]
    for e in order:
        u = unit_of[e]
        before = unit_cost(u, picks[u])
        picks[u] += 1
        cost += unit_cost(u, picks[u]) - before
        costs.append(cost)
    target = target_cost(sel.budget, layout)
    best = min(range(len(costs)), key=lambda t: (abs(costs[t] - target), -t))  # ties -> larger τ
    chosen = [0] * len(layout.units)
    for e in order[:best]:
        chosen[unit_of[e]] += 1
    sparse_units = {i for i, n in enumerate(chosen) if n and unit_cost(i, n) == n and not (
        full[i] is not None and n * factor[i] >= full[i])}
    indices: dict[str, list[int]] = {}
    for e in sorted(order[:best]):
        if unit_of[e] in sparse_units:
            t = layout.tensor(layout.units[unit_of[e]].tensor)
            indices.setdefault(t.name, []).append(e - t.offset)
    return {"tau": best, "cost": costs[best], "picks": chosen, "indices": indices}


def brute_force_gps(layout, k: int) -> dict[str, list[int]]:
    out = {}
    scores = full_scores(layout)
    for t in layout.tensors:
        rows = scores[t.offset : t.offset + t.numel].view(t.shape[0], -1)
        order = torch.sort(-rows, dim=1, stable=True).indices[:, :k]
        flat = (order + torch.arange(rows.shape[0])[:, None] * rows.shape[1]).view(-1)
        out[t.name] = sorted(flat.tolist())
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def distributed_results(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("alloc") / "results.json"
    check(run_job(["tests/workers/allocate_synthetic.py", str(out)], nproc=request.param, timeout=180))
    return json.loads(out.read_text())


def test_spt_cut_is_the_brute_force_optimum(distributed_results):
    model = create_model(*LAYOUT_MODEL, device="meta")
    layout = build_layout(model, "spt")
    runs = [dict(budget=b) for b in BUDGETS] + [dict(budget=3000, structured="adapter"),
                                                 dict(budget=3000, structured="none")]
    structured_seen = set()
    for settings in runs:
        key = "spt-" + "-".join(f"{k}={v}" for k, v in settings.items())
        assert distributed_results[key + "-other-paths"] == distributed_results[key], key  # tie bisection etc.
        got = distributed_results[key]
        sel = SelectionConfig(method="spt", **settings).resolved()
        want = brute_force_spt(layout, sel)
        record = got["record"]
        assert record["tau"] == want["tau"], key
        assert record["cost"] == want["cost"], key
        assert [u["picks"] for u in record["units"]] == want["picks"], key
        assert got["indices"] == want["indices"], key
        assert sum(u["cost"] for u in record["units"]) + layout.fixed_full_params == record["cost"]
        structured_seen |= {u["decision"] for u in record["units"]}
    assert {"lora", "adapter", "sparse", "full"} <= structured_seen, "the budgets must exercise every decision"


def test_gps_rows_are_the_brute_force_top_k(distributed_results):
    layout = build_layout(create_model(*LAYOUT_MODEL, device="meta"), "gps")
    for k in (1, 3):
        got = distributed_results[f"gps-k={k}"]
        assert got["indices"] == brute_force_gps(layout, k)
        assert got["record"]["totals"]["sparse_entries"] == sum(t.shape[0] * k for t in layout.tensors)


def test_costs_are_monotone_and_follow_the_rules():
    layout = build_layout(create_model(*LAYOUT_MODEL, device="meta"), "spt")
    costs = UnitCosts(layout, "lora", 8, 10.0, 5.0)
    q = next(i for i, u in enumerate(layout.units) if u.name == "blocks.0.attn.q")
    bias = next(i for i, u in enumerate(layout.units) if u.name == "blocks.0.mlp.fc1.bias")
    picks = torch.zeros(len(layout.units), dtype=torch.int64)
    lora = 8 * (64 + 64)
    for n, want in [(0, 0), (1, 1), (102, 102), (103, lora), (4096, lora)]:  # switches at n >= 1024 / 10
        picks[q] = n
        assert int(costs.per_unit(picks)[q]) == want
    picks[q] = 0
    for n, want in [(1, 1), (25, 25), (26, 128), (128, 128)]:  # a 128-long vector goes full at n >= 25.6
        picks[bias] = n
        assert int(costs.per_unit(picks)[bias]) == want


def test_vit_huge_plan_on_meta():
    """Planning a ViT-H/14 (632M parameters, 630M scored) needs no memory: layout and costs on the meta device."""
    model = create_model("vit_huge_patch14_224", 100, device="meta")
    layout = build_layout(model, "spt")
    d, hidden = 1280, 5120
    per_block = 3 * d * d + 3 * d + d * d + d + 2 * d * hidden + hidden + d + 4 * d
    assert layout.scored_params == 32 * per_block + 2 * d == 629_680_640  # the blocks and the final norm
    assert len([u for u in layout.units if u.kind == "matrix"]) == 32 * 6
    q = next(u for u in layout.units if u.name == "blocks.31.attn.v")
    assert (q.rows, q.cols) == (1280, 1280) and module_cost(q, "lora", 8) == 20_480
    fc1 = next(u for u in layout.units if u.name == "blocks.0.mlp.fc1")
    assert module_cost(fc1, "adapter", 8) == 2 * 8 * 5120 + 8 + 5120
    assert target_cost(0.01, layout) == round(0.01 * layout.backbone_params)
    with pytest.raises(UserError, match="selection.budget"):
        target_cost(layout.scored_params + 1, layout)
    gps = build_layout(model, "gps")
    assert gps.tensors[0].name == "patch_embed.proj.weight" and gps.tensors[0].row_length == 3 * 14 * 14
