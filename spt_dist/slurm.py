"""Slurm launch: the commands every node of a job runs, printed (`--dry-run`, no cluster needed) or run.

    python -m spt_dist.slurm launch [--launcher srun|torchrun|deepspeed] [--stage-data DIR] [--dry-run]
        [--nodelist 'gpu[01-02]' --nodes 2 --gpus-per-node 8 | --cpu-ranks-per-node 2, --job-id 1]
        --config FILE ... key=value ...

It runs in the batch step of `launch/slurm/train.sbatch` (hence torch-free) and reads the job from the
environment Slurm sets (the flags override it for a dry run). train.py's own arguments (--config, --stage,
--resume, key=value) are passed on, with `--resume latest` added unless --resume is given: a first start
begins the run, a requeued job continues it.

Ranks per node: the GPUs of a node (all visible to each of its tasks, as with `--gpus-per-node`); on nodes
without GPUs (`sbatch --gpus-per-node=0 --ntasks-per-node=N`) the tasks per node, one CPU rank each.
Launchers:
  srun       one Slurm task per rank; `task --from-slurm` turns SLURM_PROCID/LOCALID/NTASKS into
             RANK/LOCAL_RANK/WORLD_SIZE. Node i holds ranks i*G .. i*G+G-1.
  torchrun   one Slurm task per node running a torchrun agent (c10d rendezvous at the first host).
  deepspeed  the deepspeed launcher, one Slurm task on the first host, with a hostfile of the job's nodes. On
             one node it starts the ranks itself; on several, through DeepSpeed's own `--launcher slurm`: an srun
             step inside the job (not pdsh over ssh, whose remote shell would run any `;`, `$()` or backtick in a
             value), so the ranks get Slurm's signal and their node's scratch as with the other launchers.

Preemption: `--signal=USR1@180` reaches the ranks, which stop at the next step, save a checkpoint and exit 0
(Slurm sends it again to every start of a requeued job). A step that exits 0 with the run unfinished (no
metrics.json) is followed by `scontrol requeue`. A stop signal to the batch step itself (`--signal=B:USR1@180`,
`scancel`) is passed on to the ranks' step; one that came before the step started means it is not started
(SIGUSR1 then requeues the job at once). After SIGTERM or SIGINT (a cancel, or a preemption that Slurm
requeues itself) the job is not requeued by us, unless it has run its time limit (no --signal, or one that
came too late: `--signal=USR1@N` goes to the job's steps, and one that comes before the step starts is lost):
the ranks saved on that SIGTERM, so it is.
A task ended by SIGUSR1 before its handler was set (srun exit 138) is requeued too.
Per-node layout: logs in <run_dir>/slurm/job-<id>/<host>-<task>.out|.err; node-local scratch
($SLURM_TMPDIR or /tmp/spt_dist-<id>) for TMPDIR and TRITON_CACHE_DIR (DeepSpeed's compiled CPU op stays in
the environment's own cache, built once by install.sh and reused by every job: see engines/op_cache.py);
with --stage-data the shard directories are first copied to DIR on every node and the run reads the copies.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from spt_dist.atomic import write_text
from spt_dist import preemption, runfiles
from spt_dist.cli import TRAIN_MODULE, TRAIN_STAGES, command
from spt_dist.config import Config, load_config
from spt_dist.errors import UserError

# How each launcher starts the training module (python -m / torchrun -m / deepspeed --module).
_TRAIN = {"srun": ["-m", TRAIN_MODULE], "torchrun": ["-m", TRAIN_MODULE], "deepspeed": ["--module", TRAIN_MODULE]}
LAUNCHERS = ("srun", "torchrun", "deepspeed")
PARTIAL_SCORES = os.path.join(runfiles.SCORES, runfiles.PARTIAL_SCORES)  # a stopped score pass's state
SCRATCH_DIRS = {"TMPDIR": "tmp", "TRITON_CACHE_DIR": "triton"}
_FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1}


# --------------------------------------------------------------------------- the job


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compact host list -> host names: `gpu[01-03,07],cpu-a[1-2]` -> gpu01 gpu02 gpu03 gpu07 cpu-a1
    cpu-a2. Numbers keep the width of the range's first bound (zero padding); several bracket groups in one
    name expand to every combination. Our own parser, not `scontrol show hostnames`: the same on any machine."""
    hosts = [host for item in _split_outside_brackets(spec) for host in _expand_name(item, spec)]
    if not hosts:
        raise UserError(f"host list '{spec}' names no host")
    return hosts


