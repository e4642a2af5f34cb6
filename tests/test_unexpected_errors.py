"""An unexpected exception, or a rank stuck for good, ends the whole job within seconds: every rank and every
loader worker, under torchrun, the deepspeed launcher and as one plain process, with the error said once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, free_port, kill_tree, run_job, tiny_overrides

WORKER = "tests/workers/raise_in_step.py"
GONE_WITHIN_S = 30.0
HEADER = "unexpected error, every rank stops"


def _job_processes(marker: str) -> list[psutil.Process]:
    """Every process of a job: ranks and loader workers (forked: the same command line) carry its output dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in found if p.pid != os.getpid()]


def _assert_all_gone(marker: str, within_s: float = GONE_WITHIN_S) -> None:
    deadline = time.monotonic() + within_s
    while (left := _job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:  # leave nothing running for the rest of the suite, then fail
        kill_tree(proc.pid)
    assert not left, f"still running {within_s:.0f} s after the job ended: {[p.pid for p in left]}"


def _args(shards, tmp_path, name: str, *extra: str) -> list[str]:
    return [WORKER, "--config", "tests/configs/tiny.yaml", *tiny_overrides(shards, tmp_path, name),
            "data.workers=2", "optim.max_steps=20", *extra]


@pytest.mark.parametrize("launcher, nproc, fail_ranks", [("torchrun", 2, "0,1"), ("deepspeed", 2, "1"),
                                                          ("python", 1, "0")])
def test_an_exception_in_a_step_ends_every_process_and_is_said_once(launcher, nproc, fail_ranks, synthetic_shards,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_STEP", "2")
    monkeypatch.setenv("FAIL_RANKS", fail_ranks)
    started = time.monotonic()
    result = run_job(_args(synthetic_shards, tmp_path, "crash"), nproc=nproc, launcher=launcher, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    _assert_all_gone(str(tmp_path))
    assert output.count(HEADER) == 1, output[-4000:]  # the same error on both ranks: said once
    failing = fail_ranks.split(",")
    said_by = output.split(HEADER)[0].rsplit("spt_dist: rank ", 1)[1].split(":")[0]
    assert said_by in failing and "AssertionError: injected failure in step 2" in output, output[-4000:]
    assert "frame #" not in output  # no c10d C++ stack dump from a peer
    assert time.monotonic() - started < 200


def test_a_user_error_on_rank_1_alone_is_one_line_without_a_c10d_dump(synthetic_shards, tmp_path, monkeypatch):
    """Under the deepspeed launcher rank 0 hosts the job's store: it stays up until rank 1 has said its error."""
    monkeypatch.setenv("FAIL_STEP", "2")
    monkeypatch.setenv("FAIL_RANKS", "1")
    monkeypatch.setenv("FAIL_MODE", "user")
    result = run_job(_args(synthetic_shards, tmp_path, "user"), nproc=2, launcher="deepspeed", timeout=240)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "spt_dist: error" in line]
    assert result.returncode != 0 and errors == ["spt_dist: error: rank 1: injected user error in step 2"], \
        output[-4000:]
    assert "Traceback" not in output and "frame #" not in output and "TCPStore" not in output, output[-4000:]
    _assert_all_gone(str(tmp_path))


def test_a_stuck_rank_ends_once_its_launcher_is_killed(synthetic_shards, tmp_path, monkeypatch):
    """Rank 1 never returns from its step; rank 0 waits for it in a collective. torchrun is SIGKILLed: both ranks
    and their loader workers notice and end (the worker script cuts the grace to 5 s)."""
    monkeypatch.setenv("FAIL_STEP", "2")
    monkeypatch.setenv("FAIL_RANKS", "1")
    monkeypatch.setenv("FAIL_MODE", "hang")
    log = tmp_path / "job.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *_args(synthetic_shards, tmp_path, "stuck", "engine.timeout_s=600")]
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        deadline = time.monotonic() + 480  # start-up on a loaded machine
        while "rank 1 hangs" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert len(_job_processes(str(tmp_path))) >= 4  # 2 ranks and their loader workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        _assert_all_gone(str(tmp_path))
    finally:
        kill_tree(launcher.pid)
    assert "ending after the exit of its launcher" in log.read_text()


def test_an_error_that_follows_a_stop_signal_is_a_stop_in_one_line(synthetic_shards, tmp_path, monkeypatch):
    """A SIGTERM while DeepSpeed's op compiles at start-up fails the build ('interrupted by user'): that is the
    stop the signal asked for, said in one line, not a crash with a traceback."""
    monkeypatch.setenv("FAIL_STEP", "1")
    monkeypatch.setenv("FAIL_RANKS", "0")
    monkeypatch.setenv("FAIL_MODE", "signal")
    result = run_job(_args(synthetic_shards, tmp_path, "stopped"), launcher="python", timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "spt_dist: stopped by SIGTERM (RuntimeError: Error building extension 'deepspeed_shm_comm': " \
           "interrupted by user) before it could save; run the same command again" in output, output[-3000:]
    _assert_all_gone(str(tmp_path))


@pytest.mark.parametrize("launcher, fail_ranks", [("torchrun", "0"), ("torchrun", "1"), ("deepspeed", "1")])
def test_a_bug_while_saving_is_said_once_with_its_traceback(launcher, fail_ranks, synthetic_shards, tmp_path,
                                                           monkeypatch):
    """The other ranks learn of the failed save in its gather: they wait for the failing rank's report rather
    than say it again as a user error (which lost the traceback, or said it twice)."""
    monkeypatch.setenv("FAIL_MODE", "save")
    monkeypatch.setenv("FAIL_RANKS", fail_ranks)
    result = run_job(_args(synthetic_shards, tmp_path, "save-bug", "output.checkpoint_every=2"), nproc=2,
                     launcher=launcher, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and output.count(HEADER) == 1, output[-4000:]
    assert f"spt_dist: rank {fail_ranks}: {HEADER}" in output and "KeyError: 'injected save bug'" in output
    assert "spt_dist: error" not in output and "frame #" not in output, output[-4000:]
    assert not list((tmp_path / "save-bug" / "checkpoints").glob(".partial-*"))
    _assert_all_gone(str(tmp_path))
