"""Slurm for real: a private cluster on this machine (launch/slurm/local_cluster.py: munge, slurmctld and two
slurmd nodes, each in a network namespace of its own) runs the job script `launch/slurm/train.sbatch` as users
submit it: every launcher on 2 nodes x 1 rank and 1 node x 2 ranks, a signal during start-up (requeued), scancel,
a node that dies mid-job (requeued by Slurm), Slurm's own time-limit signal (requeued at least twice), and a
sweep submitted with --slurm.

Skipped where no cluster can start (not root, Slurm not installed), except under SPT_REQUIRE_SLURM=1 (.ci/run
sets it), where that fails. Slurm holds a requeued job for 120 s (Reason=BeginTime); the tests release it at once
(`scontrol update StartTime=now`, what an operator may do) to keep the suite short."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spt_dist.engines.op_cache import private_op_cache
from spt_dist.slurm import show_job
from tests.conftest import REPO, tiny_overrides

SBATCH = str(REPO / "launch" / "slurm" / "train.sbatch")
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
_spec = importlib.util.spec_from_file_location("local_cluster", REPO / "launch" / "slurm" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = local_cluster.missing_requirements()
    if why:
        if os.environ.get("SPT_REQUIRE_SLURM") == "1":
            pytest.fail(f"SPT_REQUIRE_SLURM=1 but no Slurm cluster can start here: {why}")
        pytest.skip(f"no local Slurm cluster: {why}")
    cluster = local_cluster.Cluster(str(tmp_path_factory.mktemp("slurm")), nodes=2, cpus=6)
    cluster.up()
    yield cluster
    cluster.down()


def slurm(cluster, *args: str, check_rc: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **cluster.env()))
    assert not check_rc or result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result


def submit(cluster, tmp_path: Path, shape: tuple[int, int], *script_args: str, sbatch_args: tuple = ()) -> int:
    """train.sbatch on `shape` = (nodes, ranks per node) of the CPU nodes, as a user submits it."""
    nodes, ranks = shape
    result = slurm(cluster, "sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={ranks}",
                   "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/sbatch-%j.out", *sbatch_args,
                   SBATCH, *script_args)
    return int(result.stdout.strip().split(";")[0])


def job_info(cluster, job: int) -> dict[str, str]:
    info = show_job(job, env=dict(os.environ, **cluster.env()))
    assert info, f"scontrol knows no job {job}"
    return info


def wait_job(cluster, job: int, timeout: float = 300, until=None, on_requeue=None) -> dict[str, str]:
    """Waits for the job to end (or for `until(info)`), releasing it from the 120 s hold after each requeue
    (after calling `on_requeue(info)`). Fails, with the job's logs, on the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(cluster, job)
        if until(info) if until else info["JobState"] in ENDED:
            if info["JobState"] in ENDED:  # a record of every job: state, requeues, submit to end
                with open(os.path.join(cluster.dir, "jobs.jsonl"), "a") as f:
                    f.write(json.dumps({k: info.get(k) for k in ("JobId", "JobState", "Restarts", "SubmitTime",
                                                                 "EndTime", "NumNodes", "NumTasks", "StdOut")}) + "\n")
            return info
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            if on_requeue:
                on_requeue(info)
            slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now", check_rc=False)
        time.sleep(0.5)
    slurm(cluster, "scancel", str(job), check_rc=False)
    pytest.fail(f"job {job} not done after {timeout} s: {info}\n{job_logs(info)}")


def job_logs(info: dict[str, str]) -> str:
    out = Path(info.get("StdOut", ""))
    text = f"--- {out}\n{out.read_text()[-3000:]}" if out.is_file() else ""
    run_dir = re.search(r"=(/[^\s=]+)/slurm/job-", text)
    if run_dir:
        for log in sorted(Path(run_dir[1]).glob("slurm/job-*/*")):
            text += f"\n--- {log}\n{log.read_text(errors='replace')[-2000:]}"
    return text


def finished(info: dict[str, str], run_dir: Path) -> dict:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{job_logs(info)}"
    return json.loads((run_dir / "metrics.json").read_text())


def same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --------------------------------------------------------------------------------------------- launchers

# No shell may ever run this name's `;`, `$()` or backticks (DeepSpeed's pdsh runner would, on every node).
HOSTILE = "ds;touch${IFS}PWNED1;$(touch${IFS}PWNED2)`touch${IFS}PWNED3`"


LAUNCHERS = ("srun", "torchrun", "deepspeed")
SHAPES = ((2, 1), (1, 2))  # (nodes, ranks per node)


