"""Slurm launch (spt_dist/slurm.py, launch/slurm/train.sbatch) without a cluster: host lists, the job read from
Slurm's environment, the dry run of a 2 nodes x 8 GPUs job through the real sbatch script for every launcher,
data staging, the requeue rule, and one real 2-rank run started exactly as srun would start its tasks."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spt_dist.errors import UserError
from spt_dist.slurm import SlurmJob, expand_hostlist, needs_requeue, plan_from_args
from tests.conftest import REPO, free_port, kill_tree, tiny_overrides

SBATCH = str(REPO / "launch" / "slurm" / "train.sbatch")
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
# A 2 nodes x 8 GPUs job as Slurm describes it to the batch step.
SLURM_2X8 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2",
             "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_CPUS_ON_NODE": "96"}
MASTER = "gpu01:24242"  # the first host; port 20000 + 4242 % 20000


@pytest.mark.parametrize("spec, hosts", [
    ("gpu[01-03,07],cpu-a[1-2]", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu-a1", "cpu-a2"]),
    ("node7", ["node7"]),
    ("a,b", ["a", "b"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("gpu[098-100]", ["gpu098", "gpu099", "gpu100"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("127.0.0.1", ["127.0.0.1"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", ""])
def test_bad_hostlist_is_a_user_error(spec):
    with pytest.raises(UserError):
        expand_hostlist(spec)


def test_job_from_environment():
    job = SlurmJob.from_env(SLURM_2X8)
    assert (job.hosts, job.gpus_per_node, job.world_size) == (("gpu01", "gpu02"), 8, 16)
    assert (job.master_addr, job.master_port, job.omp_threads) == ("gpu01", 24242, 12)
    assert job.scratch == "/tmp/spt_dist-4242"
    # GPU count from the task count; MASTER_PORT, OMP_NUM_THREADS and SLURM_TMPDIR as set; flags win.
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS_PER_NODE": "4", "MASTER_PORT": "2345",
           "OMP_NUM_THREADS": "3", "SLURM_CPUS_ON_NODE": "16", "SLURM_TMPDIR": "/local/job9",
           "SLURM_RESTART_COUNT": "2"}
    job = SlurmJob.from_env(env)
    assert (job.nodes, job.gpus_per_node, job.master_port, job.omp_threads, job.scratch, job.restart_count) == \
        (3, 4, 2345, None, "/local/job9", 2)
    assert SlurmJob.from_env(env, nodelist="x[1-2]", gpus_per_node=2, job_id=5).hosts == ("x1", "x2")
    with pytest.raises(UserError, match="SLURM_NNODES is 2"):
        SlurmJob.from_env(dict(SLURM_2X8, SLURM_JOB_NODELIST="gpu01"))


def parse_nodes(text: str) -> list[dict]:
    """The per-node part of a dry run: host, ranks, and each task's label, log and command."""
    nodes, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"node (\d+) (\S+): ranks (\d+)-(\d+)", line):
            assert int(m[1]) == len(nodes)
            nodes.append({"host": m[2], "ranks": list(range(int(m[3]), int(m[4]) + 1)), "tasks": []})
        elif m := re.fullmatch(r"  (.+), log (\S+):", line):
            nodes[-1]["tasks"].append({"label": m[1], "log": m[2], "argv": shlex.split(lines[i + 1])})
    return nodes


