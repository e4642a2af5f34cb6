"""Scaling studies: a sweep run here over a small grid (real torchrun jobs on CPU), the report built from those
run directories, the Slurm submission plan of a sweep, FLOPs and memory planning of the big ViTs on meta."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from spt_dist.config import load_config
from spt_dist.data.benchmarks import FGVC, VTAB, VTAB_GROUPS
from spt_dist.errors import UserError
from spt_dist.report import papers_table, pending_runs, summarize
from spt_dist.sweep import load_sweep, sbatch_command

from .conftest import REPO

TINY, SMALL = "vit_test_tiny_patch8_32", "vit_test_small_patch8_32"


def _sweep_file(tmp_path: Path, shards: Path, grid) -> Path:
    spec = {"name": "study", "config": [str(REPO / "tests/configs/tiny.yaml")],
            "overrides": {"data.train_shards": f"{shards}/train-{{000000..000007}}.tar",
                          "data.eval_shards": f"{shards}/test-{{000000..000001}}.tar", "optim.max_steps": 4},
            "grid": grid}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch/sweep.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


GRID = [
    {"model.name": [TINY, SMALL], "method.name": ["lora"], "data.task": ["vtab/cifar100"], "world_size": [2],
     "data.global_batch_size": [32]},
    {"model.name": [TINY], "method.name": ["spt_lora"], "selection.budget": [0.05], "seed": [0, 1],
     "data.task": ["vtab/eurosat"], "world_size": [1]},
]


def test_local_sweep_and_report(tmp_path, synthetic_shards):
    sweep_file = _sweep_file(tmp_path, synthetic_shards, GRID)
    runs = tmp_path / "runs"
    result = _sweep([str(sweep_file), "--output-dir", str(runs)], timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    study = runs / "study"
    run_dirs = sorted(d for d in study.iterdir() if (d / "config.yaml").exists())
    assert len(run_dirs) == 4 and len(json.loads((study / "sweep.json").read_text())["runs"]) == 4
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in run_dirs}
    assert sorted(m["world_size"] for m in metrics.values()) == [1, 1, 2, 2]
    for m in metrics.values():  # the global batch of 32 on 2 ranks: 16 per rank, as the run resolved it
        assert m["batch_size_per_rank"] == (16 if m["world_size"] == 2 else 8)
    for m in metrics.values():  # the throughput figures are consistent with each other
        assert m["images_per_s_per_device"] == pytest.approx(m["images_per_s"] / m["world_size"])
        assert m["tflops_per_device"] == pytest.approx(m["images_per_s_per_device"] * m["train_flops_per_image"] / 1e12)
        assert 0 <= m["data_wait_share"] < 1 and m["mfu"] is None  # no peak FLOP/s known for a CPU

    again = _sweep([str(sweep_file), "--output-dir", str(runs)], timeout=300)  # finished runs are not run again
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4
    edited = yaml.safe_load(sweep_file.read_text())
    edited["overrides"]["optim.max_steps"] = 5  # an edited sweep must not pass off old results as its own
    sweep_file.write_text(yaml.safe_dump(edited))
    refused = _sweep([str(sweep_file), "--output-dir", str(runs)], timeout=300)
    assert refused.returncode == 2 and "optim.max_steps is 5 in the sweep but 4" in refused.stderr

    out = tmp_path / "report"
    report = subprocess.run([sys.executable, "-m", "spt_dist.report", str(study), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    with open(out / "runs.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(metrics)
    for name, row in rows.items():
        m = metrics[name]
        assert float(row["top1"]) == m["top1"] and int(row["trainable_params"]) == m["trainable_params"]
        assert float(row["images_per_s"]) == m["images_per_s"] and float(row["peak_memory_gib"]) == m["peak_memory_gib"]
        assert row["status"] == "finished"
        if row["method"] == "spt_lora":  # selected in the run: its score-pass and allocation times
            selection = json.loads((study / name / "selection-select.json").read_text())
            assert float(row["score_pass_s"]) == selection["score_pass_s"] and float(row["allocation_s"]) > 0
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 3  # the two seeds of the SPT budget are one configuration
    for entry in (e for e in summary if e["method"] == "spt_lora"):
        seeds = [m["top1"] for n, m in metrics.items() if rows[n]["budget"] == entry["budget"] and rows[n]["method"] == "spt_lora"]
        assert entry["seeds"] == "2" and float(entry["top1"]) == pytest.approx(statistics.fmean(seeds))
    results = (out / "results.md").read_text()
    assert "VTAB-1k" in results and "| CIFAR-100 |" in results and "Natural mean" in results
    for png in ("accuracy_vs_budget.png", "scaling.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width > 300


def test_sweep_mistakes_stop_before_anything_runs(tmp_path, synthetic_shards):
    bad = _sweep_file(tmp_path, synthetic_shards, {"method.name": ["lora", "nope"]})
    result = _sweep([str(bad), "--output-dir", str(tmp_path / "runs")], timeout=60)
    assert result.returncode == 2 and not (tmp_path / "runs").exists()
    assert result.stderr.count("\n") == 1 and "grid point 1 (method.name=nope): method.name: unknown method 'nope'" in result.stderr


def test_slurm_submission_plan(tmp_path, synthetic_shards):
    sweep = load_sweep(str(_sweep_file(tmp_path, synthetic_shards, {"world_size": [4, 8, 16]})), str(tmp_path))
    nodes = []
    for run in sweep.runs:
        command = sbatch_command(run, sweep, gpus_per_node=8, extra=["--partition=gpu"])
        assert command[0] == "sbatch" and command[-2:] == [f"output.dir={sweep.directory}", f"output.name={run.name}"]
        assert "--partition=gpu" in command and command[command.index("--resume") + 1] == "latest"
        nodes.append([a for a in command if a.startswith(("--nodes=", "--ntasks-per-node="))])
    assert nodes == [["--nodes=1", "--ntasks-per-node=4"], ["--nodes=1", "--ntasks-per-node=8"],
                     ["--nodes=2", "--ntasks-per-node=8"]]
    odd = load_sweep(str(_sweep_file(tmp_path, synthetic_shards, {"world_size": [12]})), str(tmp_path))
    with pytest.raises(UserError, match="world_size 12 .* not a multiple of --gpus-per-node 8"):
        sbatch_command(odd.runs[0], odd, gpus_per_node=8, extra=[])
    cpu = sbatch_command(sweep.runs[0], sweep, gpus_per_node=2, extra=[], cpu=True)  # CPU nodes: 2 ranks each
    assert {"--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0"} <= set(cpu)


def test_papers_table_group_means():
    """VTAB: group means and the mean of the three group means; FGVC: the plain mean; seeds averaged first."""
    summary = []
    expected = {}
    for i, task in enumerate(VTAB):
        expected[task.name] = 50.0 + i
        summary.append(dict(task=f"vtab/{task.name}", backbone="B", method="spt_lora", budget="0.01",
                            world_size=8, engine="e", seeds=1, top1=50.0 + i))
    for i, task in enumerate(FGVC):
        summary.append(dict(task=f"fgvc/{task.name}", backbone="B", method="gps", budget="k=1", world_size=8,
                            engine="e", seeds=1, top1=80.0 + i))
    table = papers_table(summary)
    vtab_row = next(line for line in table.splitlines() if "| spt_lora |" in line).split(" | ")
    group_means = [statistics.fmean(expected[t.name] for t in VTAB if t.group == g) for g in VTAB_GROUPS]
    assert vtab_row[-4:-1] == [f"{m:.1f}" for m in group_means]
    assert vtab_row[-1].rstrip(" |") == f"{statistics.fmean(group_means):.1f}"
    fgvc_row = next(line for line in table.splitlines() if "| gps |" in line)
    assert fgvc_row.rstrip(" |").endswith(f"{statistics.fmean(80.0 + i for i in range(5)):.1f}")
    partial = papers_table(summary[:3])  # three natural tasks only: marked as partial
    assert "*" in next(line for line in partial.splitlines() if "| spt_lora |" in line)


def test_report_lists_runs_not_started(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": [{"name": "000-a", "world_size": 16}]}))
    assert pending_runs([str(tmp_path)]) == [{"run": "000-a", "world_size": 16, "status": "pending"}]


def test_benchmark_task_names():
    assert load_config(None, ["data.task=VTAB/cifar100"]).data.train_shards == "data/benchmarks/vtab/cifar100/train-*.tar"
    for typo in ("vtab/cifar-100", "cifar-100"):  # no silent fallback to the demo's data
        with pytest.raises(UserError, match="data.task"):
            load_config(None, [f"data.task={typo}"])
    assert load_config(None, ["data.task=my-set", "data.train_shards=a.tar", "data.eval_shards=b.tar"]).data.task == "my-set"


def test_summary_averages_seeds():
    rows = [dict(task=None, backbone="B", method="lora", budget="r=8", world_size=2, engine="e", status="finished",
                 settings="same", seed=seed, top1=t, trainable_pct=1.0, backbone_params=10,
                 images_per_s_per_device=5.0, mfu=None, peak_memory_gib=1.0, score_pass_s=None, allocation_s=None)
            for seed, t in ((0, 70.0), (1, 74.0))]
    rows.append(dict(rows[0], status="stopped", top1=None))
    rows.append(dict(rows[0], settings="another lr", top1=10.0))  # not the same configuration
    first, second = sorted(summarize(rows), key=lambda e: e["top1"], reverse=True)
    assert first["seeds"] == 2 and first["top1"] == 72.0 and first["top1_std"] == pytest.approx(2 ** 1.5)
    assert second["seeds"] == 1 and second["top1"] == 10.0


# ------------------------------------------------------------------------------------------ configs and planning


BACKBONES = sorted((REPO / "configs/backbones").glob("*.yaml"))
METHODS = sorted((REPO / "configs/methods").glob("*.yaml"))


@pytest.mark.parametrize("recipe", ["vtab", "fgvc"])
def test_every_backbone_method_recipe_config_loads(recipe):
    assert len(BACKBONES) == 7 and len(METHODS) == 6
    for backbone in BACKBONES:
        for method in METHODS:
            cfg = load_config([str(REPO / f"configs/recipes/{recipe}.yaml"), str(backbone), str(method)],
                              ["data.task=" + ("vtab/patch_camelyon" if recipe == "vtab" else "fgvc/nabirds")])
            assert cfg.data.train_shards.endswith(f"{recipe}/{'patch_camelyon' if recipe == 'vtab' else 'nabirds'}/train-*.tar")
            assert cfg.method.name == method.stem and cfg.data.global_batch_size == 64
            if cfg.method.name == "gps":  # the task's K from the GPS paper
                assert cfg.selection.k == (2 if recipe == "vtab" else 20)
    for sweep in sorted((REPO / "sweeps").glob("*.yaml")):  # every grid point of the shipped sweeps is valid
        assert load_sweep(str(sweep), "/tmp").runs


def _vit_forward_flops(depth: int, dim: int, hidden: int, patch: int, img: int, classes: int) -> int:
    """A ViT's forward FLOPs by hand (2 per multiply-add): patch embedding, per block qkv, QK^T, AV, proj,
    fc1, fc2, and the head on the class token."""
    n = (img // patch) ** 2 + 1
    block = 2 * n * dim * 3 * dim + 2 * 2 * n * n * dim + 2 * n * dim * dim + 2 * 2 * n * dim * hidden
    return 2 * (n - 1) * dim * 3 * patch * patch + depth * block + 2 * dim * classes


@pytest.mark.parametrize("name, depth, dim, hidden, patch", [("vit_base_patch16_224", 12, 768, 3072, 16),
                                                             ("vit_large_patch16_224", 24, 1024, 4096, 16),
                                                             ("vit_huge_patch14_224", 32, 1280, 5120, 14),
                                                             ("vit_giant_patch14_224", 40, 1408, 6144, 14)])
def test_flops_per_image_on_meta(name, depth, dim, hidden, patch):
    from spt_dist.flops import count_flops
    flops = count_flops(name, 100, "full")
    assert flops.forward == _vit_forward_flops(depth, dim, hidden, patch, 224, 100)
    assert 2.9 < flops.train / flops.forward < 3.01  # backward: gradients of activations and of every weight
    frozen = count_flops(name, 100, "spt_lora")
    assert 1.9 < frozen.train / frozen.forward < 2.05  # backward for activations only


def test_vit_huge_memory_plan():
    """Memory per rank of ViT-H/14 SPT-LoRA under ZeRO-3 bf16 on 16 ranks, against the arithmetic by hand."""
    from spt_dist.plan import GIB, make_plan
    cfg = load_config([str(REPO / "configs/backbones/vit_h14.yaml"), str(REPO / "configs/methods/spt_lora.yaml")],
                      ["selection.budget=0.01"])
    plan = make_plan(cfg, world_size=16, num_classes=100)
    d = 1280
    backbone = 630_764_800
    total = backbone + d * 100 + 100
    trainable = round(0.01 * backbone) + d * 100 + 100
    assert (plan.total_params, plan.backbone_params, plan.trainable_params) == (total, backbone, trainable)
    assert plan.scored_params == 629_680_640
    assert plan.weights_gib * GIB == pytest.approx(2 * total / 16)  # bf16, sharded by ZeRO-3
    # fp32 gradients + AdamW moments + fp32 masters, all sharded
    assert plan.trainable_state_gib * GIB == pytest.approx((4 + 8 + 4) * trainable / 16)
    # fp32 weights and gradients of the scored tensors, sharded, plus an fp32 score per local entry
    assert plan.score_pass_gib * GIB == pytest.approx((4 * total + 4 * plan.scored_params + 4 * plan.scored_params) / 16)
    zero2 = make_plan(load_config([str(REPO / "configs/backbones/vit_h14.yaml")], ["engine.zero_stage=2", "method.name=full"]), 16, 100)
    assert zero2.weights_gib * GIB == pytest.approx(2 * total)  # ZeRO-2 keeps every weight on every rank
