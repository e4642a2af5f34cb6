"""Slurm launch (spt_dist/slurm.py, launch/slurm/train.sbatch) without a cluster: host lists, the job read from
Slurm's environment (GPU and CPU nodes), the dry run of a 2 nodes x 8 GPUs job through the real sbatch script for
every launcher, data staging, the requeue rule, the task shim and the stop-signal rules. Real jobs on a real
cluster: tests/test_slurm_cluster.py."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spt_dist.errors import UserError
from spt_dist.slurm import SlurmJob, expand_hostlist, needs_requeue, plan_from_args
from tests.conftest import REPO, tiny_overrides

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
    assert (job.hosts, job.ranks_per_node, job.gpus, job.world_size) == (("gpu01", "gpu02"), 8, True, 16)
    assert (job.master_addr, job.master_port, job.omp_threads) == ("gpu01", 24242, 12)
    assert job.scratch == "/tmp/spt_dist-4242"
    # GPU count from the task count; MASTER_PORT, OMP_NUM_THREADS and SLURM_TMPDIR as set; flags win.
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS_PER_NODE": "4", "MASTER_PORT": "2345",
           "OMP_NUM_THREADS": "3", "SLURM_CPUS_ON_NODE": "16", "SLURM_TMPDIR": "/local/job9",
           "SLURM_RESTART_COUNT": "2"}
    job = SlurmJob.from_env(env)
    assert (job.nodes, job.ranks_per_node, job.master_port, job.omp_threads, job.scratch, job.restart_count) == \
        (3, 4, 2345, None, "/local/job9", 2)
    # A CPU node (sbatch --gpus-per-node=0 --ntasks-per-node=2): one rank per task, threads = CPUs / ranks.
    cpu = SlurmJob.from_env(dict(SLURM_2X8, SLURM_GPUS_PER_NODE="0", SLURM_NTASKS_PER_NODE="2",
                                 SLURM_CPUS_ON_NODE="8"))
    assert (cpu.ranks_per_node, cpu.gpus, cpu.world_size, cpu.omp_threads) == (2, False, 4, 4)
    with pytest.raises(UserError, match="--gpus-per-node=0 --ntasks-per-node=N"):
        SlurmJob.from_env({k: v for k, v in SLURM_2X8.items() if k != "SLURM_GPUS_PER_NODE"})
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

    step_logs = f"--ntasks-per-node={{}} --kill-on-bad-exit=1 --open-mode=append --output={logs}/%N-%t.out --error={logs}/%N-%t.err"
    if launcher == "srun":
        assert f"srun --nodes=2 --ntasks=16 {step_logs.format(8)} --cpus-per-task=12" in out
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
        assert f"srun --nodes=2 --ntasks=2 {step_logs.format(1)} --cpus-per-task=96" in out
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
        assert nodes[1]["tasks"] == [] and "ranks started by the deepspeed launcher on gpu01 (its srun step)" in out
        argv = task["argv"]
        for flag in (f"--hostfile={logs}/hostfile", "--master_addr=gpu01", "--master_port=24242", "--ignore-usr1",
                     "--launcher=slurm", "--no_ssh_check"):
            assert flag in argv
        assert "--nodes=1 --ntasks=1" in out and "--nodelist=gpu01" in out
        # DeepSpeed's Slurm runner: an srun step of 16 ranks (no pdsh, no remote shell), each through the shim.
        (srun_args,) = [a.split("=", 1)[1] for a in argv if a.startswith("--launcher_args=")]
        assert shlex.split(srun_args) == ["--nodes=2", "--ntasks=16", *step_logs.format(8).split(),
                                          "--cpus-per-task=12", "--overlap"]
        script = argv[argv.index("--", argv.index("--launcher=slurm")) + 1:]
        assert script[:4] == ["-m", "spt_dist.slurm", "task", "--from-slurm"] and "--module" not in script


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
    assert copy_step[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
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


def test_the_batch_step_imports_no_torch():
    """It runs at every start of every job, before the ranks: importing torch and timm there cost 7 s a start."""
    probe = ("import sys; from spt_dist.slurm import plan_from_args; plan_from_args(['--config', "
             "'tests/configs/tiny.yaml', 'method.name=lora', 'output.name=x'], {'SLURM_JOB_ID': '1', "
             "'SLURM_JOB_NODELIST': 'n1', 'SLURM_NTASKS_PER_NODE': '2'}); print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('torch', 'timm', 'deepspeed')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr[-3000:]


def test_task_shim_lets_a_launcher_survive_usr1(tmp_path):
    probe = "import os, signal; print(signal.getsignal(signal.SIGUSR1).name, os.path.isdir(os.environ['TMPDIR']))"
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    result = subprocess.run([sys.executable, "-m", "spt_dist.slurm", "task", "--ignore-usr1", f"--scratch={tmp_path}",
                             "--", sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["SIG_IGN", "True"], result.stderr  # inherited by the ranks it starts


def test_a_rank_task_holds_stop_signals_until_its_handlers_are_set(tmp_path):
    """Slurm's USR1 may come while a rank's interpreter is still starting: the shim blocks the stop signals
    across exec, so the signal waits for preemption.install() instead of killing the rank."""
    probe = ("import os, signal; os.kill(os.getpid(), signal.SIGUSR1); "  # before any handler: kept pending
             "from spt_dist import preemption; preemption.install(); print(preemption._FLAG.received)")
    env = dict(os.environ, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1")
    result = subprocess.run([sys.executable, "-m", "spt_dist.slurm", "task", "--from-slurm", f"--scratch={tmp_path}",
                             "--", sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "SIGUSR1"), result.stderr


def test_a_stop_signal_before_the_step_starts_means_it_is_not_started(tmp_path):
    """srun would die of a signal that reached it before its handlers: a step is not started after one came
    (here SIGUSR1 to a finished run: nothing to requeue, exit 0, no srun)."""
    probe = ("import os, pathlib, signal, sys; from spt_dist.slurm import _StepSignals, plan_from_args, run_plan; "
             "signals = _StepSignals(); plan, _ = plan_from_args(['--config', 'tests/configs/tiny.yaml', "
             f"'output.dir={tmp_path}', 'output.name=x'], {{'SLURM_JOB_ID': '1', 'SLURM_JOB_NODELIST': 'n1', "
             "'SLURM_NTASKS_PER_NODE': '2'}); pathlib.Path(plan.run_dir).mkdir(parents=True); "
             "pathlib.Path(plan.run_dir, 'metrics.json').write_text('{}'); os.kill(os.getpid(), signal.SIGUSR1); "
             "sys.exit(run_plan(plan, signals))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "spt_dist.slurm: SIGUSR1 received before the step started; it is not started"


def test_copies_of_a_stop_signal_are_one_request_and_a_later_one_ends_the_rank():
    """Slurm signals every task and srun or torchrun pass their own copy on: copies within DUPLICATE_S are one
    request; a deliberate second signal after that ends the process at once."""
    probe = ("import os, signal; from spt_dist import preemption as p; p.install(); "
             "[os.kill(os.getpid(), signal.SIGTERM) for _ in range(3)]; print(p._FLAG.received, flush=True); "
             "p._FLAG.signalled_at -= p.DUPLICATE_S; os.kill(os.getpid(), signal.SIGTERM); print('survived')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.split()) == (-15, ["SIGTERM"]), result.stderr
