"""Shared test helpers: real multi-process launches with hard timeouts, and a small synthetic data set."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
# The longest files first (about 100-400 s each on 2 cores): .ci/run hands whole files to two pytest-xdist
# workers in collection order (--dist loadfile --no-loadscope-reorder), so none of them starts last.
LONGEST_FIRST = ("test_slurm_cluster.py", "test_resume.py", "test_runs.py", "test_selection_runs.py",
                 "test_peft_training.py", "test_unexpected_errors.py", "test_engines_exact.py", "test_library.py",
                 "test_checkpoint_integrity.py", "test_scaling.py",
                 "test_backbones.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it. Its process group is not enough: torchrun starts each
    rank in a session of its own, and a rank that outlives its launcher would go on (or hang) unseen."""
    import psutil
    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_job(args: list[str], *, timeout: float, nproc: int = 1, launcher: str = "torchrun",
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Runs `args` (a script and its arguments) as an `nproc`-rank job and waits at most `timeout` s.

    The job gets its own process session; on timeout the whole session (launcher and every rank) is
    killed, so a rank that hangs in a collective fails the test instead of the suite.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={free_port()}", *args]
    else:  # a plain single process
        cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"job timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A small learnable data set: 4 classes, 512 train / 128 test images in 8 + 2 shards."""
    out = tmp_path_factory.mktemp("synthetic")
    from spt_dist.data.shards import main as shards_main
    assert 0 == shards_main(["synthetic", "--out", str(out), "--classes", "4", "--train", "512", "--test", "128",
                             "--samples-per-shard", "64", "--seed", "0"])
    return out


def tiny_overrides(shards: Path, out_dir: Path, name: str) -> list[str]:
    """Overrides that point tests/configs/tiny.yaml at a data set and an output directory."""
    return [f"data.train_shards={shards}/train-{{000000..000007}}.tar",
            f"data.eval_shards={shards}/test-{{000000..000001}}.tar",
            f"output.dir={out_dir}", f"output.name={name}"]
