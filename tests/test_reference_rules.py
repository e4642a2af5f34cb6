"""The selection rules of SPEC 2-3 where timm's model differs from the reference models, on hand-made scores.

SPT: the reference builds q, k and v as Linears of their own, so timm's fused `qkv.bias` is three vectors of
C entries, each judged by the β rule (whole when picks >= C/β), charged C and trained alone. GPS: every norm
is frozen, weight and bias; the biases of Linear/conv layers train in full.

The hand-made scores are saved as a score pass would save them, then allocated and trained through real
2-rank jobs (`--stage allocate`, then training from that allocation under FSDP2).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from spt_dist.atomic import write_json, write_safetensors
from spt_dist.engines import VARIANTS
from spt_dist.models import create_model
from spt_dist.selection.layout import UnitCosts, build_layout
from tests.conftest import TRAIN, check, run_job, tiny_overrides

MODEL = "vit_test_tiny_patch8_32"  # dim C = 64: qkv.bias has 3C = 192 entries
C, BETA = 64, 5.0
CLASSES = 4  # the synthetic shards' classes
# Picked entries of the fused qkv biases: (block, q/k/v row block, picks). C/β = 12.8, 3C/β = 38.4.
PICKS = [(0, 0, 5),  # q of block 0: below C/β -> 5 sparse entries
         (0, 2, 20),  # v of block 0: between C/β and 3C/β -> v rows whole, charged C (one fused vector: sparse)
         (1, 1, 40)]  # k of block 1: above 3C/β -> k rows whole, charged C (one fused vector: all 3C)
BUDGET = 64 + 5 + C + C  # cls_token + q's sparse entries + two row blocks: exactly the picked entries' cost


def handmade_scores(layout) -> dict[str, torch.Tensor]:
    """Zero everywhere but the picked bias entries (1.0). Zeros tie and are taken in index order, so the next
    entry after the picks is blocks.0.norm1.weight[0], whose +1 overshoots the budget."""
    scores = {t.name: torch.zeros(t.numel) for t in layout.tensors}
    for block, part, picks in PICKS:
        scores[f"blocks.{block}.attn.qkv.bias"][part * C : part * C + picks] = 1.0
    return scores


def write_score_files(run_dir, scores: dict[str, torch.Tensor]) -> None:
    """As a 2-rank score pass saves them: each rank's shard of every tensor in its own file, then the index."""
    (run_dir / "scores").mkdir(parents=True)
    for rank in range(2):
        pieces = {}
        for name, values in scores.items():
            half = (values.numel() + 1) // 2
            start = rank * half
            pieces[f"{name}@{start}"] = values[start : start + half].clone()
        write_safetensors(str(run_dir / "scores" / f"rank-{rank:05d}-of-00002.safetensors"), pieces,
                          {"method": "spt"})
    write_json(str(run_dir / "scores" / "scores.json"),
               {"method": "spt", "model": MODEL, "num_classes": CLASSES, "world_size": 2})


def test_fused_bias_is_three_vectors_in_the_layout_and_the_costs():
    layout = build_layout(create_model(MODEL, CLASSES, device="meta"), "spt")
    units = {u.name: u for u in layout.units}
    assert "blocks.0.attn.qkv.bias" not in units
    for i, part in enumerate("qkv"):
        u = units[f"blocks.0.attn.{part}.bias"]
        assert (u.tensor, u.kind, u.start, u.stop) == ("blocks.0.attn.qkv.bias", "vector", i * C, (i + 1) * C)
    costs = UnitCosts(layout, "lora", 8, 10.0, BETA)
    v = list(units).index("blocks.0.attn.v.bias")
    picks = torch.zeros(len(layout.units), dtype=torch.int64)
    for n, want in [(1, 1), (12, 12), (13, C), (C, C)]:  # whole at n >= C/β = 12.8, charged C
        picks[v] = n
        assert int(costs.per_unit(picks)[v]) == want


