"""Score pass + allocation through real jobs: the same bytes on 1 and 2 ranks and on every engine, and the
scores equal plain autograd in one process.

The calibration batches are 3 global batches of 16, cut into micro-batches of 8: one rank accumulates two,
two ranks take one each. Halving is exact in fp32 and a two-term sum commutes, so the reduced gradients are
bit-identical on every world size and engine, and so are the scores and the allocations.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from spt_dist.config import load_config
from spt_dist.data.dataset import resolve_dataset
from spt_dist.data.transforms import build_contrastive_transform, build_transforms
from spt_dist.engines import VARIANTS
from spt_dist.selection.calibration import CalibrationBatches
from spt_dist.selection.layout import build_layout
from spt_dist.selection.scoring import build_score_model
from tests.conftest import REPO, TRAIN, check, run_job, tiny_overrides

CALIBRATION = ["selection.batch_size=16", "selection.micro_batch_size=8", "selection.batches=3"]
SETTINGS = {"spt": ["selection.method=spt", "selection.budget=3000"],
            "gps": ["selection.method=gps", "selection.loss=ce", "selection.k=2"]}
# (name, ranks, engine overrides): 1 rank is the reference layout; 2 ranks on every engine.
SPT_JOBS = [("1rank", 1, VARIANTS["zero0"])] + [(v, 2, VARIANTS[v]) for v in ("zero0", "zero2", "zero3", "fsdp2")]
GPS_JOBS = [("1rank", 1, VARIANTS["zero0"])] + [(v, 2, VARIANTS[v]) for v in ("zero2", "zero3", "fsdp2")]


def select(shards, out, name, method, ranks, engine, extra=()):
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "select", *tiny_overrides(shards, out, name),
            *CALIBRATION, *SETTINGS[method], *engine, *extra]
    return check(run_job(args, nproc=ranks, timeout=240))


@pytest.fixture(scope="module")
def runs(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("select")
    for method, jobs in (("spt", SPT_JOBS), ("gps", GPS_JOBS)):
        for name, ranks, engine in jobs:
            result = select(synthetic_shards, out, f"{method}-{name}", method, ranks, engine)
            assert "allocation:" in result.stdout
    return out


def read_scores(run_dir) -> dict[str, torch.Tensor]:
    """The full score tensors, assembled from every rank's file."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path in sorted((run_dir / "scores").glob("rank-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name, _, start = key.rpartition("@")
                pieces.setdefault(name, []).append((int(start), f.get_tensor(key)))
    return {name: torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])]) for name, parts in pieces.items()}


def reference_scores(shards, method: str) -> dict[str, torch.Tensor]:
    """Plain autograd, one process: per global batch g = (g_micro0 + g_micro1) / 2, then s += g² or s += g."""
    cfg = load_config(str(REPO / "tests/configs/tiny.yaml"),
                      tiny_overrides(shards, "/unused", "ref") + CALIBRATION + SETTINGS[method])
    data = resolve_dataset(cfg.data)
    model = build_score_model(cfg, data.num_classes)
    layout = build_layout(model, method)
    named = dict(model.named_parameters())
    params = [named[t.name] for t in layout.tensors]
    sel = cfg.selection  # GPS: shuffled, with augmented views seeded per sample; SPT: in order, plain
    transform = build_contrastive_transform(model) if sel.augmented else build_transforms(model, cfg.data)[1]
    batches = CalibrationBatches(data.train_shards, rank=0, world=1, batch_size=16, micro_batch_size=8, batches=3,
                                 transform=transform, views=1, augment_seed=cfg.seed if sel.augmented else None,
                                 shuffle_seed=cfg.seed if sel.shuffled else None,
                                 shuffle_buffer=cfg.data.shuffle_buffer, num_classes=data.num_classes)
    scores = [torch.zeros_like(p).view(-1) for p in params]
    for micro in batches:
        grads = [torch.autograd.grad(F.cross_entropy(model(b["images"]), b["labels"]), params) for b in micro]
        for s, g0, g1 in zip(scores, *grads):
            g = ((g0 + g1) / 2).view(-1)
            s.addcmul_(g, g) if method == "spt" else s.add_(g)
    return {t.name: s.abs() if method == "gps" else s for t, s in zip(layout.tensors, scores)}


