"""Scaling studies: a grid (backbone × method × budget × world size × seed × ...) expanded into runs, run here
one after another or submitted to Slurm, each in its own directory under <output.dir>/<sweep name>/.

A sweep file (YAML):

    name: vit-scaling                      # the sweep's directory under output.dir (default: runs)
    config: [configs/recipes/vtab.yaml]    # config files every run starts from (merged in order)
    overrides: {optim.epochs: 100}         # dotted keys every run sets
    grid:                                  # one mapping (a product), or a list of them (a union of products)
      - config.backbone: [configs/backbones/vit_b16.yaml, configs/backbones/vit_l16.yaml]
        method.name: [lora, full]
        world_size: [8]
      - config.backbone: [configs/backbones/vit_b16.yaml, configs/backbones/vit_l16.yaml]
        method.name: [spt_lora]
        selection.budget: [0.005, 0.01, 0.02]
        seed: [0, 1, 2]
        world_size: [8, 16]

Grid keys: any dotted config key; `world_size` (ranks of the run); `config.<axis>` (config files appended
after `config`, e.g. a backbone or a task axis). A run that has finished (metrics.json) is skipped, and a
stopped one continues (`--resume latest`), so a sweep can simply be started again.
"""

from __future__ import annotations

import argparse
import importlib.resources
import itertools
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from spt_dist.atomic import write_json
from spt_dist import runfiles
from spt_dist.cli import TRAIN_MODULE, command
from spt_dist.config import load_config, per_rank_batch_size, safe_yaml
from spt_dist.data.shards import read_json
from spt_dist.errors import UserError

# The job script (launch/slurm/train.sbatch in the repository), shipped inside the package.
SBATCH = str(importlib.resources.files("spt_dist") / "train.sbatch")
_SWEEP_KEYS = ("name", "config", "overrides", "grid")


@dataclass(frozen=True)
class Run:
    name: str  # its directory under the sweep directory
    configs: tuple[str, ...]
    overrides: tuple[str, ...]  # key=value, the sweep's then the grid point's
    world_size: int

    def train_args(self, sweep_dir: str) -> list[str]:
        """spt_dist.train's arguments for this run."""
        args = [a for path in self.configs for a in ("--config", path)]
        return args + ["--resume", "latest", *self.overrides, f"output.dir={_yaml_scalar(sweep_dir)}",
                       f"output.name={_yaml_scalar(self.name)}"]


@dataclass
class Sweep:
    name: str
    directory: str  # <output.dir>/<name>
    runs: list[Run] = field(default_factory=list)