def env_of(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "env"
    return dict(a.split("=", 1) for a in itertools.takewhile(lambda a: "=" in a, argv[1:]))


def train_args_of(argv: list[str]) -> list[str]:
    return argv[argv.index("spt_dist.train") + 1:]


def dry_run_2x8(launcher: str, tmp_path: Path) -> tuple[str, str]:
    """The real sbatch script's dry run inside a (pretend) 2 x 8 GPU allocation. Returns (output, run dir)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "OMP_NUM_THREADS")}
    env.update(SLURM_2X8, SPT_PYTHON=sys.executable)
    result = subprocess.run(["bash", SBATCH, "--dry-run", "--launcher", launcher, "--config", TINY,
                             f"output.dir={tmp_path}", "output.name=big"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "big").exists()  # a dry run makes nothing
    return result.stdout, str(tmp_path / "big")


@pytest.mark.parametrize("launcher", ["srun", "torchrun", "deepspeed"])
def test_dry_run_2_nodes_x_8_gpus(launcher, tmp_path):
    out, run_dir = dry_run_2x8(launcher, tmp_path)
    logs = f"{run_dir}/slurm/job-4242"
    assert f"job 4242 (restart 0): 2 node(s) x 8 GPUs = 16 ranks; master {MASTER}; launcher {launcher}" in out
    assert f"then: exit 0 without {run_dir}/metrics.json (stopped by a signal, state saved): " \
           "scontrol requeue 4242" in out
    nodes = parse_nodes(out)
    assert [n["host"] for n in nodes] == ["gpu01", "gpu02"]
    assert [n["ranks"] for n in nodes] == [list(range(8)), list(range(8, 16))]
    commands = [t["argv"] for n in nodes for t in n["tasks"]]
    for argv in commands:  # every node trains the same run, continuing it after a requeue
        assert train_args_of(argv) == ["--config", TINY, "--resume", "latest", f"output.dir={tmp_path}",
                                       "output.name=big"]
        assert "--scratch=/tmp/spt_dist-4242" in argv

    step_logs = f"--kill-on-bad-exit=1 --open-mode=append --output={logs}/%N-%t.out --error={logs}/%N-%t.err"
    if launcher == "srun":
        assert f"srun --nodes=2 --ntasks-per-node=8 {step_logs} --cpus-per-task=12" in out
        for node in nodes:
            assert len(node["tasks"]) == 8
            for local, task in enumerate(node["tasks"]):
                env = env_of(task["argv"])
                rank = int(env["SLURM_PROCID"])
                assert task["label"] == f"rank {rank}" and task["log"] == f"{logs}/{node['host']}-{rank}.out"
                assert (rank in node["ranks"], int(env["SLURM_LOCALID"]), env["SLURM_NTASKS"]) == (True, local, "16")
                assert f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" == MASTER and env["OMP_NUM_THREADS"] == "12"
                assert "--from-slurm" in task["argv"]
        assert sorted(int(env_of(a)["SLURM_PROCID"]) for a in commands) == list(range(16))
    elif launcher == "torchrun":
        assert f"srun --nodes=2 --ntasks-per-node=1 {step_logs} --cpus-per-task=96" in out
        for i, node in enumerate(nodes):
            (task,) = node["tasks"]
            assert task["label"] == f"torchrun agent, node rank {i}" and task["log"] == f"{logs}/{node['host']}-{i}.out"
            for flag in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", f"--rdzv_endpoint={MASTER}",
                         "--rdzv_id=4242", "--ignore-usr1"):
                assert flag in task["argv"]
            assert env_of(task["argv"])["OMP_NUM_THREADS"] == "12"
    else:
        assert f"file {logs}/hostfile:\n  gpu01 slots=8\n  gpu02 slots=8\n" in out
        (task,) = nodes[0]["tasks"]
        assert nodes[1]["tasks"] == [] and "started over ssh (pdsh) by the deepspeed launcher on gpu01" in out
        for flag in (f"--hostfile={logs}/hostfile", "--master_addr=gpu01", "--master_port=24242", "--ignore-usr1"):
            assert flag in task["argv"]
        assert "--nodes=1" in out and "--nodelist=gpu01" in out


def test_torchrun_node_ranks_follow_the_rendezvous_order():
    # c10d numbers agents by sorted host name: gpu10 before gpu9, whatever Slurm's order.
    env = dict(SLURM_2X8, SLURM_JOB_NODELIST="gpu[9-10]")
    plan, _ = plan_from_args(["--launcher", "torchrun", "--config", TINY, "output.name=x"], env)
    assert [(n.host, n.ranks) for n in plan.nodes] == [("gpu9", range(8, 16)), ("gpu10", range(0, 8))]


def test_stage_data_copies_shard_directories_and_points_the_run_at_them(synthetic_shards, tmp_path):
    local = tmp_path / "node-local"
    plan, _ = plan_from_args(["--stage-data", str(local), "--config", TINY,
                              *tiny_overrides(synthetic_shards, tmp_path, "staged")], SLURM_2X8)
    copy_step, train_step = plan.steps
    assert copy_step[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]
    copy_dir = local / synthetic_shards.name
    assert train_args_of(train_step)[-2:] == [f"data.train_shards={copy_dir}/train-{{000000..000007}}.tar",
                                             f"data.eval_shards={copy_dir}/test-{{000000..000001}}.tar"]
    for node in plan.nodes:  # each node copies first, then trains
        assert node.tasks[0].label == "stage data" and node.tasks[0].argv == copy_step[-3:]
    subprocess.run(plan.nodes[0].tasks[0].argv, check=True, timeout=60)  # what each node's copy task runs
    for name in ("sizes.json", "classes.json", "train-000007.tar", "test-000001.tar"):
        assert (copy_dir / name).read_bytes() == (synthetic_shards / name).read_bytes()
    with pytest.raises(UserError, match="absolute"):
        plan_from_args(["--stage-data", "relative", "--config", TINY, "output.name=x"], SLURM_2X8)


def test_requeue_only_when_stopped_with_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    assert needs_requeue(0, str(tmp_path))  # stopped by a signal: saved, not finished
    assert not needs_requeue(1, str(tmp_path))  # a failure is the job's exit status, not a requeue
    (tmp_path / "metrics.json").write_text("{}")
    assert not needs_requeue(0, str(tmp_path))  # finished
    assert not needs_requeue(0, str(tmp_path), "score")  # a score pass is unfinished while it has partial scores
    (tmp_path / "scores" / "partial").mkdir(parents=True)
    assert needs_requeue(0, str(tmp_path), "score")


def test_missing_output_name_is_one_line():
    result = subprocess.run([sys.executable, "-m", "spt_dist.slurm", "launch", "--dry-run", "--nodes", "1",
                             "--gpus-per-node", "2", "--job-id", "1", "--config", TINY],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("spt_dist: error: output.name:") and result.stderr.count("\n") == 1


def test_task_shim_lets_a_launcher_survive_usr1(tmp_path):
    probe = "import os, signal; print(signal.getsignal(signal.SIGUSR1).name, os.path.isdir(os.environ['TMPDIR']))"
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    result = subprocess.run([sys.executable, "-m", "spt_dist.slurm", "task", "--ignore-usr1", f"--scratch={tmp_path}",
                             "--", sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["SIG_IGN", "True"], result.stderr  # inherited by the ranks it starts


def _srun_plan(synthetic_shards, tmp_path, name: str, *overrides: str):
    """The plan of a 1 node x 2 "GPUs" job on 127.0.0.1 and its two rank tasks."""
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_CPUS_ON_NODE": "2", "MASTER_PORT": str(free_port()), "SLURM_TMPDIR": str(tmp_path / "scratch")}
    plan, _ = plan_from_args(["--config", TINY, *tiny_overrides(synthetic_shards, tmp_path, name), *overrides], env)
    tasks = [task for node in plan.nodes for task in node.tasks]
    assert [t.label for t in tasks] == ["rank 0", "rank 1"]
    os.makedirs(plan.slurm_dir, exist_ok=True)
    return plan, tasks


def _start_tasks(tasks) -> list[subprocess.Popen]:
    """Each task's command and environment, as srun would start them, output where srun's --output puts it."""
    own = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "TMPDIR",
           "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR")
    base = {k: v for k, v in os.environ.items() if k not in own and not k.startswith("SLURM_")}
    procs = []
    for task in tasks:
        with open(task.log, "a") as log:
            procs.append(subprocess.Popen(task.command(), cwd=REPO, env=dict(base, PYTHONUNBUFFERED="1"),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait_tasks(procs, tasks, timeout: float = 300) -> None:
    """Waits until every rank has exited 0; fails (killing them all) on another exit status or the timeout."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and \
            all(p.poll() in (None, 0) for p in procs):
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    if codes != [0, 0]:
        for p in procs:
            kill_tree(p.pid)
        logs = "\n".join(f"--- {t.log}\n{Path(t.log).read_text()[-3000:]}" for t in tasks)
        pytest.fail(f"ranks exited {codes} (None: still running after {timeout} s)\n{logs}")


def test_srun_tasks_of_a_plan_train_for_real(synthetic_shards, tmp_path):
    """1 node x 2 "GPUs" on 127.0.0.1: each task's command and environment, as srun would start them."""
    plan, tasks = _srun_plan(synthetic_shards, tmp_path, "srun")
    _wait_tasks(_start_tasks(tasks), tasks)
    metrics = json.loads((Path(plan.run_dir) / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert not needs_requeue(0, plan.run_dir)
    assert (tmp_path / "scratch" / "triton").is_dir()  # node-local scratch made by each task


def test_usr1_stops_the_ranks_and_the_requeued_job_finishes(synthetic_shards, tmp_path):
    """Slurm's --signal=USR1 reaches every task of the step: the ranks save and exit 0, the run is unfinished
    (requeue), and the same commands started again (the requeued job) continue it to the end."""
    plan, tasks = _srun_plan(synthetic_shards, tmp_path, "preempted", "optim.max_steps=200")
    procs = _start_tasks(tasks)
    deadline = time.monotonic() + 300
    while " steps (" not in Path(tasks[0].log).read_text():  # rank 0 prints the plan once both ranks are set up
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), Path(tasks[0].log).read_text()
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGUSR1)
    _wait_tasks(procs, tasks)
    assert "stopped by SIGUSR1" in Path(tasks[0].log).read_text()
    assert needs_requeue(0, plan.run_dir) and not (Path(plan.run_dir) / "metrics.json").exists()
    _wait_tasks(_start_tasks(tasks), tasks)  # the requeued job: --resume latest continues from the checkpoint
    metrics = json.loads((Path(plan.run_dir) / "metrics.json").read_text())
    assert metrics["steps"] == 200 and 0 < metrics["resumed_from_step"] < 200
    assert not needs_requeue(0, plan.run_dir)
