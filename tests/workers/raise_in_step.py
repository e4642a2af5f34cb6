"""Run under a launcher: spt_dist's training command, where the ranks in FAIL_RANKS ("0", "1", "0,1") fail
inside training step FAIL_STEP's forward pass: FAIL_MODE=raise (default) raises an unexpected exception (an
AssertionError, as a model given images of the wrong size does); FAIL_MODE=user raises a user error (as a file
only that rank reads would); FAIL_MODE=signal has the rank signalled (SIGTERM) first, then raises what a
DeepSpeed op build interrupted by that signal raises; FAIL_MODE=hang never returns (a deadlock), and the launcher-gone grace is cut to
5 s so a test can see a stuck rank end after its launcher is killed; FAIL_MODE=save raises inside the first
checkpoint save instead (while the rank writes its own files), not in a step.

usage: torchrun --nproc_per_node 2 tests/workers/raise_in_step.py --config ... key=value ...
"""

import os
import signal
import threading

import torch.nn.functional as F

from spt_dist import checkpoint, preemption
from spt_dist.errors import UserError
from spt_dist.train import run

_cross_entropy = F.cross_entropy
_calls = 0


def _failing_cross_entropy(*args, **kwargs):
    global _calls
    _calls += 1
    if _calls >= int(os.environ["FAIL_STEP"]) and os.environ.get("RANK", "0") in os.environ["FAIL_RANKS"].split(","):
        mode = os.environ.get("FAIL_MODE", "raise")
        if mode == "user":
            raise UserError(f"injected user error in step {_calls}")
        if mode == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("Error building extension 'deepspeed_shm_comm': interrupted by user")
        if mode == "hang":
            print(f"rank {os.environ.get('RANK', '0')} hangs", flush=True)
            threading.Event().wait()
        raise AssertionError(f"injected failure in step {_calls}")
    return _cross_entropy(*args, **kwargs)


def _failing_capture_rng():
    if os.environ.get("RANK", "0") in os.environ["FAIL_RANKS"].split(","):
        raise KeyError("injected save bug")
    return _capture_rng()


if os.environ.get("FAIL_MODE") == "save":
    _capture_rng = checkpoint.capture_rng
    checkpoint.capture_rng = _failing_capture_rng
else:
    F.cross_entropy = _failing_cross_entropy
preemption.LAUNCHER_GRACE_S = 5.0
run()
