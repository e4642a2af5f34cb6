"""Process-group setup: NCCL on CUDA, gloo on CPU; also works as a plain single process (no launcher).

The collectives below also work without any process group (a library user's plain loop): a world of one."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from spt_dist.preemption import exit_now


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Joins the job started by torchrun / the deepspeed launcher / srun, or forms a world of one."""
    if "RANK" not in os.environ:  # `python launch/train.py`: a one-process world
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        # DeepSpeed picks its accelerator on import; on a machine without GPUs it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_distributed(wait: bool = True) -> None:
    """Leaves the process group. A process that exits with the backend's threads still running can abort
    ("terminate called without an active exception") and fail the job after its work is done.
    `wait=False` on error paths: the other ranks may never reach a barrier."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_to_main(obj) -> list | None:
    """Every rank's picklable object, in rank order, on rank 0 (None on the others)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sums a CPU tensor over ranks in place and returns it (NCCL takes CUDA tensors only: a round trip there)."""
    if not dist.is_initialized():
        return t
    if dist.get_backend() == "nccl":
        on_device = t.cuda()
        dist.all_reduce(on_device)
        t.copy_(on_device.cpu())
    else:
        dist.all_reduce(t)
    return t


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's CPU tensor of the same shape, in rank order (on CPU)."""
    if not dist.is_initialized():
        return [t]
    on = t.cuda() if dist.get_backend() == "nccl" else t
    out = [torch.empty_like(on) for _ in range(dist.get_world_size())]
    dist.all_gather(out, on)
    return [x.cpu() for x in out]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums a few numbers over ranks (in float64, so counts stay exact)."""
    return all_reduce_(torch.tensor(values, dtype=torch.float64)).tolist()


def all_gather_float(value: float) -> list[float]:
    """Every rank's value of one number, in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# --------------------------------------------------------------------------- an error on some ranks only

_ERROR_KEY = "spt_dist/error/{}"
_ERRORS_KEY = "spt_dist/errors"  # how many ranks have posted one: what the watchers poll (one request each)
_SAID_KEY = "spt_dist/said"  # how many of those have printed theirs, or decided not to
_SEEN_KEY = "spt_dist/seen/{}"  # a rank has read another's error and is going
_CLAIM_KEY = "spt_dist/claim/{}"  # per message (its digest): how many ranks meant to print it; the first does
_SAY_WAIT_S = 5.0  # the longest a rank waits for another to say its error before this rank's exit ends the job


def _default_store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError):
        return None