def _split_outside_brackets(spec: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise UserError(f"host list '{spec}': unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise UserError(f"host list '{spec}': unbalanced brackets")
    return [item for item in items + [current] if item]


def _expand_name(name: str, spec: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", name)
    if not match:
        return [name]
    prefix, ranges, rest = match.groups()
    return [prefix + number + tail for number in _expand_ranges(ranges, spec) for tail in _expand_name(rest, spec)]


def _expand_ranges(ranges: str, spec: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise UserError(f"host list '{spec}': bad range '{part}'")
        first, last = match.group(1), match.group(2) or match.group(1)
        numbers += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return numbers


def _count(name: str, text: str) -> int:
    """A count from a Slurm variable: `8`, or `h100:8` (SLURM_GPUS_PER_NODE with a GPU type)."""
    try:
        value = int(text.rsplit(":", 1)[-1])
    except ValueError:
        raise UserError(f"{name}: expected a count, got '{text}'") from None
    if value <= 0:
        raise UserError(f"{name}: must be > 0 (got {value})")
    return value


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    hosts: tuple[str, ...]
    ranks_per_node: int  # its GPUs; on nodes without GPUs, its tasks (one CPU rank each)
    master_port: int
    scratch: str  # node-local directory (the same path on every node, each on its own disk)
    cpus_per_node: int | None = None  # None: unknown (srun's own --cpus-per-task default applies)
    omp_threads: int | None = None  # OMP_NUM_THREADS given to each rank; None: left as it is
    restart_count: int = 0
    gpus: bool = True  # False: CPU ranks

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, nodelist: str | None = None, nodes: int | None = None,
                 gpus_per_node: int | None = None, cpu_ranks_per_node: int | None = None,
                 job_id: int | None = None) -> "SlurmJob":
        """The job Slurm describes in `env`; each argument, when given, replaces what the environment says."""
        if job_id is None:
            if "SLURM_JOB_ID" not in env:
                raise UserError("not inside a Slurm job (no SLURM_JOB_ID): give --job-id for a dry run")
            job_id = _count("SLURM_JOB_ID", env["SLURM_JOB_ID"])
        nodelist = nodelist or env.get("SLURM_JOB_NODELIST")
        nodes = nodes or (_count("SLURM_NNODES", env["SLURM_NNODES"]) if "SLURM_NNODES" in env else None)
        if nodelist:
            hosts = expand_hostlist(nodelist)
        elif nodes:
            hosts = [f"node{i}" for i in range(nodes)]  # a dry run given only a node count
        else:
            raise UserError("no nodes: not inside a Slurm job (no SLURM_JOB_NODELIST): give --nodelist or --nodes")
        if nodes is not None and nodes != len(hosts):
            raise UserError(f"--nodes / SLURM_NNODES is {nodes} but the node list '{nodelist}' has {len(hosts)}")
        if gpus_per_node or cpu_ranks_per_node:
            ranks, on_gpus = (gpus_per_node, True) if gpus_per_node else (cpu_ranks_per_node, False)
        else:
            ranks, on_gpus = _ranks_per_node(env)
        cpus = _count("SLURM_CPUS_ON_NODE", env["SLURM_CPUS_ON_NODE"]) if "SLURM_CPUS_ON_NODE" in env else None
        port = int(env.get("MASTER_PORT") or 20000 + job_id % 20000)  # the same on every node, and on a requeue
        threads = max(1, cpus // ranks) if cpus and "OMP_NUM_THREADS" not in env else None
        return cls(job_id, tuple(hosts), ranks, port, env.get("SLURM_TMPDIR") or f"/tmp/spt_dist-{job_id}",
                   cpus, threads, int(env.get("SLURM_RESTART_COUNT", "0")), on_gpus)


def _ranks_per_node(env: Mapping[str, str]) -> tuple[int, bool]:
    """(ranks per node, on GPUs): the node's GPUs where the job has any, else its tasks per node (a CPU node:
    `--gpus-per-node=0`, which Slurm reports as 0, or no GPU request at all)."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(name) and env[name].rsplit(":", 1)[-1].strip() not in ("0", ""):
            return _count(name, env[name]), True
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _count("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"]), False
    raise UserError("ranks per node unknown: the job has no GPUs (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE) and no "
                    "SLURM_NTASKS_PER_NODE: give sbatch --gpus-per-node=G, or on CPU nodes --gpus-per-node=0 "
                    "--ntasks-per-node=N (N ranks per node)")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Task:
    """One process Slurm starts on a node: a rank (srun), a launcher agent, or a data copy."""
    label: str
    env: dict[str, str]  # its environment on top of the batch step's: the step's additions and what srun sets
    argv: list[str]
    log: str

    def command(self) -> list[str]:
        return with_env(self.env, self.argv)


def with_env(env: Mapping[str, str], argv: list[str]) -> list[str]:
    """`argv` run with `env` added, as one copy-pasteable command."""
    return ["env", *(f"{key}={value}" for key, value in env.items()), *argv] if env else argv


@dataclass(frozen=True)
class Node:
    index: int
    host: str
    ranks: range  # the global ranks running on this node
    tasks: list[Task]
    note: str = ""


@dataclass(frozen=True)
class Plan:
    job: SlurmJob
    launcher: str
    run_dir: str
    stage: str  # train.py's --stage: decides what a finished run leaves behind
    steps: list[list[str]]  # what the batch step runs, in order
    nodes: list[Node]
    files: dict[str, str] = field(default_factory=dict)  # written before the steps: path -> content

    @property
    def slurm_dir(self) -> str:
        return slurm_dir(self.run_dir, self.job.job_id)


def slurm_dir(run_dir: str, job_id: int) -> str:
    return os.path.join(run_dir, runfiles.SLURM, f"job-{job_id}")


# A launcher's part of a plan: the training step, what each node runs, files to write first.
Launch = tuple[list[str], list[Node], dict[str, str]]


def make_plan(job: SlurmJob, launcher: str, train_args: list[str], run_dir: str, stage: str = "train",
              copies: Mapping[str, str] | None = None) -> Plan:
    """`train_args`: train.py's arguments; `copies`: node-local directory -> shard directory, copied to every
    node before training."""
    logs = slurm_dir(run_dir, job.job_id)
    step_env = {"OMP_NUM_THREADS": str(job.omp_threads)} if job.omp_threads else {}
    build = {"srun": _srun_ranks, "torchrun": _torchrun_agents, "deepspeed": _deepspeed_launcher}[launcher]
    train_step, nodes, files = build(job, [*_TRAIN[launcher], *train_args], logs, step_env)
    steps = [train_step]
    if copies:
        copy_step, copy_tasks = _copy_data(job, copies, logs)
        steps.insert(0, copy_step)
        nodes = [Node(n.index, n.host, n.ranks, [copy_tasks[n.index], *n.tasks], n.note) for n in nodes]
    return Plan(job, launcher, run_dir, stage, steps, nodes, files)


def _srun(job: SlurmJob, logs: str, log_name: str, tasks_per_node: int, cpus_per_task: int | None,
          nodes: int | None = None) -> list[str]:
    """An srun step over the job's nodes (or the first `nodes`), its tasks' output in per-node, per-task files."""
    nodes = nodes or job.nodes
    # --ntasks too: srun would take it from the job's SLURM_NTASKS, which counts the job's tasks, not this step's.
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes * tasks_per_node}", f"--ntasks-per-node={tasks_per_node}",
           "--kill-on-bad-exit=1",
           "--open-mode=append", f"--output={logs}/{log_name}.out", f"--error={logs}/{log_name}.err"]
    return cmd + ([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else [])


def _task_shim(job: SlurmJob, *flags: str) -> list[str]:
    return [sys.executable, "-m", "spt_dist.slurm", "task", *flags, f"--scratch={job.scratch}", "--"]


def _slurm_task_env(job: SlurmJob, task: int, node: int, local: int, ntasks: int) -> dict[str, str]:
    """What srun sets in a task's environment (the part the commands read)."""
    return {"SLURM_JOB_ID": str(job.job_id), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node), "SLURM_NTASKS": str(ntasks)}


def _log(logs: str, host: str, task: int | str) -> str:
    return os.path.join(logs, f"{host}-{task}.out")


def _srun_ranks(job: SlurmJob, train: list[str], logs: str, step_env: dict[str, str]) -> Launch:
    g = job.ranks_per_node
    # Slurm's block distribution: node i holds tasks i*g .. i*g+g-1, and the task id is the rank.
    env = dict(step_env, MASTER_ADDR=job.master_addr, MASTER_PORT=str(job.master_port))
    argv = [*_task_shim(job, "--from-slurm"), sys.executable, *train]
    step = with_env(env, [*_srun(job, logs, "%N-%t", g, job.cpus_per_node // g if job.cpus_per_node else None),
                          *argv])
    nodes = [Node(i, host, range(i * g, (i + 1) * g),
                  [Task(f"rank {rank}", dict(env, **_slurm_task_env(job, rank, i, rank - i * g, job.world_size)),
                        argv, _log(logs, host, rank)) for rank in range(i * g, (i + 1) * g)])
             for i, host in enumerate(job.hosts)]
    return step, nodes, {}


def _torchrun_agents(job: SlurmJob, train: list[str], logs: str, step_env: dict[str, str]) -> Launch:
    g = job.ranks_per_node
    # The agent must survive Slurm's SIGUSR1 (its default action kills); the ranks install their own handler.
    argv = [*_task_shim(job, "--ignore-usr1"), sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={job.nodes}", f"--nproc_per_node={g}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={job.master_addr}:{job.master_port}", f"--rdzv_id={job.job_id}", *train]
    step = with_env(step_env, [*_srun(job, logs, "%N-%t", 1, job.cpus_per_node), *argv])
    # c10d numbers the agents by sorted host name (torch's DynamicRendezvousHandler), not by node list order.
    by_name = sorted(job.hosts)
    nodes = []
    for i, host in enumerate(job.hosts):
        node_rank = by_name.index(host)
        env = dict(step_env, **_slurm_task_env(job, i, i, 0, job.nodes))
        agent = Task(f"torchrun agent, node rank {node_rank}", env, argv, _log(logs, host, i))
        nodes.append(Node(i, host, range(node_rank * g, (node_rank + 1) * g), [agent]))
    return step, nodes, {}


def _deepspeed_launcher(job: SlurmJob, train: list[str], logs: str, step_env: dict[str, str]) -> Launch:
    g = job.ranks_per_node
    hostfile = os.path.join(logs, "hostfile")
    # No ssh check: nothing here is started over ssh (DeepSpeed checks whenever it is given a hostfile).
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--no_ssh_check",
              f"--master_addr={job.master_addr}", f"--master_port={job.master_port}"]
    env = dict(step_env)
    if job.nodes == 1:  # the runner starts the node's ranks itself, inside this step (they get Slurm's signal)
        runner += train
    else:
        # DeepSpeed's Slurm runner: `srun -n <world> <launcher_args> --export=ALL,... python -u <script> <args>`,
        # its argv a list (no remote shell, unlike pdsh). The ranks' step overlaps this one (which holds the
        # first node's CPUs); each rank goes through the task shim as under the srun launcher.
        rank_step = _srun(job, logs, "%N-%t", g, job.cpus_per_node // g if job.cpus_per_node else None)[1:]
        runner += ["--launcher=slurm", f"--launcher_args={shlex.join([*rank_step, '--overlap'])}",
                   "--", *_task_shim(job, "--from-slurm")[1:], sys.executable, "-m", *train[1:]]  # not --module
        env.update(MASTER_ADDR=job.master_addr, MASTER_PORT=str(job.master_port))
    argv = [*_task_shim(job, "--ignore-usr1"), *runner]
    step = with_env(env, [*_srun(job, logs, "%N-%t", 1, job.cpus_per_node, nodes=1), f"--nodelist={job.master_addr}",
                          *argv])
    launcher = Task("deepspeed launcher", dict(env, **_slurm_task_env(job, 0, 0, 0, 1)), argv,
                    _log(logs, job.master_addr, 0))
    nodes = [Node(i, host, range(i * g, (i + 1) * g), [launcher] if i == 0 else [],
                 "" if i == 0 else f"ranks started by the deepspeed launcher on {job.master_addr} (its srun step)")
             for i, host in enumerate(job.hosts)]
    return step, nodes, {hostfile: "".join(f"{host} slots={g}\n" for host in job.hosts)}


def _copy_data(job: SlurmJob, copies: Mapping[str, str], logs: str) -> tuple[list[str], list[Task]]:
    """One task per node copies each shard directory (shards, sizes.json, classes.json) to its local copy."""
    script = " && ".join(f"mkdir -p {shlex.quote(local)} && cp -a {shlex.quote(source)}/. {shlex.quote(local)}/"
                         for local, source in copies.items())
    argv = ["bash", "-c", script]
    step = [*_srun(job, logs, "%N-stage-data", 1, None), *argv]
    tasks = [Task("stage data", _slurm_task_env(job, i, i, 0, job.nodes), argv, _log(logs, host, "stage-data"))
             for i, host in enumerate(job.hosts)]
    return step, tasks


def stage_data(cfg: Config, dest: str) -> tuple[dict[str, str], list[str]]:
    """The copies for `--stage-data DEST` (node-local directory -> shard directory) and the overrides that
    point the run at them (same file names)."""
    if not os.path.isabs(dest):
        raise UserError(f"--stage-data: give an absolute node-local directory (got '{dest}')")
    copies: dict[str, str] = {}
    overrides = []
    for key in ("train_shards", "eval_shards"):
        spec = getattr(cfg.data, key)
        if not spec:
            continue
        source, pattern = os.path.split(os.path.abspath(spec))
        if re.search(r"[][{}*?,]", source):
            raise UserError(f"--stage-data: data.{key} must name shards in one directory (got '{spec}')")
        local = os.path.join(dest, os.path.basename(source))
        if copies.setdefault(local, source) != source:
            raise UserError(f"--stage-data: two shard directories are named '{os.path.basename(source)}'")
        overrides.append(f"data.{key}={os.path.join(local, pattern)}")
    return copies, overrides


# --------------------------------------------------------------------------- after the run


def _unfinished_marker(run_dir: str, stage: str) -> tuple[str, bool]:
    """The path that tells, after an exit 0, that the run stopped early with its state saved: a training run
    is finished once metrics.json exists; a score pass stopped early leaves its partial scores."""
    if stage == "train":
        return os.path.join(run_dir, runfiles.METRICS), False
    return os.path.join(run_dir, PARTIAL_SCORES), True


def needs_requeue(returncode: int, run_dir: str, stage: str = "train") -> bool:
    """Exit 0 and unfinished: stopped by a signal after saving, so the job goes back into the queue."""
    path, present = _unfinished_marker(run_dir, stage)
    return returncode == 0 and os.path.exists(path) == present


def requeue_rule(plan: Plan) -> str:
    path, present = _unfinished_marker(plan.run_dir, plan.stage)
    return (f"exit 0 {'with' if present else 'without'} {path} (stopped by a signal, state saved): "
            f"scontrol requeue {plan.job.job_id}; exit 0 otherwise: done; any other exit status: the job's")


# --------------------------------------------------------------------------- command line


def _launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spt_dist.slurm launch", allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", choices=LAUNCHERS, default="srun", help="how ranks start (default srun)")
    parser.add_argument("--stage-data", metavar="DIR",
                        help="copy the shard directories to DIR (absolute, node-local) on every node first")
    parser.add_argument("--dry-run", action="store_true", help="print the job, each node's commands, run nothing")
    parser.add_argument("--nodelist", help="instead of SLURM_JOB_NODELIST, e.g. 'gpu[01-02]'")
    parser.add_argument("--nodes", type=int, help="instead of SLURM_NNODES (alone: hosts node0, node1, ...)")
    parser.add_argument("--gpus-per-node", type=int, help="instead of SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE")
    parser.add_argument("--cpu-ranks-per-node", type=int, help="instead of SLURM_NTASKS_PER_NODE on CPU nodes")
    parser.add_argument("--job-id", type=int, help="instead of SLURM_JOB_ID")
    train = parser.add_argument_group("train.py's arguments (passed on)")
    train.add_argument("--config", action="append", default=[], metavar="YAML")
    train.add_argument("--stage", choices=TRAIN_STAGES)  # spt_dist.train's
    train.add_argument("--resume", metavar="latest|RUN_DIR", help="default: latest")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _run_dir(cfg: Config, resume: str | None) -> str:
    """The run directory the job trains in (its logs go there too)."""
    if resume in (None, "latest"):
        if cfg.output.name is None:
            raise UserError("output.name: not set; a Slurm job resumes its run by name after a requeue "
                            "(--resume latest): give output.name=...")
        return os.path.abspath(os.path.join(cfg.output.dir, cfg.output.name))
    if os.path.isfile(os.path.join(resume, runfiles.STATE_JSON)):
        raise UserError(f"--resume: '{resume}' is a checkpoint; give `latest` or a run directory (a requeued job "
                        "must continue from the newest checkpoint, not this one)")
    return os.path.abspath(resume)


def plan_from_args(argv: list[str], env: Mapping[str, str]) -> tuple[Plan, argparse.Namespace]:
    args = _launch_parser().parse_intermixed_args(argv)
    cfg = load_config(args.config or None, args.overrides)
    run_dir = _run_dir(cfg, args.resume)
    job = SlurmJob.from_env(env, nodelist=args.nodelist, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                            cpu_ranks_per_node=args.cpu_ranks_per_node,
                            job_id=args.job_id)
    copies, staged = stage_data(cfg, args.stage_data) if args.stage_data else ({}, [])
    train_args = [arg for path in args.config for arg in ("--config", path)]
    train_args += ["--stage", args.stage] if args.stage else []
    # The staged overrides come last: they win over the shard paths they were made from.
    train_args += ["--resume", args.resume or "latest", *args.overrides, *staged]
    return make_plan(job, args.launcher, train_args, run_dir, args.stage or "train", copies), args


def describe(plan: Plan) -> str:
    job = plan.job
    lines = [f"job {job.job_id} (restart {job.restart_count}): {job.nodes} node(s) x {job.ranks_per_node} "
             f"{'GPUs' if job.gpus else 'CPU ranks'} = "
             f"{job.world_size} ranks; master {job.master_addr}:{job.master_port}; launcher {plan.launcher}",
             f"run directory: {plan.run_dir}",
             f"logs: {plan.slurm_dir}/<host>-<task>.out and .err",
             f"node-local scratch: {job.scratch} ({', '.join(SCRATCH_DIRS)}, unless set)"]
    for path, content in plan.files.items():
        lines += [f"file {path}:", *(f"  {line}" for line in content.splitlines())]
    lines.append("the batch step runs, in order:")
    lines += [f"  {shlex.join(step)}" for step in plan.steps]
    for node in plan.nodes:
        lines.append(f"node {node.index} {node.host}: ranks {node.ranks.start}-{node.ranks.stop - 1}")
        lines += [f"  {node.note}"] if node.note else []
        for task in node.tasks:
            lines += [f"  {task.label}, log {task.log}:", f"    {shlex.join(task.command())}"]
    lines.append(f"then: {requeue_rule(plan)}")
    return "\n".join(lines)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as a shell says


class _StepSignals:
    """While a step runs, the batch step's stop signals go on to it (srun passes them to every task), once
    each: `--signal=B:USR1@N` or a `kill` of the batch step reach the ranks too. One that came before a step
    started (while this process started, or between steps) means the step is not started at all: srun would
    die of it before setting its handlers. SIGTERM and SIGINT (scancel, or a preemption that Slurm requeues
    itself) also mean: no requeue of ours afterwards. Installed first thing, before the job is read."""

    def __init__(self) -> None:
        self.step: subprocess.Popen | None = None
        self.received: list[signal.Signals] = []
        for sig in _FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        sig = signal.Signals(signum)
        if sig not in self.received:
            self.received.append(sig)
            if self.step is not None and self.step.poll() is None:
                self.step.send_signal(_FORWARDED[sig])

    def run(self, argv: list[str]) -> int:
        self.step = subprocess.Popen(argv)
        return self.step.wait()

    @property
    def cancelled(self) -> bool:
        return signal.SIGTERM in self.received or signal.SIGINT in self.received

    @property
    def names(self) -> str:
        return " and ".join(sig.name for sig in self.received)


def run_plan(plan: Plan, signals: _StepSignals) -> int:
    os.makedirs(plan.slurm_dir, exist_ok=True)  # srun opens the log files there, on the shared file system
    for path, content in plan.files.items():
        write_text(path, content)
    for step in plan.steps:
        if signals.received:
            print(f"spt_dist.slurm: {signals.names} received before the step started; it is not started", flush=True)
            status = 0
        else:
            print(f"spt_dist.slurm: {shlex.join(step)}", flush=True)
            status = _exit_status(signals.run(step))
        if signals.cancelled:
            if _time_limit_reached(plan.job.job_id) and needs_requeue(0, plan.run_dir, plan.stage):
                print("spt_dist.slurm: the time limit ended the job (no --signal, or it came too late); the ranks "
                      f"saved on its SIGTERM: scontrol requeue {plan.job.job_id}", flush=True)
                return _requeue(plan)
            print(f"spt_dist.slurm: {signals.names} received (cancelled or preempted): the ranks saved what they "
                  "could; not requeued", flush=True)
            return status
        if status == 128 + signal.SIGUSR1:  # srun, or a task, ended by the signal before it could handle it
            print("spt_dist.slurm: SIGUSR1 ended a task in its first moments, before its handler was set: the run "
                  f"goes on from its last checkpoint: scontrol requeue {plan.job.job_id}", flush=True)
            return _requeue(plan)
        if status != 0:
            return status
        if signals.received:
            break  # SIGUSR1: the run stops here, to be continued
    if not needs_requeue(0, plan.run_dir, plan.stage):
        return 0
    print(f"spt_dist.slurm: the run stopped early with its state saved: scontrol requeue {plan.job.job_id}",
          flush=True)
    return _requeue(plan)


def _seconds(text: str | None) -> int | None:
    """Slurm's `[D-]HH:MM:SS` (or `MM:SS`) in seconds; None for UNLIMITED and the like."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text or "")
    if not match:
        return None
    days, hours, minutes, secs = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def show_job(job_id: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`scontrol show job` as a mapping (JobState, Reason, Restarts, RunTime, TimeLimit, ...); empty if unknown."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                           env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def _time_limit_reached(job_id: int) -> bool:
    """Whether the job has run its time limit (Slurm's SIGTERM then ends a timeout, not a cancel)."""
    fields = show_job(job_id)
    limit, ran = _seconds(fields.get("TimeLimit")), _seconds(fields.get("RunTime"))
    return limit is not None and ran is not None and ran >= limit


def _requeue(plan: Plan) -> int:
    return _exit_status(subprocess.run(["scontrol", "requeue", str(plan.job.job_id)]).returncode)


def launch(argv: list[str]) -> int:
    signals = _StepSignals()  # first: a stop signal while the job is read is kept, not fatal
    plan, args = plan_from_args(argv, os.environ)
    if args.dry_run:
        print(describe(plan))
        return 0
    if "SLURM_JOB_ID" not in os.environ:
        raise UserError("not inside a Slurm job (no SLURM_JOB_ID): submit with sbatch, or use --dry-run")
    return run_plan(plan, signals)


def run_task(argv: list[str]) -> None:
    """What each Slurm task runs before the command: sets up its environment, then becomes the command."""
    parser = argparse.ArgumentParser(prog="python -m spt_dist.slurm task", allow_abbrev=False)
    parser.add_argument("--from-slurm", action="store_true",
                        help="one rank per task: RANK, LOCAL_RANK, WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID, "
                             "SLURM_NTASKS")
    parser.add_argument("--ignore-usr1", action="store_true",
                        help="a launcher starting the ranks: Slurm's SIGUSR1 would kill it; the ranks handle it")
    parser.add_argument("--scratch", required=True, help=f"node-local directory for {', '.join(SCRATCH_DIRS)}")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    env = os.environ
    if args.from_slurm:
        env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env["SLURM_LOCALID"], WORLD_SIZE=env["SLURM_NTASKS"])
        # A stop signal from here until the rank's handlers are set (its interpreter starting, its imports) stays
        # pending instead of killing it: the mask survives exec, and preemption.install() lifts it.
        signal.pthread_sigmask(signal.SIG_BLOCK, preemption.SIGNALS)
    for var, sub in SCRATCH_DIRS.items():  # per node: ranks of different nodes never share a compile cache
        env.setdefault(var, os.path.join(args.scratch, sub))
        os.makedirs(env[var], exist_ok=True)
    if args.ignore_usr1:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # kept across exec
    os.execvp(args.command[0], args.command)


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"launch": launch, "task": run_task}
    if not argv or argv[0] not in commands:
        print("usage: spt-slurm {launch,task} ... (see `launch --help`)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
