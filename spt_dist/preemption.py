"""Preemption: SIGTERM (a scheduler's kill, forwarded by torchrun) or SIGUSR1 (Slurm's `--signal`) asks the run
to stop. The handler only sets a flag; the trainer reads it at the next step boundary, all ranks together (one
of them may have been signalled first), saves a checkpoint and exits cleanly."""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def resume_hint(run_dir: str) -> str:
    """How to continue: the same command with --resume, or under Slurm a requeue of this job."""
    lines = [f"resume: run the same command again with --resume {run_dir}"]
    if os.environ.get("SLURM_JOB_ID"):
        lines.append(f"        or requeue this job: scontrol requeue {os.environ['SLURM_JOB_ID']} "
                     "(its command must carry --resume latest)")
    return "\n".join(lines)
