"""Runs survive preemption and crashes: real 2-rank jobs killed (SIGKILL) or stopped (SIGTERM) mid-run and resumed,
on the same or another world size; a score pass killed and resumed; a data set with every kind of fault.

Exactness: on CPU in fp32 a resumed run equals the uninterrupted one bit for bit (same weights, same samples in
the same order), because a checkpoint holds the full fp32 trainable weights and AdamW state, the schedule, every
rank's RNG states and its data stream's exact position.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spt_dist.checkpoint import Checkpoint
from spt_dist.config import load_config
from spt_dist.models import create_model
from spt_dist.peft.allocated import apply_allocation, read_allocation
from tests.conftest import REPO, TRAIN, check, free_port, kill_tree, run_job, tiny_overrides
from tests.reference import dataset_classes, train_reference

# LoRA with dropout (the RNG must come back) and random augmentation (so must each sample's), data read in a
# DataLoader worker (its position must come back), 10 steps, a checkpoint after each, 2 kept.
RECIPE = ["method.name=lora", "method.lora_dropout=0.1", "method.module_drop_path=0.1", "data.augment=true", "data.workers=1",
          "optim.max_steps=10", "optim.warmup_epochs=0.1", "output.checkpoint_every=1", "output.keep_last=2",
          "output.log_samples=true", "engine.zero_stage=2"]


def start_job(args: list[str], nproc: int, launcher: str = "torchrun") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    module, nprocs = ("deepspeed.launcher.runner", "--num_gpus") if launcher == "deepspeed" else \
        ("torch.distributed.run", "--nproc_per_node")
    cmd = [sys.executable, "-m", module, f"{nprocs}={nproc}", f"--master_port={free_port()}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc.pid)
            out, err = proc.communicate()
            pytest.fail(f"{path} never appeared (exit {proc.returncode})\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.02)


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(synthetic_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    check(run_job([TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, out, "run"),
                   *RECIPE], nproc=2, timeout=300))
    return out / "run"


def assert_same_run(resumed: Path, whole: Path) -> None:
    expected, got = trained(whole), trained(resumed)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs by {(got[name] - value).abs().max()}"
    for rank in (0, 1):  # the same samples, in the same order, at every step
        lines = (resumed / "samples" / f"rank_{rank:05d}.txt").read_text().splitlines()
        assert lines == (whole / "samples" / f"rank_{rank:05d}.txt").read_text().splitlines()
        assert len(lines) == 10


def test_run_killed_at_a_random_step_resumes_to_the_same_weights_and_samples(uninterrupted, synthetic_shards,
                                                                              tmp_path):
    kill_after = random.randint(2, 7)
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "run"), *RECIPE]
    proc = start_job(args, nproc=2)
    run_dir = tmp_path / "run"
    wait_for(run_dir / "checkpoints" / f"step_{kill_after:08d}", proc, timeout=240)
    kill_tree(proc.pid)  # launcher and both ranks, wherever they are (maybe mid-save)
    proc.communicate()
    assert not (run_dir / "metrics.json").exists(), f"the run ended before the kill after step {kill_after}"
    steps = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    # keep_last=2; a kill just after step kill_after's checkpoint is in place may come before rank 0 prunes the
    # oldest (a prune is one rename, so never half-way)
    assert kill_after in steps and len(steps) <= 3, steps
    # A checkpoint a crash left half-written is skipped: without state.json it is not complete.
    (run_dir / "checkpoints" / "step_00000009").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "step_00000009" / "trainable.safetensors").write_bytes(b"half")

    result = check(run_job([*args, "--resume", "latest"], nproc=2, timeout=300))
    assert f"resumed from {run_dir}/checkpoints/step_{steps[-1]:08d}" in result.stdout, f"killed after {kill_after}"
    assert "data, RNG and state exactly" in result.stdout
    assert_same_run(run_dir, uninterrupted)
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from_step"] == steps[-1]


def wait_for_step(samples: Path, after: int, proc: subprocess.Popen) -> None:
    """Until the run has logged a step past `after` (its samples file has a line for it)."""
    wait_for(samples, proc, timeout=240)
    deadline = time.monotonic() + 120
    while len(samples.read_text().splitlines()) <= after:
        assert proc.poll() is None and time.monotonic() < deadline, "the run took no step"
        time.sleep(0.02)


def ended(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Output of a job whose launcher may be gone: its pipes close once the last rank (and worker) has exited."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"the ranks did not stop\n{out[-2000:]}\n{err[-3000:]}")


def test_sigterm_saves_a_checkpoint_and_the_resume_continues_from_it(uninterrupted, synthetic_shards, tmp_path):
    """DeepSpeed's launcher, as a scheduler meets it: the `deepspeed` command itself terminated (it does not pass
    the signal on: its launch process lives on, orphaned), then the launch process terminated (it signals every
    process of each rank's tree one by one, DataLoader workers included). Each ends in a clean checkpoint, and the
    run resumed from the last one equals the uninterrupted run."""
    import psutil
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "run"),
            *RECIPE, "output.checkpoint_every=0"]  # no periodic checkpoints: the ones found are the signals'
    run_dir, samples = tmp_path / "run", tmp_path / "run" / "samples" / "rank_00000.txt"
    proc = start_job(args, nproc=2, launcher="deepspeed")
    wait_for_step(samples, 0, proc)
    proc.send_signal(signal.SIGTERM)  # the `deepspeed` command: it dies and its launch process is orphaned
    out, err = ended(proc)
    assert "stopped by the exit of its launcher" in out, err[-3000:]
    assert "Traceback" not in err and not (run_dir / "metrics.json").exists()
    [saved] = list((run_dir / "checkpoints").glob("step_*"))
    first = Checkpoint.read(str(saved))
    assert 1 <= first.step < 9 and first.trainable() and first.optimizer()  # loadable
    assert sorted(p.suffix for p in saved.iterdir()) == [".json"] + [".safetensors"] * 4  # nothing pickled

    proc = start_job([*args, "--resume", "latest"], nproc=2, launcher="deepspeed")
    wait_for_step(samples, first.step, proc)
    [launch] = psutil.Process(proc.pid).children()  # DeepSpeed's launch process, parent of the ranks
    launch.send_signal(signal.SIGTERM)  # it terminates each rank's process tree, workers first
    out, err = ended(proc)
    assert "stopped by SIGTERM at step" in out, err[-3000:]
    assert f"resume: run the same command again with --resume {run_dir}" in out
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not (run_dir / "metrics.json").exists()
    steps = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps[0] == first.step and first.step < steps[-1] <= 10 and not list(run_dir.glob("checkpoints/.partial*"))
    checkpoint = Checkpoint.read(str(run_dir / "checkpoints" / f"step_{steps[-1]:08d}"))
    saved = Path(checkpoint.directory)

    # A key that decides the frozen weights must not change: one line, nothing trained.
    refused = run_job([*args, "seed=1", "--resume", str(run_dir)], nproc=2, timeout=300)
    assert refused.returncode != 0 and f"spt_dist: error: seed: the checkpoint {saved} was written with 0, " \
        "this run has 1" in refused.stderr

    result = check(run_job([*args, "--resume", str(run_dir)], nproc=2, timeout=300))
    assert f"resumed from {saved} (step {checkpoint.step})" in result.stdout
    assert_same_run(run_dir, uninterrupted)


def test_stop_signal_during_evaluation_saves_at_once_and_the_resume_evaluates_first(synthetic_shards, tmp_path):
    """A stop signal while the run evaluates (here a long evaluation: 640 images one by one per rank) is obeyed
    inside the evaluation: the checkpoint is of the step just trained, no further step is taken, and the resumed
    run does the evaluation it owes before training on."""
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "run"),
            f"data.train_shards={synthetic_shards}/train-{{000000..000001}}.tar",  # 128 images: 8 steps an epoch
            f"data.eval_shards={synthetic_shards}/*.tar", "data.eval_batch_size=1", "method.name=lora",
            "optim.max_steps=16", "output.log_samples=true"]
    run_dir, samples = tmp_path / "run", tmp_path / "run" / "samples" / "rank_00000.txt"
    proc = start_job(args, nproc=2)
    wait_for_step(samples, 7, proc)  # step 8 ends the first epoch: its evaluation begins
    proc.send_signal(signal.SIGTERM)
    out, err = ended(proc)
    assert "stopped by SIGTERM at step 8:" in out, out[-2000:] + err[-3000:]
    assert "step 8: top1" not in out and not (run_dir / "metrics.json").exists()
    checkpoint = Checkpoint.read(str(run_dir / "checkpoints" / "step_00000008"))
    assert checkpoint.state["eval_pending"]

    result = check(run_job([*args, "--resume", "latest"], nproc=2, timeout=300))
    assert "epoch 1/2 step 8: top1" in result.stdout and "epoch 2/2 step 16: top1" in result.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 16


def test_damaged_checkpoints(uninterrupted, synthetic_shards, tmp_path):
    """A flipped byte in the newest checkpoint: the resume skips it with a warning naming the file, continues
    from the one before, and still ends with the uninterrupted run's weights and samples. A damaged file that
    only rank 1 reads, in a record stripped of its checksums: skipped the same way."""
    def copy(name):
        shutil.copytree(uninterrupted, tmp_path / name)
        return tmp_path / name, [TRAIN, "--config", "tests/configs/tiny.yaml",
                                 *tiny_overrides(synthetic_shards, tmp_path, name), *RECIPE, "--resume", "latest"]

    run_dir, args = copy("flipped")
    newest = run_dir / "checkpoints" / "step_00000010"
    with open(newest / "trainable.safetensors", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    result = check(run_job(args, nproc=2, timeout=300))
    assert f"skipped the damaged checkpoint {newest}: trainable.safetensors does not match its checksum" \
        in result.stdout
    assert f"resumed from {run_dir}/checkpoints/step_00000009 (step 9)" in result.stdout
    assert_same_run(run_dir, uninterrupted)

    run_dir, args = copy("no-checksums")  # a record stripped of its checksums vouches for nothing: skipped too
    newest = run_dir / "checkpoints" / "step_00000010"
    state = json.loads((newest / "state.json").read_text())
    del state["files"], state["record_sha256"]
    (newest / "state.json").write_text(json.dumps(state))
    (newest / "rank_00001.safetensors").write_bytes(b"damaged")
    result = check(run_job(args, nproc=2, timeout=300))
    assert f"skipped the damaged checkpoint {newest}: state.json has no 'record_sha256'" in result.stdout
    assert f"resumed from {run_dir}/checkpoints/step_00000009 (step 9)" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("before,after", [
    ((2, 1, "zero3"), (1, 2, "fsdp2")),  # (ranks, grad_accum, engine): the global batch stays 16
    ((1, 2, "fsdp2"), (2, 1, "zero2")),
], ids=["2to1", "1to2"])
def test_resume_on_another_world_size_keeps_allocation_and_state(before, after, synthetic_shards, tmp_path):
    """SPT-LoRA (sparse deltas, LoRA, full vectors) trained 4 steps, then resumed on another world size and
    engine for 4 more: the allocation is the checkpoint's, and the result equals plain PyTorch continuing
    from that checkpoint's weights, AdamW state and schedule on the new world size, bit for bit."""
    from spt_dist.engines import VARIANTS

    def args(ranks, accum, engine, steps, name="run"):
        return [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, name),
                "method.name=spt_lora", "selection.budget=3000", "optim.weight_decay=0.05",
                "optim.warmup_epochs=0.05", f"optim.max_steps={steps}", f"optim.grad_accum={accum}",
                "output.checkpoint_every=4", *VARIANTS[engine]]

    ranks, accum, engine = before
    check(run_job(args(ranks, accum, engine, 4), nproc=ranks, timeout=300))
    run_dir = tmp_path / "run"
    allocation = (run_dir / "allocation.safetensors").read_bytes()
    # The run directory's own selection is removed: a resume must train the checkpoint's allocation, never
    # select again (which would write allocation.json anew).
    shutil.rmtree(run_dir / "scores")
    (run_dir / "allocation.json").unlink()
    checkpoint = Checkpoint.read(str(run_dir / "checkpoints" / "step_00000004"))
    assert checkpoint.state["world_size"] == ranks and (Path(checkpoint.directory) / "allocation.json").exists()

    ranks, accum, engine = after
    if ranks == 2:  # the checkpoint trains a budget-3000 allocation: a config that says 6000 is refused
        refused = run_job([*args(ranks, accum, engine, 8), "selection.budget=6000", "--resume", "latest"],
                          nproc=ranks, timeout=300)
        assert refused.returncode != 0 and "spt_dist: error: selection.budget: the checkpoint " \
            f"{checkpoint.directory} was written with 3000.0, this run has 6000.0" in refused.stderr, refused.stderr
    result = check(run_job([*args(ranks, accum, engine, 8), "--resume", "latest"], nproc=ranks, timeout=300))
    assert f"(step 4, {before[0]} -> {ranks} ranks)" in result.stdout
    assert not (run_dir / "allocation.json").exists()
    assert (run_dir / "checkpoints" / "step_00000008" / "allocation.safetensors").read_bytes() == allocation

    cfg = load_config(str(REPO / "tests/configs/tiny.yaml"),
                      [a for a in args(ranks, accum, engine, 8)[3:] if not a.startswith("engine.")])
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, dataset_classes(cfg))
    record, indices = read_allocation(checkpoint.directory)
    apply_allocation(model, record, indices)
    train_reference(cfg, model, ranks, resume_from=checkpoint)
    got = load_file(str(run_dir / "peft" / "peft_model.safetensors"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(got[name], p.detach()), f"{name} differs by {(got[name] - p).abs().max()}"


def test_score_pass_killed_and_resumed_gives_the_same_scores(synthetic_shards, tmp_path):
    def args(name):
        return [TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "score",
                *tiny_overrides(synthetic_shards, tmp_path, name), "selection.batches=8", "selection.batch_size=16",
                "selection.checkpoint_every=1", "engine.zero_stage=3"]

    check(run_job(args("whole"), nproc=2, timeout=240))
    proc = start_job(args("killed"), nproc=2)
    partial = tmp_path / "killed" / "scores" / "partial"
    wait_for(partial, proc, timeout=240)
    kill_tree(proc.pid)
    proc.communicate()
    assert not (tmp_path / "killed" / "scores" / "scores.json").exists(), "the pass ended before the kill"

    # Partial scores of another pass (here other transforms: another crop) are not continued.
    shutil.copytree(tmp_path / "killed", tmp_path / "other")
    other = check(run_job([*args("other"), "data.crop_pct=0.875", "--resume", "latest"], nproc=2, timeout=240))
    assert "the partial scores are of another pass" in other.stdout and "continuing" not in other.stdout

    result = check(run_job([*args("killed"), "--resume", "latest"], nproc=2, timeout=240))
    assert "score pass: continuing from the partial scores after batch" in result.stdout
    assert not partial.exists()
    for rank in (0, 1):
        name = f"rank-{rank:05d}-of-00002.safetensors"
        whole, resumed = (load_file(str(tmp_path / run / "scores" / name)) for run in ("whole", "killed"))
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


# --------------------------------------------------------------------------- bad data


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_every_kind_of_data_fault_is_skipped_counted_and_reported(synthetic_shards, tmp_path):
    """Corrupt JPEGs, missing and non-integer labels, a label out of range, a truncated and a garbage tar: the
    2-rank run trains to its end and reports each distinct fault once (though read in several epochs)."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_shards, data)
    with tarfile.open(data / "train-000000.tar") as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    jpeg = next(d for n, d in members if n.endswith((".jpg", ".png")))
    write_tar(data / "train-faulty.tar", [
        ("truncjpeg.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 40), ("truncjpeg.cls", b"1"),  # a JPEG cut short
        ("garbage.jpg", b"not an image at all"), ("garbage.cls", b"2"),
        ("nolabel.jpg", jpeg),
        ("notint.jpg", jpeg), ("notint.cls", b"three"),
        ("range.jpg", jpeg), ("range.cls", b"9"),
        *[(f"ok{i}.{ext}", d) for i in range(4) for ext, d in (("jpg", jpeg), ("cls", b"0"))]])
    shutil.copy(data / "train-000001.tar", data / "train-truncated.tar")
    size = (data / "train-truncated.tar").stat().st_size
    with open(data / "train-truncated.tar", "r+b") as f:
        f.truncate(size // 2 + 100)
    (data / "train-garbage.tar").write_bytes(b"\x00garbage" * 500)
    with tarfile.open(data / "test-000000.tar") as t:
        test_members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    broken = next(n for n, _ in test_members if n.endswith((".jpg", ".png")))
    write_tar(data / "test-000000.tar", [(n, b"broken" if n == broken else d) for n, d in test_members])

    args = [TRAIN, "--config", "tests/configs/tiny.yaml", f"data.train_shards={data}/train-*.tar",
            f"data.eval_shards={data}/test-*.tar", "data.train_samples=512", f"output.dir={tmp_path}",
            "output.name=faults", "optim.max_steps=80", "engine.zero_stage=2"]  # 2.5 epochs: each fault is read
    result = check(run_job(args, nproc=2, timeout=300))
    expected = {"bad_image": 3, "bad_label": 2, "label_out_of_range": 1, "bad_tar": 2}
    metrics = json.loads((tmp_path / "faults" / "metrics.json").read_text())
    assert metrics["skipped_samples"] == expected and metrics["steps"] == 80
    assert metrics["eval_samples"] == 127  # one test image broken
    assert "skipped samples {'bad_image': 3, 'bad_label': 2, 'label_out_of_range': 1, 'bad_tar': 2}" in result.stdout
    assert "skipping bad_tar" in result.stderr  # the first of each kind are named in the log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "faults" / "tb")).Reload()
    for kind, count in expected.items():
        assert events.Scalars(f"data/skipped_{kind}")[-1].value == count
