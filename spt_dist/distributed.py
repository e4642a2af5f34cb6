"""Process-group setup: NCCL on CUDA, gloo on CPU; also works as a plain single process (no launcher).

The collectives below also work without any process group (a library user's plain loop): a world of one."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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


# --------------------------------------------------------------------------- a user error on some ranks only

_ERROR_KEY = "spt_dist/error/{}"


def _default_store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError):
        return None


def should_say_error(message: str, wait_s: float = 2.0) -> bool:
    """After a user error on this rank: whether this rank should print it. Posts it in the job's store, so that
    ranks whose collectives then fail can tell why (`error_of_another_rank`). Rank 0 always says its own; another
    rank says its own unless rank 0 posts the same message within `wait_s` (every rank met the same mistake:
    one line). Without a process group every rank holds the same config, so rank 0 speaks for all."""
    store = _default_store()
    if store is None:
        return int(os.environ.get("RANK", "0")) == 0
    me = rank()
    try:
        store.set(_ERROR_KEY.format(me), message)
        if me == 0:
            return True
        key, deadline = _ERROR_KEY.format(0), time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if store.check([key]):
                return store.get(key).decode() != message
            time.sleep(0.05)
    except (RuntimeError, ValueError):  # the store went with its host: say it here
        pass
    return True


def error_of_another_rank(wait_s: float = 5.0) -> tuple[int, str] | None:
    """(rank, message) of a user error another rank posted (see should_say_error), waiting up to `wait_s` for one
    to appear; None if none did. For a rank whose collective failed because a peer stopped on that error."""
    store, me = _default_store(), rank()
    if store is None:
        return None
    keys = {r: _ERROR_KEY.format(r) for r in range(world_size()) if r != me}
    deadline = time.monotonic() + wait_s
    try:
        while True:
            for r, key in keys.items():
                if store.check([key]):
                    return r, store.get(key).decode()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
    except (RuntimeError, ValueError):
        return None
