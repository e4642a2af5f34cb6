"""Preemption: SIGTERM (a scheduler's kill, forwarded by torchrun and DeepSpeed's launcher), SIGUSR1 (Slurm's
`--signal`) or SIGINT (Ctrl-C) asks the run to stop. The handler only sets a flag; the trainer reads it at the next
step boundary and during evaluation, the score pass after each batch, all ranks together (one of them may have
been signalled first); they save and exit cleanly. A second stop signal ends the process at once, as it would
without us (for a start-up or a collective that hangs), unless it comes within DUPLICATE_S of the first: then it
is a copy of the same request, which launchers make (Slurm signals every task of a step and srun, torchrun's
agent or DeepSpeed's launcher pass their own copy on).

The handlers are installed once per process, as early as the entry point can (`install()`), so a signal during
start-up is kept too and ends the run at its first step boundary instead of killing it half-built.

A launcher can also vanish without a signal reaching the ranks: the single-node `deepspeed` command, killed,
leaves its launch process orphaned and the ranks training on. A rank started by a launcher therefore also
stops when its launcher (or the `deepspeed` command above DeepSpeed's launch process) is gone: a watcher thread
sees it within a second; the rank saves at its next step boundary, and one still there LAUNCHER_GRACE_S later
(stuck in a collective, or on its way out after an error) ends itself, loader workers included.

Once the entry point is on its way out after an unexpected error (`ending()`), a stop signal or the launcher's
exit ends the process at once: nothing is left to save. Torch-free.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
from typing import NoReturn

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DUPLICATE_S = 3.0  # forwarded copies arrive within milliseconds; a deliberate second signal later
LAUNCHER_GRACE_S = 120.0  # from the launcher's exit to the rank's: time for the save at the next step boundary
_DEEPSPEED_LAUNCH = "deepspeed.launcher.launch"
# The launchers whose exit ends their ranks' job (a rank another program started is not watched: a shell script
# that starts ranks in the background may well end before they do).
_LAUNCHERS = ("torch.distributed.run", "torchrun", _DEEPSPEED_LAUNCH, "slurmstepd")


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (None where /proc is not there or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # fields after the name: state, ppid, ...
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _LauncherWatch:
    """Notices that the launcher above this rank is gone: its parent (torchrun, DeepSpeed's launch process,
    slurmstepd) changed, or, under DeepSpeed's launch process, that process's own parent (the `deepspeed`
    command) changed. Only for ranks one of those started: a plain run may outlive its shell."""

    def __init__(self) -> None:
        self.watched: list[tuple[int, int]] = []  # (pid, its parent when we started)
        self.gone_at_start: str | None = None
        if not os.path.isdir("/proc"):
            return
        me, parent = os.getpid(), os.getppid()
        launcher = _cmdline(parent)
        if not any(name in launcher for name in _LAUNCHERS):
            return
        self.watched.append((me, parent))
        if _DEEPSPEED_LAUNCH in launcher:
            grandparent = _parent_of(parent)
            if grandparent is not None and grandparent <= 1:
                # The `deepspeed` command died before this rank started (its launch process was handed to init):
                # nothing will signal this rank, and nothing waits for it.
                self.gone_at_start = f"the exit of its launcher (the deepspeed command above pid {parent})"
            elif grandparent:
                self.watched.append((parent, grandparent))

    def gone(self) -> str | None:
        if self.gone_at_start:
            return self.gone_at_start
        for pid, parent in self.watched:
            if _parent_of(pid) != parent:
                return f"the exit of its launcher (pid {parent})"
        return None


def exit_now(code: int) -> NoReturn:
    """Ends this process at once with status `code`: its loader workers first (they ignore stop signals and
    would otherwise live on, orphaned, until their own check of their parent), then the process itself without
    the interpreter's teardown, which can wait for ever on a worker or on a collective backend's thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(code)