@pytest.fixture(scope="module")
def launcher_jobs(cluster, synthetic_shards, tmp_path_factory) -> dict:
    """Every launcher on both shapes, all submitted at once (the nodes have room for all six jobs): (launcher,
    shape) -> (job id, run directory, its info once ended). Also checks that no job compiled DeepSpeed's op."""
    out = tmp_path_factory.mktemp("launchers")
    compiled_op = Path(private_op_cache()) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built = compiled_op.stat().st_mtime_ns if compiled_op.is_file() else None
    jobs = {}
    for launcher in LAUNCHERS:
        for shape in SHAPES:
            name = HOSTILE if (launcher, shape) == ("deepspeed", (2, 1)) else f"{launcher}-{shape[0]}x{shape[1]}"
            job = submit(cluster, out, shape, "--launcher", launcher, "--config", TINY,
                         *tiny_overrides(synthetic_shards, out, name))
            jobs[launcher, shape] = (job, out / name)
    ended = {key: (job, run_dir, wait_job(cluster, job)) for key, (job, run_dir) in jobs.items()}
    if built is not None:  # DeepSpeed's CPU op: loaded from the environment's cache, not compiled again per job
        assert compiled_op.stat().st_mtime_ns == built
    return ended


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_jobs_through_each_launcher_on_two_nodes_and_on_one(cluster, launcher_jobs, launcher):
    for shape in SHAPES:
        job, run_dir, info = launcher_jobs[launcher, shape]
        metrics = finished(info, run_dir)
        assert (metrics["world_size"], metrics["steps"]) == (2, 3)
        logs = {p.name for p in (run_dir / "slurm" / f"job-{job}").iterdir()}
        hosts = cluster.nodes if shape[0] == 2 else [info["NodeList"]]
        for host in hosts:  # each node's own log files, where the README says: <host>-<task>.out
            assert any(re.fullmatch(rf"{host}-\d+\.(out|err)", name) for name in logs), (host, logs)
    for found in (*REPO.glob("PWNED*"), *run_dir.parent.rglob("PWNED*"), *Path("/tmp").glob("PWNED*")):
        pytest.fail(f"a shell ran part of an override value: {found}")


# --------------------------------------------------------------------------------------------- stops and failures

def test_signal_during_start_up_requeues_and_the_job_finishes(cluster, synthetic_shards, tmp_path):
    job = submit(cluster, tmp_path, (1, 2), "--config", TINY, *tiny_overrides(synthetic_shards, tmp_path, "early"))
    # The step's task logs are opened as its tasks are started: from then on a signal to the step reaches them.
    # (The step is listed by squeue earlier, before slurmstepd has tasks: a signal then is lost; CI saw it.)
    logs, deadline = tmp_path / "early" / "slurm" / f"job-{job}", time.monotonic() + 120
    while not (logs.is_dir() and len(list(logs.glob("*.out"))) == 2):
        assert time.monotonic() < deadline, job_info(cluster, job)
        time.sleep(0.05)
    slurm(cluster, "scancel", "--signal=USR1", str(job))  # the ranks' interpreters are just starting
    info = wait_job(cluster, job)
    metrics = finished(info, tmp_path / "early")
    assert info["Restarts"] == "1" and metrics["steps"] == 3, info


def test_scancel_leaves_a_checkpoint_that_a_new_job_resumes(cluster, synthetic_shards, tmp_path):
    args = ("--config", TINY, *tiny_overrides(synthetic_shards, tmp_path, "cancelled"), "optim.max_steps=120",
            "output.checkpoint_every=20")
    run_dir = tmp_path / "cancelled"
    job = submit(cluster, tmp_path, (2, 1), *args)
    first = run_dir / "checkpoints" / "step_00000020" / "state.json"
    wait_job(cluster, job, until=lambda info: first.is_file() or info["JobState"] in ENDED)
    slurm(cluster, "scancel", str(job))
    info = wait_job(cluster, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert not (run_dir / "metrics.json").exists()
    assert "not requeued" in Path(info["StdOut"]).read_text()
    saved = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "state.json").is_file())
    metrics = finished(wait_job(cluster, submit(cluster, tmp_path, (2, 1), *args)), run_dir)
    assert metrics["resumed_from_step"] == saved >= 20 and metrics["steps"] == 120


def test_a_node_that_dies_mid_job_requeues_it_and_the_job_continues(cluster, synthetic_shards, tmp_path):
    """Node 2 hangs (every process stopped), Slurm marks it down and requeues the job; the node is then killed and
    started again, and the requeued job continues from its last checkpoint."""
    run_dir = tmp_path / "crash"
    job = submit(cluster, tmp_path, (2, 1), "--config", TINY, *tiny_overrides(synthetic_shards, tmp_path, "crash"),
                 "optim.max_steps=120", "output.checkpoint_every=40")
    first = run_dir / "checkpoints" / "step_00000040" / "state.json"
    wait_job(cluster, job, until=lambda info: first.is_file() or info["JobState"] in ENDED)
    node = cluster.nodes[1]
    cluster.freeze_node(node)
    try:
        wait_job(cluster, job, timeout=120, until=lambda info: info.get("Restarts") == "1")
    finally:
        cluster.crash_node(node)
        cluster.start_node(node)
    metrics = finished(wait_job(cluster, job), run_dir)
    assert metrics["resumed_from_step"] >= 40 and metrics["steps"] == 120