def _as_overrides(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        nested = [k for k, v in value.items() if isinstance(v, dict)]
        if nested:  # `optim: {epochs: 2}` would replace the whole section, dropping the recipe's other keys
            raise UserError(f"{where}: {nested[0]}: give dotted keys (e.g. {nested[0]}.KEY: VALUE), not a section")
        return [f"{k}={_yaml_scalar(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise UserError(f"{where}: expected a mapping of dotted keys, or a list of key=value")


def _yaml_scalar(value: Any) -> str:
    """A value as override text that load_config parses back to the same value."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _slug(key: str, value: Any) -> str:
    """A short, file-name-safe label of one grid coordinate, e.g. `vit_b16`, `spt_lora`, `budget0.01`, `ws16`."""
    if key.startswith("config."):
        text = os.path.splitext(os.path.basename(str(value)))[0]
    elif key == "world_size":
        text = f"ws{value}"
    elif key == "seed":
        text = f"seed{value}"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{key.rsplit('.', 1)[-1]}{value}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def _points(grid: Any, path: str) -> list[dict[str, Any]]:
    """Every point of a grid: a mapping key -> list of values (a product) or a list of such mappings."""
    products = grid if isinstance(grid, list) else [grid]
    points: list[dict[str, Any]] = []
    for i, product in enumerate(products):
        where = f"{path}: grid" + (f"[{i}]" if isinstance(grid, list) else "")
        if not isinstance(product, dict) or not product:
            raise UserError(f"{where}: expected a mapping of key -> list of values")
        for key, values in product.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}.{key}: expected a non-empty list of values (got {values!r})")
        keys = list(product)
        points += [dict(zip(keys, combo)) for combo in itertools.product(*(product[k] for k in keys))]
    return points


def load_sweep(path: str, output_dir: str | None = None) -> Sweep:
    """Reads a sweep file and expands it into runs; every run's config is loaded and validated here, so a
    mistake in any grid point stops the sweep before anything runs (one line naming the point)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = safe_yaml(f) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"sweep: no such file '{path}'") from None
    except UnicodeDecodeError:
        raise UserError(f"sweep: '{path}' is not a text file (YAML in UTF-8)") from None
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None)
        raise UserError(f"sweep: '{path}' is not valid YAML{f' ({why})' if why else ''}") from None
    if not isinstance(spec, dict):
        raise UserError(f"sweep: '{path}' must hold a mapping")
    unknown = sorted(set(spec) - set(_SWEEP_KEYS))
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(_SWEEP_KEYS)})")
    if "grid" not in spec:
        raise UserError(f"{path}: grid: missing (key -> list of values)")
    name = str(spec.get("name") or os.path.splitext(os.path.basename(path))[0])
    base_configs = spec.get("config") or []
    base_configs = [base_configs] if isinstance(base_configs, str) else list(base_configs)
    base_overrides = _as_overrides(spec.get("overrides") or {}, f"{path}: overrides")

    points = _points(spec["grid"], path)
    if not points:
        raise UserError(f"{path}: grid: no points (give key -> list of values)")
    varying = [k for k in dict.fromkeys(k for p in points for k in p) if len({repr(p.get(k)) for p in points}) > 1]
    runs = []
    first_cfg = None
    for index, point in enumerate(points):
        # Absolute: a run may start from another directory (a Slurm job's, or a later re-run of the sweep).
        configs = [os.path.abspath(str(p)) for p in base_configs]
        configs += [os.path.abspath(str(v)) for k, v in point.items() if k.startswith("config.")]
        overrides = base_overrides + [f"{k}={_yaml_scalar(v)}" for k, v in point.items()
                                      if not k.startswith("config.") and k != "world_size"]
        world_size = point.get("world_size", 1)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise UserError(f"{path}: grid point {index}: world_size must be a whole number >= 1 (got {world_size!r})")
        try:
            cfg = load_config(configs, overrides)
            per_rank_batch_size(cfg, world_size)
        except UserError as e:
            raise UserError(f"{path}: grid point {index} ({', '.join(f'{k}={v}' for k, v in point.items())}): {e}") from None
        first_cfg = first_cfg or cfg
        # The index keeps names unique; the label says what the point is.
        run_name = f"{index:03d}-" + ("-".join(_slug(k, point[k]) for k in varying if k in point) or "run")
        runs.append(Run(run_name, tuple(configs), tuple(overrides), world_size))
    out = output_dir or first_cfg.output.dir
    return Sweep(name, os.path.abspath(os.path.join(out, name)), runs)


def is_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, runfiles.METRICS))


def check_unchanged(run: Run, sweep_dir: str) -> None:
    """A run directory from an earlier start of the sweep must hold the settings the sweep gives it now: an
    edited sweep would otherwise skip runs with stale results, or continue them under other settings."""
    saved_path = os.path.join(sweep_dir, run.name, runfiles.CONFIG)
    if not os.path.isfile(saved_path):
        return
    with open(saved_path) as f:
        saved = yaml.safe_load(f) or {}
    now = load_config(list(run.configs), list(run.overrides)).to_dict()
    for section, values in now.items():
        if section == "output":
            continue
        for key, value in values.items() if isinstance(values, dict) else [(None, values)]:
            if key == "batch_size" and section == "data" and values.get("global_batch_size"):
                continue  # resolved from the global batch when the run starts
            was = saved.get(section) if key is None else (saved.get(section) or {}).get(key)
            if was != value:
                name = section if key is None else f"{section}.{key}"
                raise UserError(f"run {run.name}: {name} is {value!r} in the sweep but {was!r} in {saved_path}: "
                                "give the edited sweep another name, or remove that run directory")


