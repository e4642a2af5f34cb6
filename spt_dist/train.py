"""The training entry point: `deepspeed launch/train.py …`, `torchrun … -m spt_dist.train …` or `spt-train …`.

Also runs under srun or as a plain single process. On a machine without GPUs it uses DeepSpeed's CPU
accelerator and gloo by itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from spt_dist import preemption
from spt_dist.cli import TRAIN_STAGES, print_user_error
from spt_dist.errors import PeerFailed, Stopped, UserError

_PEER_REPORT_S = 10.0  # how long a rank waits for the report of the peer whose failure stopped it


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
    # No shutdown_distributed on the way out after an error: leaving the group can hang with a collective in
    # flight, or reach for a store whose host (rank 0) has gone; exit_now ends the process without it.
    except UserError as e:
        _report(errors, str(e), lambda e=e: print_user_error(e, rank=rank), alone=rank == 0)  # once (0's when all met it)
        return 2
    except PeerFailed as e:  # another rank's unexpected error, which that rank is reporting
        preemption.ending()
        if errors is None or not errors.another_said(wait_s=_PEER_REPORT_S):
            print_user_error(UserError(f"stopped: {e}"), rank=rank)
        return 2
    except Exception as e:
        preemption.ending()  # from here a stop signal or the launcher's exit ends this rank at once
        if errors is not None and errors.another_said():
            return 2  # a consequence of another rank's error (a collective that lost it): that rank has said why
        if lost_peers(e):  # a peer died (killed, out of memory) without a word: its own output says how
            print_user_error(UserError(f"lost the other ranks ({_one_line(e)}): one of them stopped or died; its "
                                       "output says why"), rank=rank)
            return 2
        stop = preemption.received()
        if stop:  # a start-up step (DeepSpeed's op build, the rendezvous) cut short by the stop signal
            _report(errors, "stopped", lambda e=e: print(
                f"spt_dist: stopped by {stop} ({_one_line(e)}) before it could save; run the same command again "
                "(with --resume latest once the run has a checkpoint)", flush=True), alone=rank == 0)
            return 0
        # Our own failure (a bug, or an environment we did not foresee): every other rank is told through the
        # job's store and ends at once, rather than waiting in its next collective until the timeout.
        _report(errors, _one_line(e), lambda e=e: print(
            f"spt_dist: rank {rank}: unexpected error, every rank stops:\n"
            f"{''.join(traceback.format_exception(e)).rstrip()}", file=sys.stderr, flush=True), alone=True)
        return 1
    return 0


def _report(errors, message: str, say, alone: bool) -> None:
    """Has `message` said once in the job (ErrorExchange.report); before the process group exists (errors is
    None), by this rank if `alone`."""
    if errors is not None:
        errors.report(message, say)
    elif alone:
        say()


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def run() -> None:
    """`main`, then exit without the interpreter's teardown (preemption.exit_now). Everything is saved by then.
    A C++ thread of the collective backends that is still joinable when static objects are destroyed aborts
    the process ("terminate called without an active exception", seen now and then with gloo), failing a
    finished job; after an error, the teardown can wait for ever on a loader worker."""
    preemption.exit_now(main())


if __name__ == "__main__":
    run()
