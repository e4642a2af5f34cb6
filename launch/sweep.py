"""Scaling studies: `python launch/sweep.py sweeps/tiny.yaml` runs a grid of runs here, one after another;
`--slurm` submits each as a Slurm job instead; `--dry-run` prints the commands. Then
`python -m spt_dist.report <sweep directory>` gathers the results. The sweep file format: spt_dist/sweep.py.
"""

import argparse
import sys

from spt_dist.errors import UserError
from spt_dist.sweep import load_sweep, run_local, submit_slurm, write_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (see sweeps/)")
    parser.add_argument("--output-dir", help="where the sweep directory goes (default: the runs' output.dir)")
    parser.add_argument("--slurm", action="store_true", help="submit each run with sbatch launch/slurm/train.sbatch")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="--slurm: GPUs (ranks) per node")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="--slurm: extra sbatch argument, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    parser.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                        help="--slurm: argument for the job script, e.g. --launch-arg=--launcher=torchrun (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        if args.gpus_per_node < 1:
            raise UserError(f"--gpus-per-node: must be >= 1 (got {args.gpus_per_node})")
        sweep = load_sweep(args.sweep, args.output_dir)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.directory}", flush=True)
        if not args.dry_run:
            write_manifest(sweep, args.sweep)
        if args.slurm:
            failed = submit_slurm(sweep, args.gpus_per_node, args.sbatch_arg, args.launch_arg, args.dry_run)
        else:
            failed = run_local(sweep, args.dry_run, say=lambda line: print(line, flush=True))
    except UserError as e:
        print(f"spt_dist: error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"{failed} run(s) failed", file=sys.stderr)
        return 1
    if not args.dry_run and not args.slurm:
        print(f"report: python -m spt_dist.report {sweep.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