class ErrorExchange:
    """How the ranks of a job end on an error only some of them meet (a user error in a file only one rank reads
    or writes; an unexpected exception in one rank's step): the rank that meets it posts it in the job's store and
    says it (`report`); the others, whichever collective they wait in, see it posted (a watcher thread: one store
    request per rank every half second, less often on large jobs), let it be said, say nothing and exit too
    (status 2) within about a second, rather than wait in a collective until its timeout. When every rank meets
    the same error, rank 0 alone says it. A launcher ends the whole job as soon as one rank exits, so no rank
    exits while a posted error is still unsaid (up to _SAY_WAIT_S). Rank 0 may host the store (deepspeed
    launcher, srun): after its own error it waits until the others have seen it before it exits. No-op on one
    rank."""

    def __init__(self, poll_s: float = 0.5) -> None:
        self.store, self.me, self.world = _default_store(), rank(), world_size()
        self.own = False  # this rank met an error of its own: its watcher stands down
        if self.store is not None and self.world > 1:
            poll_s *= max(1.0, self.world / 64)  # at most about 128 requests a second to the store
            threading.Thread(target=self._watch, args=(poll_s,), daemon=True, name="spt_dist-errors").start()

    def _watch(self, poll_s: float) -> None:
        try:
            while not self.own:
                if self.store.add(_ERRORS_KEY, 0) and not self.own:
                    self._wait_said()
                    if self.own:  # this rank met its own error meanwhile: the main thread reports it
                        return
                    self.store.set(_SEEN_KEY.format(self.me), "1")
                    exit_now(2)  # the rank that met the error says why; nothing here is worth saving
                time.sleep(poll_s)
        except (RuntimeError, ValueError):  # the store went with its host (rank 0 ended): nothing to watch
            return

    def _wait_said(self) -> None:
        """Until every error posted so far has been said (or _SAY_WAIT_S: a rank that died before saying it)."""
        deadline = time.monotonic() + _SAY_WAIT_S
        while time.monotonic() < deadline and self.store.add(_SAID_KEY, 0) < self.store.add(_ERRORS_KEY, 0):
            time.sleep(0.05)

    def report(self, message: str, say: Callable[[], None]) -> None:
        """Posts this rank's error `message` and calls `say()` (which prints it) unless another rank says the
        same message (`_should_say`: the first rank to claim it; rank 0 first when every rank meets it)."""
        if self._should_say(message):
            say()
        if self.store is None:
            return
        try:
            self.store.add(_SAID_KEY, 1)
            if self.me != 0:  # this rank's last use of the store: rank 0, which may host it, can go
                self.store.set(_SEEN_KEY.format(self.me), "1")
        except (RuntimeError, ValueError):
            return
        self._hand_over()

    def another_said(self, wait_s: float = 0.0) -> bool:
        """Whether another rank has posted an error, waiting up to `wait_s` for one (and until it is said): this
        rank's own failure then follows from it (a collective that lost that rank) and is not worth saying."""
        if self.store is None:
            return False
        try:
            deadline = time.monotonic() + wait_s
            while not self.store.add(_ERRORS_KEY, 0):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
            self._wait_said()
            self.store.set(_SEEN_KEY.format(self.me), "1")
            return True
        except (RuntimeError, ValueError):
            return False

    def _should_say(self, message: str, wait_s: float = 2.0) -> bool:
        """Posts this rank's error; True for the one rank that should print it: the first to claim its message
        (an atomic counter per message, so two ranks never print the same one). Another rank than 0 first gives
        rank 0 up to `wait_s` to post, so an error every rank meets is said by rank 0, without a rank prefix."""
        self.own = True
        if self.store is None:
            return self.me == 0
        try:
            self.store.set(_ERROR_KEY.format(self.me), message)
            self.store.add(_ERRORS_KEY, 1)
            deadline = time.monotonic() + (wait_s if self.me else 0.0)
            while time.monotonic() < deadline and not self.store.check([_ERROR_KEY.format(0)]):
                time.sleep(0.05)
            claim = _CLAIM_KEY.format(hashlib.sha256(message.encode()).hexdigest()[:32])
            return self.store.add(claim, 1) == 1
        except (RuntimeError, ValueError):  # the store went with its host: say it here
            return True

    def _hand_over(self, wait_s: float = 10.0) -> None:
        """Rank 0, after its own error: keep the store up until every other rank has seen it (or `wait_s`)."""
        if self.store is None or self.me != 0 or self.world == 1:
            return
        deadline = time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                if all(self.store.check([_SEEN_KEY.format(r)]) for r in range(1, self.world)):
                    return
                time.sleep(0.05)
        except (RuntimeError, ValueError):
            pass

    def of_another_rank(self, wait_s: float = 5.0) -> tuple[int, str] | None:
        """(rank, message) of an error another rank posted, waiting up to `wait_s`: for a rank whose collective
        failed before its watcher saw the error."""
        if self.store is None:
            return None
        deadline = time.monotonic() + wait_s
        try:
            while True:
                for r in (r for r in range(self.world) if r != self.me):
                    key = _ERROR_KEY.format(r)
                    if self.store.check([key]):
                        return r, self.store.get(key).decode()
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
        except (RuntimeError, ValueError):
            return None


_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
         "NCCL communicator was aborted")


def lost_peers(error: BaseException) -> bool:
    """Whether `error` is a collective's failure because another rank went away."""
    return isinstance(error, getattr(dist, "DistNetworkError", ())) or \
        (isinstance(error, RuntimeError) and any(what in str(error) for what in _LOST))