@pytest.mark.parametrize("method", ["spt", "gps"])
def test_allocation_files_identical_on_every_world_size_and_engine(runs, method):
    jobs = SPT_JOBS if method == "spt" else GPS_JOBS
    first = runs / f"{method}-{jobs[0][0]}"
    record = json.loads((first / "allocation.json").read_text())
    assert record["method"] == method and record["cost"] > 0
    if method == "spt":
        assert record["cost"] == record["target"] + record["cost_minus_target"]
    for name, _, _ in jobs[1:]:
        for file in ("allocation.json", "allocation.safetensors"):
            assert (runs / f"{method}-{name}" / file).read_bytes() == (first / file).read_bytes(), f"{name}: {file}"


@pytest.mark.parametrize("method", ["spt", "gps"])
def test_scores_equal_plain_autograd(runs, synthetic_shards, method):
    want = reference_scores(synthetic_shards, method)
    assert sum(v.numel() for v in want.values()) > 60_000
    jobs = SPT_JOBS if method == "spt" else GPS_JOBS
    for name, _, _ in jobs:
        got = read_scores(runs / f"{method}-{name}")
        assert got.keys() == want.keys()
        for tensor, value in want.items():
            assert torch.equal(got[tensor], value), f"{method}-{name}: {tensor}"
        assert all(bool((v > 0).any()) for v in got.values())


def test_reallocate_from_saved_scores_on_another_world_size(runs, synthetic_shards):
    """2-rank ZeRO-3 scores, allocated again by 1 rank with another budget = the 1-rank run's re-allocation."""
    budget = ["selection.method=spt", "selection.budget=0.02"]
    for name, ranks in (("spt-zero3", 1), ("spt-1rank", 2)):
        args = [TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "allocate",
                *tiny_overrides(synthetic_shards, runs, name), *budget]
        check(run_job(args, nproc=ranks, timeout=180))
    a, b = runs / "spt-zero3", runs / "spt-1rank"
    assert (a / "allocation.json").read_bytes() == (b / "allocation.json").read_bytes()
    record = json.loads((a / "allocation.json").read_text())
    assert record["target"] == round(0.02 * record["backbone_params"])
    assert (a / "allocation.png").stat().st_size > 1000
    assert (a / "config-select.yaml").exists() and (a / "config-allocate.yaml").exists()
    assert list((a / "tb").glob("events.*"))


def test_contrastive_scores_close_across_world_sizes(synthetic_shards, tmp_path):
    """GPS's supervised contrastive score on 1 and 2 ranks (features gathered into the global batch).

    The features of 16 images come from one batch of 16 or two of 8, whose matmuls may round differently,
    so this is a tolerance comparison: relative 1e-4 of each tensor's largest score.
    """
    extra = ["selection.method=gps", "selection.loss=supcon", "selection.k=2", "selection.micro_batch_size=null"]
    for name, ranks, engine in (("one", 1, VARIANTS["zero0"]), ("two", 2, VARIANTS["zero2"])):
        args = [TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "select",
                *tiny_overrides(synthetic_shards, tmp_path, name), *CALIBRATION, *extra, *engine]
        check(run_job(args, nproc=ranks, timeout=240))
    one, two = read_scores(tmp_path / "one"), read_scores(tmp_path / "two")
    for tensor in one:
        scale = one[tensor].abs().max()
        assert scale > 0
        assert torch.allclose(one[tensor], two[tensor], rtol=0, atol=1e-4 * float(scale)), tensor


@pytest.mark.parametrize("overrides,message", [
    (["selection.budget=10000000"], "selection.budget: 10,000,000 parameters is more than the"),
    (["selection.method=gps", "selection.loss=ce", "selection.k=100"], "selection.k: 100 is wider than the rows"),
    (["selection.budget=0"], "selection.budget: must be > 0"),
])
def test_bad_selection_settings_fail_with_one_line(overrides, message, synthetic_shards, tmp_path):
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "select",
            *tiny_overrides(synthetic_shards, tmp_path, "bad"), *CALIBRATION, *overrides]
    result = run_job(args, nproc=1, launcher="python", timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("spt_dist: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "score pass" not in result.stdout  # found before the pass, from the model's shapes alone


def test_allocate_without_scores_says_what_to_run(synthetic_shards, tmp_path):
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "allocate",
            *tiny_overrides(synthetic_shards, tmp_path, "empty")]
    result = run_job(args, nproc=1, launcher="python", timeout=300)
    assert result.returncode == 2 and "run `--stage score` first" in result.stderr
