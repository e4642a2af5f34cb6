"""What every command-line entry point shares: a user's mistake (UserError) ends as one line on stderr and
exit status 2, never a traceback. Torch-free."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from spt_dist.errors import UserError

# The training command, as a module (launchers run `python -m`, `torchrun -m`, `deepspeed --module` with it, so
# no file needs finding), and its stages.
TRAIN_MODULE = "spt_dist.train"
TRAIN_STAGES = ("train", "score", "allocate", "select")


def print_user_error(error: UserError, rank: int = 0) -> None:
    """`rank`: a rank other than 0 names itself (the error is its own, the others did not meet it)."""
    print(f"spt_dist: error: {f'rank {rank}: ' if rank else ''}{error}", file=sys.stderr, flush=True)


def command(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wraps an entry point `main(argv) -> exit status` (None counts as 0) with the one-line error rule."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except UserError as e:
            print_user_error(e)
            return 2
    return run
