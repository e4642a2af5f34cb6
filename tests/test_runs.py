"""End-to-end runs of launch/train.py: methods x engines x launchers, outputs, and one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from spt_dist.models import create_model
from tests.conftest import TRAIN, check, run_job, tiny_overrides

RUNS = {
    # name: (launcher, overrides)
    "deepspeed-zero2-full": ("deepspeed", ["engine.kind=deepspeed", "engine.zero_stage=2", "method.name=full"]),
    "deepspeed-zero3-lora-bf16": ("torchrun", ["engine.kind=deepspeed", "engine.zero_stage=3", "method.name=lora",
                                               "engine.precision=bf16", "optim.lr=3e-3"]),
    "fsdp-linear": ("torchrun", ["engine.kind=fsdp", "method.name=linear", "optim.lr=3e-3", "data.workers=2",
                                 "optim.grad_accum=2"]),
    "fsdp-lora-bf16": ("torchrun", ["engine.kind=fsdp", "method.name=lora", "engine.precision=bf16", "optim.lr=3e-3"]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_method_trains_and_writes_its_run_directory(name, synthetic_shards, tmp_path):
    launcher, overrides = RUNS[name]
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, name),
            "optim.max_steps=null", "optim.epochs=4", "optim.warmup_epochs=0.5", *overrides]
    result = check(run_job(args, nproc=2, launcher=launcher, timeout=300))
    run_dir = tmp_path / name
    assert f"run directory: {run_dir}" in result.stdout and "tensorboard --logdir" in result.stdout
    port = next(a.split("=")[1] for a in result.args if a.startswith("--master_port="))
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's left none

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_samples"] == 128 and metrics["world_size"] == 2
    assert metrics["top1"] > 50.0, metrics  # 4 classes: chance is 25 %
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["name"] in name
    assert list((run_dir / "checkpoints").glob("step_*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    for tag in ("train/loss", "train/lr", "eval/top1", "perf/images_per_s", "perf/peak_memory_gib"):
        assert tag in events.Tags()["scalars"], tag

    # What the method freezes is bit-unchanged; what it trains moved.
    weights = load_file(str(run_dir / "model.safetensors"))
    torch.manual_seed(0)
    initial = create_model("vit_test_tiny_patch8_32", 4).state_dict()
    bf16 = "engine.precision=bf16" in overrides and "engine.kind=deepspeed" in overrides
    for key, value in weights.items():
        if "lora_" in key or key.startswith("head.") or "method.name=full" in overrides:
            assert not torch.equal(value, initial.get(key, torch.zeros_like(value))), f"{key} did not train"
        else:
            # DeepSpeed's bf16 keeps the module (frozen weights too) in bf16; FSDP2 keeps fp32 parameters.
            expected = initial[key].bfloat16().float() if bf16 else initial[key]
            assert torch.equal(value, expected), f"frozen {key} changed"


@pytest.mark.parametrize("override, message", [
    ("data.shuffle_bufer=3", "spt_dist: error: data.shuffle_bufer: unknown key"),
    ("optim.epochs=ten", "spt_dist: error: optim.epochs: expected an integer"),
    ("data.train_shards=/nowhere/train-{0..3}.tar", "spt_dist: error: data.train_shards:"),
    ("model.name=vit_unknown_patch3", "spt_dist: error: model.name: unknown model 'vit_unknown_patch3'"),
])
def test_bad_config_exits_with_one_line(override, message, synthetic_shards, tmp_path):
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "bad"), override]
    result = run_job(args, launcher="python", timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_config_under_two_ranks_fails_fast(synthetic_shards, tmp_path):
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "bad"),
            "model.name=vit_unknown_patch3"]
    result = run_job(args, nproc=2, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("spt_dist: error: model.name: unknown model") == 1  # said once, by rank 0


def test_nonfinite_loss_stops_every_rank_before_saving(synthetic_shards, tmp_path):
    """A learning rate of 1e8 makes the loss NaN from step 2: both ranks stop there with one error line, the
    step-1 checkpoint stays the last one, and no final weights are written."""
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "nan"),
            "optim.lr=1e8", "optim.max_steps=6", "output.checkpoint_every=1", "engine.zero_stage=2"]
    result = run_job(args, nproc=2, timeout=240)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("spt_dist: error:")]
    assert len(errors) == 1 and "the loss became non-finite at step 2" in errors[0], result.stderr[-3000:]
    assert "stopped before its update, nothing saved" in errors[0]
    assert "step_00000001" in errors[0]
    run_dir = tmp_path / "nan"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "metrics.json").exists()


def test_nonfinite_loss_skip_mode_leaves_steps_out_then_gives_up(synthetic_shards, tmp_path):
    """optim.nonfinite=skip: the NaN steps are left out (said per step); as the weights stay broken, the 10th
    skipped step in a row stops the run with one line, the last good checkpoint kept."""
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "skip"),
            "optim.lr=1e8", "optim.max_steps=14", "output.checkpoint_every=1", "engine.zero_stage=2",
            "optim.nonfinite=skip"]
    result = run_job(args, nproc=2, timeout=240)
    assert result.returncode != 0
    assert result.stdout.count("the update is skipped") == 10, result.stdout[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("spt_dist: error:")]
    assert len(errors) == 1 and "non-finite in 10 steps in a row (up to step 11)" in errors[0], result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "skip" / "checkpoints").iterdir())[-1] == "step_00000010"


def test_a_second_job_on_a_busy_run_directory_is_refused(synthetic_shards, tmp_path):
    """A job holds the run directory (here this test process, as a running training job would): a second job
    there (`--stage select` beside it, or the same output.name) stops with one line naming the holder, and
    writes nothing into the directory."""
    import os
    import socket

    from spt_dist.rundir import lock_run_dir
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the running job's config\n")
    lock_run_dir(str(run_dir))
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "busy"),
            "--stage", "select", "method.name=spt_lora"]
    result = run_job(args, launcher="python", timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"spt_dist: error: output.name: the run directory {run_dir} is in use by another job (host "
        f"{socket.gethostname()}, pid {os.getpid()}, since {(run_dir / '.lock').read_text().split(', since ')[1].strip()}"
        "); wait for it to end, stop it, or choose another output.name"], result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"]
    assert (run_dir / "config.yaml").read_text() == "the running job's config\n"


def test_a_new_run_where_one_has_trained_is_refused_or_overwritten(synthetic_shards, tmp_path):
    """Without --resume, training into a directory that holds a training run would mix old checkpoints and
    event files with new ones: one line; output.overwrite=true removes them (the selection stays)."""
    from spt_dist.rundir import _clear_for_new_training
    run_dir = tmp_path / "used"
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "allocation.json").write_text("{}")
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "used")]
    result = run_job(args, launcher="python", timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"spt_dist: error: output.name: {run_dir} already holds a training run (checkpoints, metrics.json); continue "
        "it with --resume latest, start it over with output.overwrite=true, or choose another output.name"]
    assert (run_dir / "metrics.json").exists() and not (run_dir / "config.yaml").exists()  # nothing touched

    _clear_for_new_training(str(run_dir), overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "allocation.json"]


def test_a_user_error_on_rank_0_alone_is_one_line_under_the_deepspeed_launcher(synthetic_shards, tmp_path,
                                                                                 monkeypatch):
    """Under the deepspeed launcher rank 0 hosts the job's store: after its own error it keeps the store up until
    the other ranks, whose collectives then fail, have read why; they exit quietly. One line in all."""
    monkeypatch.setenv("FAIL_RANK", "0")
    args = ["tests/workers/fail_on_rank.py", "--config", "tests/configs/tiny.yaml",
            *tiny_overrides(synthetic_shards, tmp_path, "full-disk"), "method.name=lora", "optim.max_steps=4",
            "output.checkpoint_every=2"]
    result = run_job(args, nproc=2, launcher="deepspeed", timeout=240)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "spt_dist: error" in line]
    assert result.returncode != 0 and len(errors) == 1 and "no space left on the device (injected on rank 0)" \
        in errors[0], output[-4000:]
    assert "Traceback" not in output