def write_manifest(sweep: Sweep, source: str) -> None:
    """sweep.json: which runs make up the sweep (the report reads run directories; this says what to expect)."""
    os.makedirs(sweep.directory, exist_ok=True)
    write_json(os.path.join(sweep.directory, "sweep.json"), {
        "name": sweep.name, "source": os.path.abspath(source),
        "runs": [dict(name=r.name, configs=list(r.configs), overrides=list(r.overrides), world_size=r.world_size)
                 for r in sweep.runs]})


# ---------------------------------------------------------------------------------------------- running here


def local_command(run: Run, sweep_dir: str) -> list[str]:
    """One run on this machine: torchrun with `world_size` processes (CPU ranks, or one per GPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.world_size}",
            "-m", TRAIN_MODULE, *run.train_args(sweep_dir)]


def run_local(sweep: Sweep, dry_run: bool = False, say=print) -> int:
    """Runs every unfinished run, one after another; a failed run is reported and the others still run.
    Returns the number of failed runs. Each run's output goes to <sweep>/logs/<run>.log."""
    failed = []
    logs = os.path.join(sweep.directory, runfiles.SWEEP_LOGS)
    for i, run in enumerate(sweep.runs, 1):
        run_dir = os.path.join(sweep.directory, run.name)
        command = local_command(run, sweep.directory)
        check_unchanged(run, sweep.directory)
        if is_finished(run_dir):
            say(f"[{i}/{len(sweep.runs)}] {run.name}: finished earlier, skipped")
            continue
        if dry_run:
            say(shlex.join(command))
            continue
        os.makedirs(logs, exist_ok=True)
        env = dict(os.environ)
        # Ranks share this machine's cores: one thread each unless the user chose otherwise.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // run.world_size)))
        start = time.perf_counter()
        log_path = os.path.join(logs, f"{run.name}.log")
        with open(log_path, "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        took = time.perf_counter() - start
        if code == 0 and is_finished(run_dir):
            say(f"[{i}/{len(sweep.runs)}] {run.name}: done in {took:.0f} s")
        else:
            failed.append(run.name)
            say(f"[{i}/{len(sweep.runs)}] {run.name}: FAILED (exit {code}) after {took:.0f} s; log: {log_path}")
    return len(failed)


# ---------------------------------------------------------------------------------------------- Slurm


def sbatch_command(run: Run, sweep: Sweep, gpus_per_node: int, extra: list[str],
                   launch_args: list[str] = (), cpu: bool = False) -> list[str]:
    """`sbatch` for one run through the job script (train.sbatch): as many whole nodes as the world size needs
    (one node with fewer GPUs for a smaller run). `extra`: sbatch's own options; `launch_args`: the job
    script's (spt_dist.slurm launch: --launcher, --stage-data). `cpu`: nodes without GPUs, `gpus_per_node`
    CPU ranks each (the job asks for --gpus-per-node=0)."""
    flag = "--cpu-ranks-per-node" if cpu else "--gpus-per-node"
    nodes = math.ceil(run.world_size / gpus_per_node)
    if run.world_size > gpus_per_node and run.world_size % gpus_per_node:
        raise UserError(f"world_size {run.world_size} of run {run.name}: not a multiple of {flag} "
                        f"{gpus_per_node} (multi-node runs use whole nodes)")
    per_node = min(run.world_size, gpus_per_node)
    logs = os.path.join(sweep.directory, runfiles.SWEEP_LOGS)
    # The job script finds this interpreter wherever the sweep was started from.
    return ["sbatch", f"--job-name={sweep.name}-{run.name}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
            f"--gpus-per-node={0 if cpu else per_node}", f"--output={logs}/{run.name}-%j.out",
            f"--export=ALL,SPT_PYTHON={sys.executable}", *extra, SBATCH, *launch_args, *run.train_args(sweep.directory)]


JOBS_FILE = "slurm_jobs.json"  # run name -> the Slurm job id it was last submitted as


def _live_jobs(job_ids: list[str]) -> set[str]:
    """The ids among `job_ids` that Slurm still has queued or running."""
    if not job_ids or shutil.which("squeue") is None:
        return set()
    listed = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={','.join(job_ids)}"],
                            capture_output=True, text=True)
    return set(listed.stdout.split())