def test_fused_bias_rows_are_judged_charged_and_trained_alone(synthetic_shards, tmp_path):
    layout = build_layout(create_model(MODEL, CLASSES, device="meta"), "spt")
    run = tmp_path / "handmade"
    write_score_files(run, handmade_scores(layout))
    config = ["--config", "tests/configs/tiny.yaml", "method.name=spt_lora"]
    check(run_job([TRAIN, "--stage", "allocate", *config, *tiny_overrides(synthetic_shards, tmp_path, "handmade"),
                   f"selection.budget={BUDGET}"], nproc=2, timeout=180))

    record = json.loads((run / "allocation.json").read_text())
    assert record["cost"] == record["target"] == BUDGET and record["tau"] == sum(p for _, _, p in PICKS)
    chosen = {u["name"]: u for u in record["units"] if u["decision"] != "frozen"}
    assert chosen.keys() == {"blocks.0.attn.q.bias", "blocks.0.attn.v.bias", "blocks.1.attn.k.bias"}
    fields = ("decision", "picks", "cost", "rows")
    assert [chosen["blocks.0.attn.q.bias"][f] for f in fields] == ["sparse", 5, 5, [0, C]]
    assert [chosen["blocks.0.attn.v.bias"][f] for f in fields] == ["full", 20, C, [2 * C, 3 * C]]
    assert [chosen["blocks.1.attn.k.bias"][f] for f in fields] == ["full", 40, C, [C, 2 * C]]
    assert record["totals"]["full_vectors"] == 2 and record["totals"]["full_vector_params"] == 2 * C
    indices = load_file(str(run / "allocation.safetensors"))
    assert {k: v.tolist() for k, v in indices.items()} == {"blocks.0.attn.qkv.bias": [0, 1, 2, 3, 4]}

    # Trained from that allocation (2 ranks, FSDP2): only those rows move; every other entry stays bit-equal.
    check(run_job([TRAIN, *config, *tiny_overrides(synthetic_shards, tmp_path, "trained"), f"method.allocation={run}",
                   *VARIANTS["fsdp2"]], nproc=2, timeout=240))
    torch.manual_seed(0)  # tests/configs/tiny.yaml's seed: the trainer builds the same initial model from it
    initial = create_model(MODEL, CLASSES).state_dict()
    merged = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert merged.keys() == initial.keys()
    trained_rows = {"blocks.0.attn.qkv.bias": {*range(5), *range(2 * C, 3 * C)},
                    "blocks.1.attn.qkv.bias": set(range(C, 2 * C))}
    for key, before in initial.items():
        if key.startswith("head.") or key == "cls_token":
            assert not torch.equal(merged[key], before), f"{key} did not train"
            continue
        moved = set(torch.nonzero(merged[key].reshape(-1) != before.reshape(-1)).view(-1).tolist())
        assert moved <= trained_rows.get(key, set()), f"{key}: entries {sorted(moved)[:10]} moved"
        if key in trained_rows:  # Adam's first steps move every entry with a non-zero gradient
            assert len(moved) > 0.9 * len(trained_rows[key]), (key, len(moved))


def test_gps_layout_scores_weights_and_trains_linear_biases_only():
    """GPS on the tiny ViT: per-row picks in every weight matrix and the patch-embedding conv; in full the
    biases of those layers; norms (weight and bias), pos_embed and cls_token neither."""
    layout = build_layout(create_model(MODEL, CLASSES, device="meta"), "gps")
    layers = ["patch_embed.proj"] + [f"blocks.{b}.{m}" for b in (0, 1)
                                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert [t.name for t in layout.tensors] == [f"{layer}.weight" for layer in layers]
    assert list(layout.fixed_full) == [f"{layer}.bias" for layer in layers]
    assert layout.fixed_full_params == 64 + 2 * (3 * 64 + 64 + 128 + 64)
