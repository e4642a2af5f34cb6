"""The training entry point: `deepspeed launch/train.py …`, `torchrun … -m spt_dist.train …` or `spt-train …`.

Also runs under srun or as a plain single process. On a machine without GPUs it uses DeepSpeed's CPU
accelerator and gloo by itself.
"""

from __future__ import annotations

import argparse
import os
import sys

from spt_dist import preemption
from spt_dist.cli import TRAIN_STAGES, print_user_error
from spt_dist.errors import Stopped, UserError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spt-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", metavar="YAML",
                        help="run config (see configs/); repeat to compose several, merged in order "
                             "(e.g. a backbone, a method and a task file)")
    parser.add_argument("--stage", default="train", choices=TRAIN_STAGES,
                        help="train (default); score: the score pass alone (scores saved in the run directory); "
                             "allocate: the allocation from saved scores (e.g. with another selection.budget); "
                             "select: score then allocate")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue a run: `latest` (output.dir/output.name's newest checkpoint, or a first start "
                             "if there is none: safe for requeued jobs), a run directory or a checkpoint directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    return parser.parse_intermixed_args(argv)  # options and key=value in any order, e.g. --config a k=v --config b


def main(argv: list[str] | None = None) -> int:
    preemption.install()  # first: a stop signal during start-up stops the run at its first step, saved
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    from spt_dist.config import load_config
    from spt_dist.distributed import (error_of_another_rank, init_distributed, should_say_error,
                                      shutdown_distributed)
    try:
        cfg = load_config(args.config, args.overrides)  # before any process group: fails fast on every rank
        dist_info = init_distributed(cfg.engine.timeout_s)
        # Heavy imports (deepspeed, timm) only once the config is sound.
        if args.stage == "train":
            from spt_dist.trainer import Trainer
            Trainer(cfg, dist_info, resume=args.resume).fit()
        else:
            from spt_dist.selection.stage import run_selection
            run_selection(cfg, dist_info, args.stage, resume=args.resume)
        shutdown_distributed()
    except Stopped as e:  # preempted: saved, and every rank stopped at the same point
        shutdown_distributed()
        if rank == 0:
            print(f"spt_dist: {e}", flush=True)
        return 0
    except UserError as e:
        if should_say_error(str(e)):  # said once, by the rank that met it (rank 0 when all did)
            print_user_error(e, rank=rank)
        shutdown_distributed(wait=False)
        return 2
    except Exception:
        # A collective fails when a peer has exited: if it left a user error behind, that rank has said it.
        if error_of_another_rank() is None:
            raise
        shutdown_distributed(wait=False)
        return 2
    return 0


def run() -> None:
    """`main`, then exit without the interpreter's teardown. Everything is saved and the process group is gone;
    a C++ thread of the collective backends that is still joinable when static objects are destroyed aborts
    the process ("terminate called without an active exception", seen now and then with gloo), failing a
    finished job."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