def submit_slurm(sweep: Sweep, gpus_per_node: int, extra: list[str], launch_args: list[str] = (),
                 dry_run: bool = False, say=print, cpu: bool = False) -> int:
    """Submits every run that is neither finished nor still queued or running (its last job, from
    slurm_jobs.json, is in squeue) as its own job. Returns the number of failed submissions."""
    jobs_path = os.path.join(sweep.directory, JOBS_FILE)
    jobs = read_json(jobs_path) or {}
    live = _live_jobs(sorted({jobs[r.name] for r in sweep.runs if r.name in jobs}))
    commands = []
    for run in sweep.runs:  # every command first: a mistake must not leave half of the sweep submitted
        check_unchanged(run, sweep.directory)
        if is_finished(os.path.join(sweep.directory, run.name)):
            say(f"# {run.name}: finished earlier, not submitted")
        elif jobs.get(run.name) in live:
            say(f"# {run.name}: job {jobs[run.name]} is still queued or running, not submitted")
        else:
            commands.append((run, sbatch_command(run, sweep, gpus_per_node, extra, launch_args, cpu)))
    if commands and not dry_run and shutil.which("sbatch") is None:
        raise UserError("--slurm: no `sbatch` on PATH (run this on a Slurm login node, or use --dry-run)")
    failed = 0
    for run, sbatch in commands:
        say(shlex.join(sbatch))
        if dry_run:
            continue
        os.makedirs(os.path.join(sweep.directory, runfiles.SWEEP_LOGS), exist_ok=True)
        submitted = subprocess.run([sbatch[0], "--parsable", *sbatch[1:]], capture_output=True, text=True)
        if submitted.returncode != 0:
            failed += 1
            say(f"# {run.name}: sbatch failed: {submitted.stderr.strip()}")
            continue
        jobs[run.name] = submitted.stdout.strip().split(";")[0]  # --parsable: "jobid[;cluster]"
        write_json(jobs_path, jobs)
        say(f"# {run.name}: job {jobs[run.name]}")
    return failed


@command
def main(argv: list[str] | None = None) -> int:
    """`spt-sweep sweeps/tiny.yaml` (or `python launch/sweep.py …`) runs a grid of runs here, one after
    another; `--slurm` submits each as a Slurm job instead; `--dry-run` prints the commands. Then
    `spt-report <sweep directory>` gathers the results."""
    parser = argparse.ArgumentParser(prog="spt-sweep", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (see sweeps/)")
    parser.add_argument("--output-dir", help="where the sweep directory goes (default: the runs' output.dir)")
    parser.add_argument("--slurm", action="store_true", help="submit each run with sbatch (the train.sbatch job script)")
    per_node = parser.add_mutually_exclusive_group()
    per_node.add_argument("--gpus-per-node", type=int, default=8, help="--slurm: GPUs (ranks) per node (default 8)")
    per_node.add_argument("--cpu-ranks-per-node", type=int,
                          help="--slurm on nodes without GPUs: ranks per node (the jobs ask for no GPU)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="--slurm: extra sbatch argument, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    parser.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                        help="--slurm: argument for the job script, e.g. --launch-arg=--launcher=torchrun (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    cpu = args.cpu_ranks_per_node is not None
    per_node = args.cpu_ranks_per_node if cpu else args.gpus_per_node
    if per_node < 1:
        raise UserError(f"{'--cpu-ranks-per-node' if cpu else '--gpus-per-node'}: must be >= 1 (got {per_node})")
    sweep = load_sweep(args.sweep, args.output_dir)
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.directory}", flush=True)
    if not args.dry_run:
        write_manifest(sweep, args.sweep)
    if args.slurm:
        failed = submit_slurm(sweep, per_node, args.sbatch_arg, args.launch_arg, args.dry_run, cpu=cpu)
    else:
        failed = run_local(sweep, args.dry_run, say=lambda line: print(line, flush=True))
    if failed:
        print(f"{failed} run(s) failed", file=sys.stderr)
        return 1
    if not args.dry_run and not args.slurm:
        print(f"report: spt-report {shlex.quote(sweep.directory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
