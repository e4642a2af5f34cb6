"""The training entry point: `deepspeed launch/train.py …`, `torchrun … -m spt_dist.train …` or `spt-train …`.

Also runs under srun or as a plain single process. On a machine without GPUs it uses DeepSpeed's CPU
accelerator and gloo by itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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
    if rank:  # warnings every rank would print alike (deprecations, "No CUDA runtime" on CPU): rank 0 says them
        warnings.simplefilter("ignore")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from spt_dist.config import load_config
    from spt_dist.distributed import ErrorExchange, init_distributed, lost_peers, shutdown_distributed
    errors = None
    try:
        cfg = load_config(args.config, args.overrides)  # before any process group: fails fast on every rank
        dist_info = init_distributed(cfg.engine.timeout_s)
        errors = ErrorExchange()
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
        if errors.should_say(str(e)) if errors else rank == 0:  # once, by the rank that met it (0 when all did)
            print_user_error(e, rank=rank)
        if errors:
            errors.hand_over()
        shutdown_distributed(wait=False)
        return 2
    except Exception as e:
        # A collective fails when a peer has exited: if it left a user error behind, that rank has said it; if
        # it died (killed, out of memory), its own output says how, and this rank says it lost it.
        if errors is None or errors.of_another_rank() is None:
            if not lost_peers(e):
                raise
            print_user_error(UserError(f"lost the other ranks ({' '.join(str(e).split())[:200]}): one of them "
                                       "stopped or died; its output says why"), rank=rank)
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
