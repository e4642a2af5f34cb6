"""Run checkpoints: what a run needs to continue exactly, in files that load without unpickling anything.

    checkpoints/step_00000040/
      trainable.safetensors    every trainable parameter, full fp32: the same on any world size and engine
      optimizer.safetensors    AdamW's '<parameter>/exp_avg' and '<parameter>/exp_avg_sq', full fp32
      state.json               step, optimizer step count, schedule, world size, engine, the run's config
      rank_00000.safetensors   per rank: its RNG states and its data stream's position (metadata, JSON)
      allocation.json, allocation.safetensors    the allocation being trained (PEFT methods), never recomputed

Every rank writes into `checkpoints/.partial-step_N/`; once all have written, rank 0 renames it to `step_N/`.
So a directory named step_N is complete, and a run killed while saving leaves only a .partial directory,
which `--resume` ignores (and the next save replaces). Older complete checkpoints beyond `keep_last` are
removed after the rename, never before.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from spt_dist import runfiles
from spt_dist.atomic import read_safetensors, write_json, write_safetensors
from spt_dist.data.shards import read_json
from spt_dist.engines.base import ADAM_STATE, Engine
from spt_dist.errors import UserError

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


# --------------------------------------------------------------------------- per-rank state: RNG and data


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch's as tensors, python's and numpy's as JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def restore_rng(tensors: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- saving


def save_checkpoint(run_dir: str, step: int, *, engine: Engine, state: dict, rank_state: dict, rank: int,
                    files: dict[str, bytes] | None = None, keep_last: int = 0) -> str:
    """Collective. `state`: JSON for state.json (rank 0's is written); `rank_state`: this rank's JSON (data
    position...), saved with its RNG states; `files`: more files by name (the allocation). Returns the
    checkpoint directory."""
    root = os.path.join(run_dir, runfiles.CHECKPOINTS)
    final = os.path.join(root, f"step_{step:08d}")
    partial = os.path.join(root, f".partial-step_{step:08d}")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a save killed half-way at this step before
        os.makedirs(partial)
    dist.barrier()

    params = engine.full_state_dict(trainable_only=True)  # collective
    optimizer, optimizer_steps = engine.optimizer_state()  # collective
    rng, rng_states = capture_rng()
    write_safetensors(os.path.join(partial, rank_file(rank)), rng,
                      {"rng": json.dumps(rng_states), "state": json.dumps(rank_state)})
    if rank == 0:
        write_safetensors(os.path.join(partial, TRAINABLE), params)
        write_safetensors(os.path.join(partial, OPTIMIZER),
                          {f"{name}/{key}": t for name, keys in optimizer.items() for key, t in keys.items()})
        for name, content in (files or {}).items():
            with open(os.path.join(partial, name), "wb") as f:  # inside the partial directory: atomic with it
                f.write(content)
        write_json(os.path.join(partial, runfiles.STATE_JSON), dict(state, step=step, optimizer_steps=optimizer_steps))
    dist.barrier()  # every rank's file is in place
    if rank == 0:
        if os.path.isdir(final):  # the same step saved again (a resumed run's final save): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(root, keep_last)
    dist.barrier()
    return final


class CheckpointManager:
    """When a training run saves and what it last saved: every `every` steps, every `every_min` minutes (rank
    0's clock; the trainer makes every rank agree), on a stop signal and at the end; `keep_last` kept.
    `files`: more files every checkpoint carries (the allocation being trained)."""

    def __init__(self, run_dir: str, rank: int, *, every: int, every_min: float, keep_last: int,
                 files: dict[str, bytes], saved_step: int | None = None) -> None:
        self.run_dir, self.rank, self.every, self.every_min = run_dir, rank, every, every_min
        self.keep_last, self.files = keep_last, files
        self.saved_step = saved_step  # the step the newest checkpoint of this run holds (a resume's own)
        self.last: str | None = None  # the newest checkpoint this process wrote
        self._saved_at = time.monotonic()

    def step_due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def clock_due(self) -> bool:
        return self.rank == 0 and self.every_min > 0 and time.monotonic() - self._saved_at >= 60 * self.every_min

    def save(self, step: int, engine: Engine, state: dict, rank_state: dict) -> str:
        """Collective: see save_checkpoint."""
        self.last = save_checkpoint(self.run_dir, step, engine=engine, state=state, rank=self.rank,
                                    rank_state=rank_state, files=self.files, keep_last=self.keep_last)
        self.saved_step, self._saved_at = step, time.monotonic()
        return self.last


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for step in complete_steps(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, f"step_{step:08d}"), ignore_errors=True)


# --------------------------------------------------------------------------- finding and reading


def complete_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m]
    return sorted(s for s in steps if os.path.isfile(os.path.join(root, f"step_{s:08d}", runfiles.STATE_JSON)))


def find_checkpoint(resume: str, run_dir: str | None) -> str | None:
    """`--resume latest`: the newest complete checkpoint of `run_dir`, or None (a first start). `--resume PATH`:
    a checkpoint directory, or a run directory (its newest checkpoint, which must exist)."""
    if resume == "latest":
        steps = complete_steps(os.path.join(run_dir, runfiles.CHECKPOINTS))
        return os.path.join(run_dir, runfiles.CHECKPOINTS, f"step_{steps[-1]:08d}") if steps else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, runfiles.STATE_JSON)):
        return path
    steps = complete_steps(os.path.join(path, runfiles.CHECKPOINTS))
    if not steps:
        raise UserError(f"--resume: '{resume}' is neither a checkpoint nor a run directory with a complete one")
    return os.path.join(path, runfiles.CHECKPOINTS, f"step_{steps[-1]:08d}")


def run_dir_of(checkpoint: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


@dataclass
class Checkpoint:
    directory: str
    state: dict  # state.json

    @classmethod
    def read(cls, directory: str) -> "Checkpoint":
        return cls(directory, read_json(os.path.join(directory, runfiles.STATE_JSON)))

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        return read_safetensors(os.path.join(self.directory, name), "--resume")

    def trainable(self) -> dict[str, torch.Tensor]:
        return self._load(TRAINABLE)

    def optimizer(self) -> dict[str, dict[str, torch.Tensor]]:
        flat, out = self._load(OPTIMIZER), {}
        for key, tensor in flat.items():
            name, _, part = key.rpartition("/")
            out.setdefault(name, {})[part] = tensor
        for name, parts in out.items():
            if set(parts) != set(ADAM_STATE):
                raise UserError(f"--resume: '{self.directory}/{OPTIMIZER}': {name} has {sorted(parts)}")
        return out

    def rank_state(self, rank: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """(RNG tensors, RNG JSON, rank state JSON) that `rank` saved."""
        path = os.path.join(self.directory, rank_file(rank))
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise UserError(f"--resume: cannot read '{path}' ({e})") from None
        return tensors, json.loads(meta["rng"]), json.loads(meta["state"])
