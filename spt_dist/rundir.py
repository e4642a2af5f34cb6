"""The run directory every stage writes into: <output.dir>/<output.name>, with the resolved config, and the lock
that keeps a second job out of it while one is running."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sys
import time

from spt_dist.atomic import make_dirs
from spt_dist.config import Config, save_config
from spt_dist import runfiles
from spt_dist.distributed import DistInfo, broadcast_object
from spt_dist.errors import UserError


_HELD: dict[str, int] = {}  # run directory -> the open file that holds its lock, for this process's life


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file; it closes its copy so that the lock goes
    with the process that took it, not with the last of its children."""
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_run_dir(run_dir: str) -> None:
    """An exclusive lock on <run_dir>/.lock (fcntl), held until this process ends: the OS releases it however the
    process ends, so a crashed or killed job never leaves it behind. A second job on the same directory (the
    same output.name, or a stage run alone beside a training run) fails with one line naming the holder."""
    if run_dir in _HELD:
        return
    path = os.path.join(run_dir, runfiles.LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # a read-only file system, a directory of someone else's
        raise UserError(f"output.dir: cannot write '{path}' ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1024).decode(errors="replace").strip() or "a job that has not said who it is"
        os.close(fd)
        raise UserError(f"output.name: the run directory {run_dir} is in use by another job ({holder}); wait for "
                        "it to end, stop it, or choose another output.name") from None
    except OSError as e:  # a file system without locks (some NFS setups): go on, but say what is not guarded
        os.close(fd)
        print(f"spt_dist: warning: cannot lock {run_dir} ({e.strerror}): a second job there would not be noticed",
              file=sys.stderr, flush=True)
        return
    job = os.environ.get("SLURM_JOB_ID")
    holder = f"host {socket.gethostname()}, pid {os.getpid()}{', Slurm job ' + job if job else ''}, since " \
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.write(fd, (holder + "\n").encode())
    _HELD[run_dir] = fd


def _clear_for_new_training(run_dir: str, overwrite: bool) -> None:
    """A new training run in a directory another one trained in would mix its checkpoints and event files with
    the old ones: refused, or (output.overwrite) the old run's outputs are removed first."""
    def there(name: str) -> bool:
        path = os.path.join(run_dir, name)
        return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))

    old = [name for name in runfiles.TRAINING_OUTPUTS if there(name)]
    if not old:
        return
    if not overwrite:
        raise UserError(f"output.name: {run_dir} already holds a training run ({', '.join(old)}); continue it with "
                        "--resume latest, start it over with output.overwrite=true, or choose another output.name")
    for name in [*old, runfiles.TENSORBOARD]:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def prepare_run_dir(cfg: Config, dist_info: DistInfo, stage: str, run_dir: str | None = None) -> str:
    """Creates the directory on rank 0, locks it (see lock_run_dir) and writes `config.yaml`
    (`config-<stage>.yaml` for a stage run alone, so re-running the allocation with another budget keeps the score
    pass's config). Collective. `run_dir`: an existing run's directory (a resume), instead of
    output.dir/output.name."""
    name = cfg.output.name or f"{cfg.model.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fresh = run_dir is None and stage == "train"
    run_dir = broadcast_object(run_dir or os.path.abspath(os.path.join(cfg.output.dir, name)))
    error = None
    if dist_info.is_main:
        try:
            make_dirs(run_dir, "output.dir")
            lock_run_dir(run_dir)  # before anything in it is written
            if fresh:
                _clear_for_new_training(run_dir, cfg.output.overwrite)
            save_config(cfg, os.path.join(run_dir, runfiles.stage_config(stage)))
        except UserError as e:
            error = str(e)
    error = broadcast_object(error)  # collective: every rank stops on rank 0's mistake
    if error:
        raise UserError(error)
    return run_dir


def open_run(cfg: Config, dist_info: DistInfo, stage: str, resume: str | None) -> tuple[str, str | None, list[str]]:
    """The run directory, the checkpoint to continue from (None: start afresh) and warnings about damaged
    checkpoints skipped for an older one. Collective.

    resume None: a new run. `latest`: this run's (output.dir/output.name) newest intact checkpoint if it has
    one, else a first start, so a requeued job can always pass it. A path: that checkpoint, or a run
    directory's newest intact one; the run goes on in the directory that holds it."""
    from spt_dist.checkpoint import find_checkpoint, run_dir_of  # noqa: PLC0415 - torch-heavy; after the config

    if resume is None:
        return prepare_run_dir(cfg, dist_info, stage), None, []
    if resume == "latest" and cfg.output.name is None:
        raise UserError("--resume latest: set output.name (without it each launch makes a new, timestamped "
                        "run directory), or give --resume the run directory")

    def locate() -> tuple[str | None, str | None, list[str], str | None]:  # on rank 0; a mistake is a message
        try:
            if resume == "latest":
                run_dir = os.path.abspath(os.path.join(cfg.output.dir, cfg.output.name))
                make_dirs(run_dir, "output.dir")
            else:
                path = os.path.abspath(resume)
                run_dir = run_dir_of(path) if os.path.isfile(os.path.join(path, runfiles.STATE_JSON)) else path
            if os.path.isdir(run_dir):
                lock_run_dir(run_dir)  # first: a busy run directory is refused before its checkpoints are read
            if resume == "latest":
                return run_dir, *find_checkpoint(resume, run_dir), None
            checkpoint, warnings = find_checkpoint(resume, None)
            return run_dir_of(checkpoint), checkpoint, warnings, None
        except UserError as e:
            return None, None, [], str(e)

    run_dir, checkpoint, warnings, error = broadcast_object(locate() if dist_info.is_main else None)
    if error:
        raise UserError(error)
    return prepare_run_dir(cfg, dist_info, stage, run_dir), checkpoint, warnings