class _Flag:
    def __init__(self) -> None:
        self.received: str | None = None
        self.signalled_at: float | None = None
        self.previous: dict = {}
        self.watch: _LauncherWatch | None = None
        self.ending = False  # on the way out after an error: a stop signal or a lost launcher ends it now

    def handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.ending:
            exit_now(128 + signum)
        if self.signalled_at is not None:
            if time.monotonic() - self.signalled_at < DUPLICATE_S:
                return  # the same request, passed on by a launcher
            # A second stop signal: stop at once, as without our handler (a start-up stuck waiting for its peers,
            # a collective waiting for a dead one or a save that hangs would otherwise ignore every signal).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signalled_at = time.monotonic()
        self.received = signal.Signals(signum).name


_FLAG = _Flag()


def _watch_launcher(watch: _LauncherWatch, poll_s: float = 1.0) -> None:
    """The launcher watcher thread: sets the stop flag once the launcher is gone and ends the process if it
    has not ended by itself LAUNCHER_GRACE_S later (at once when it is already on its way out)."""
    while _FLAG.watch is watch:
        gone = watch.gone()
        if gone is None:
            time.sleep(poll_s)
            continue
        _FLAG.received = _FLAG.received or gone
        deadline = time.monotonic() + LAUNCHER_GRACE_S
        while time.monotonic() < deadline and not _FLAG.ending and _FLAG.watch is watch:
            time.sleep(poll_s)
        if _FLAG.watch is watch:
            print(f"spt_dist: rank {os.environ.get('RANK', '0')}: ending after {gone}", file=sys.stderr, flush=True)
            exit_now(1)
        return


def install() -> None:
    """Catch the stop signals in this process from now on (idempotent; only the main thread may)."""
    if _FLAG.previous or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        _FLAG.previous[sig] = signal.signal(sig, _FLAG.handle)
    # A launcher may have held them back until now (spt_dist.slurm's task shim): one that came is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    _FLAG.watch = _LauncherWatch()
    if _FLAG.watch.watched:
        threading.Thread(target=_watch_launcher, args=(_FLAG.watch,), daemon=True, name="spt_dist-launcher").start()


def ending() -> None:
    """The entry point is on its way out after an error: from now on a stop signal, or the launcher's exit,
    ends the process at once (a wait for the peers on that way is bounded, but need not be waited out)."""
    _FLAG.ending = True


def uninstall() -> None:
    """Restore the previous handlers and forget what was received (a library user's next run starts afresh)."""
    for sig, handler in _FLAG.previous.items():
        signal.signal(sig, handler)
    _FLAG.previous, _FLAG.watch, _FLAG.received, _FLAG.signalled_at = {}, None, None, None
    _FLAG.ending = False


class Preemption:
    """A stage's view of the stop flag. Installs the handlers if the entry point has not (a library user's
    loop); `close()` then restores the previous ones. `received`: what asked to stop, once something has."""

    def __init__(self) -> None:
        self._owner = not _FLAG.previous
        install()

    @property
    def received(self) -> str | None:
        # Read at every step boundary too, not only by the watcher thread (once a second): a launcher's exit is then
        # seen before the signals that may follow it (DeepSpeed's orphaned launch process terminating its ranks).
        if _FLAG.received is None and _FLAG.watch is not None:
            _FLAG.received = _FLAG.watch.gone()
        return _FLAG.received

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        if self._owner:
            uninstall()
            self._owner = False


def received() -> str | None:
    """What asked this process to stop (a signal's name, a lost launcher), or None."""
    return _FLAG.received


def resume_hint(run_dir: str) -> str:
    """How to continue: the same command with --resume, or under Slurm a requeue of this job."""
    lines = [f"resume: run the same command again with --resume {shlex.quote(run_dir)}"]
    if os.environ.get("SLURM_JOB_ID"):
        lines.append(f"        or requeue this job: scontrol requeue {os.environ['SLURM_JOB_ID']} "
                     "(its command must carry --resume latest)")
    return "\n".join(lines)