def wait_until_before_a_time_limit_check(cluster, lead: float) -> None:
    """Returns `lead` s before slurmctld next checks time limits, which is when it sends `--signal=SIG@N`
    warnings: every 30 s and a fraction (its background loop's PERIODIC_TIMEOUT, measured here: 30.1 s) from the
    moment it became the primary controller."""
    stamp = re.search(r"\[([\d\-T:.]+)\] Running as primary controller",
                      Path(cluster.dir, "slurmctld.log").read_text())[1]
    first, period = datetime.fromisoformat(stamp).timestamp(), 30.1  # the log's local time, as this machine's
    check = first + math.ceil((time.time() + lead - first) / period) * period
    time.sleep(max(0.0, check - lead - time.time()))


@pytest.mark.timeout(1200)  # the job's starts (under 600 s), then the reference job
def test_time_limit_signals_requeue_the_job_and_the_result_equals_an_uninterrupted_run(cluster, synthetic_shards,
                                                                                      tmp_path):
    """`--time=1 --signal=USR1@59`: Slurm signals each start at its first time-limit check (every 30 s), the
    ranks save and the job requeues itself. The first two starts are let go LEAD s before a check, so each
    trains a few seconds of the run; later ones at once. At least two requeues; the final weights equal an
    uninterrupted job's, bit for bit."""
    # 2 nodes x 1 rank on 2 idle cores: ~8 s of start-up, then 70-100 steps/s. The first two starts train about
    # lead - 8 s each (~1,000 steps here), so the run cannot end in them below ~160 steps/s; a slower machine
    # requeues more often (each later start trains until the next check, at most 30 s).
    lead, steps = 20.0, 4000
    args = ("--config", TINY, f"optim.max_steps={steps}", "output.eval_every=1000", "output.log_every=1000")
    reference = submit(cluster, tmp_path, (2, 1), *args, *tiny_overrides(synthetic_shards, tmp_path, "uninterrupted"),
                       sbatch_args=("--hold",))  # runs after the other, which it would slow down (more requeues)
    run_dir = tmp_path / "limited"
    job = submit(cluster, tmp_path, (2, 1), *args, *tiny_overrides(synthetic_shards, tmp_path, "limited"),
                 sbatch_args=("--time=1", "--signal=USR1@59", "--hold"))
    wait_until_before_a_time_limit_check(cluster, lead)
    slurm(cluster, "scontrol", "release", str(job))
    released = [1]

    def on_requeue(info):
        if int(info["Restarts"]) >= released[0]:  # not released yet
            if released[0] < 2:
                wait_until_before_a_time_limit_check(cluster, lead)
            released[0] += 1

    info = wait_job(cluster, job, timeout=600, on_requeue=on_requeue)
    metrics = finished(info, run_dir)
    rank0 = next((run_dir / "slurm" / f"job-{job}").glob("*-0.out")).read_text()
    stops = [int(step) for step in re.findall(r"stopped by SIGUSR1 at step (\d+)", rank0)]
    with open(os.path.join(cluster.dir, "jobs.jsonl"), "a") as f:
        f.write(json.dumps({"JobId": job, "time_limit_stops_at_steps": stops}) + "\n")
    assert int(info["Restarts"]) == len(stops) >= 2 and metrics["steps"] == steps, (info, stops)
    assert Path(info["StdOut"]).read_text().count("the run stopped early with its state saved") == len(stops)
    slurm(cluster, "scontrol", "release", str(reference))
    finished(wait_job(cluster, reference), tmp_path / "uninterrupted")
    same_weights(run_dir / "model.safetensors", tmp_path / "uninterrupted" / "model.safetensors")


# --------------------------------------------------------------------------------------------- sweep


def test_sweep_submitted_to_slurm_finishes_skips_finished_runs_and_reports(cluster, synthetic_shards, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        "name": "study", "config": [TINY],
        "overrides": {"data.train_shards": f"{synthetic_shards}/train-{{000000..000007}}.tar",
                      "data.eval_shards": f"{synthetic_shards}/test-{{000000..000001}}.tar"},
        "grid": [{"method.name": ["full", "lora"], "world_size": [2]}]}))
    submit_sweep = (sys.executable, str(REPO / "launch" / "sweep.py"), str(sweep_file), "--output-dir",
                    str(tmp_path), "--slurm", "--cpu-ranks-per-node=1", "--sbatch-arg=--cpus-per-task=1")
    first = slurm(cluster, *submit_sweep)
    jobs = json.loads((tmp_path / "study" / "slurm_jobs.json").read_text())
    assert len(jobs) == 2
    again = slurm(cluster, *submit_sweep)  # still queued or running: not submitted twice
    assert again.stdout.count("is still queued or running, not submitted") + \
        again.stdout.count("finished earlier, not submitted") == 2, first.stdout + again.stdout
    for name, job in jobs.items():
        finished(wait_job(cluster, int(job)), tmp_path / "study" / name)
    done = slurm(cluster, *submit_sweep)
    assert done.stdout.count("finished earlier, not submitted") == 2
    report = subprocess.run([sys.executable, "-m", "spt_dist.report", str(tmp_path / "study"), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    rows = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",finished," in row or row.endswith(",finished") for row in rows[1:]), rows
