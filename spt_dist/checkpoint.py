"""Run checkpoints: what a run needs to continue exactly, in files that load without unpickling anything.

    checkpoints/step_00000040/
      trainable.safetensors    every trainable parameter, full fp32: the same on any world size and engine
      optimizer.safetensors    AdamW's '<parameter>/exp_avg' and '<parameter>/exp_avg_sq', full fp32
      shard_00000.safetensors  (sharded format, instead of the two above) per rank: its own flat shard of each
                               trainable parameter and of its AdamW state, with where the shard lies
      state.json               step, optimizer step count, schedule, world size, the run's config, the
                               SHA-256 of every other file, and its own (record_sha256): written last
      rank_00000.safetensors   per rank: its RNG states and its data stream's position (metadata, JSON)
      allocation.json, allocation.safetensors    the allocation being trained (PEFT methods), never recomputed

Every rank writes into `checkpoints/.partial-step_N/`; once all have written, rank 0 renames it to `step_N/`.
So a directory named step_N is complete, and a run killed while saving leaves only a .partial directory,
which `--resume` ignores (and the next save removes); a save that fails (a full disk) removes it. Older
complete checkpoints beyond `keep_last` are removed after the rename, never before. A complete checkpoint that
fails its checks (Checkpoint.problem: a file that does not match its checksum, a record edited or damaged, a file
its format needs not listed) is skipped by `--resume` with a warning, for the one before it.

The sharded format keeps a full fine-tuning run at ViT-g from gathering every fp32 tensor and its AdamW state on
every rank (about 12 GB each): each rank writes what it holds. Loading assembles full tensors from all shards,
so a sharded checkpoint resumes on any world size and engine, as a consolidated one does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from spt_dist import runfiles
from spt_dist.atomic import (
    atomic_file, file_digest, json_digest, make_dirs, read_safetensors, write_json, write_safetensors,
)
from spt_dist.config import get_dotted
from spt_dist.data.shards import read_json
from spt_dist.distributed import broadcast_object, gather_to_main
from spt_dist.engines.base import ADAM_STATE, Engine
from spt_dist.errors import PeerFailed, UserError
from spt_dist.methods import get_method

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SHARD_ABOVE_BYTES = 1 << 30  # output.checkpoint_format=auto
# What state.json must hold for a resume to use it.
_STATE_KEYS = ("step", "optimizer_steps", "world_size", "samples_seen", "scheduler", "config")
FORMATS = ("consolidated", "sharded")
RECORD_DIGEST = "record_sha256"  # state.json's digest of its own content (record_digest)


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


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


def record_digest(state: dict) -> str:
    """SHA-256 of state.json's content (atomic.json_digest), less the digest itself and `files`.

    Kept inside state.json rather than beside it: the record stays one file, written and renamed in one step.
    `files` is left out: each of its entries is checked against its file, and the table against the names the
    format needs, so a change to it shows there already."""
    return json_digest({key: value for key, value in state.items() if key not in (RECORD_DIGEST, "files")})


def _write(directory: str, name: str, tensors: dict, metadata: dict | None = None) -> dict[str, str]:
    path = os.path.join(directory, name)
    write_safetensors(path, tensors, metadata)
    return {name: file_digest(path)}


def use_sharded(fmt: str, engine: Engine, world_size: int) -> bool:
    """output.checkpoint_format: `auto` shards once the trainable weights and AdamW state pass 1 GiB on 2+ ranks."""
    if fmt != "auto":
        return fmt == "sharded"
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)  # global numel (DTensor too)
    return world_size > 1 and trainable * 4 * (1 + len(ADAM_STATE)) > _SHARD_ABOVE_BYTES


def save_checkpoint(run_dir: str, step: int, *, engine: Engine, state: dict, rank_state: dict, rank: int,
                    files: dict[str, bytes] | None = None, keep_last: int = 0, sharded: bool = False) -> str:
    """Collective. `state`: JSON for state.json (rank 0's is written); `rank_state`: this rank's JSON (data
    position...), saved with its RNG states; `files`: more files by name (the allocation); `sharded`: each rank
    writes its own shards of the trainable state instead of rank 0 writing it whole. Returns the checkpoint
    directory. A save whose files fail on any rank (a full disk: a UserError from spt_dist.atomic) raises on
    every rank, the same line, once rank 0 has removed the partial directory; a rank's own bug raises as itself."""
    root = os.path.join(run_dir, runfiles.CHECKPOINTS)
    final = os.path.join(root, f"step_{step:08d}")
    partial = os.path.join(root, f"{_PARTIAL}{step:08d}")
    not_saved = f"the checkpoint of step {step} was not saved"
    failed = None
    if rank == 0:
        # What saves killed half-way (or failed inside a collective, where the ranks cannot agree) left behind:
        # this job holds the run directory's lock, so no other is writing there.
        for name in os.listdir(root) if os.path.isdir(root) else ():
            if name.startswith(_PARTIAL):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        try:
            make_dirs(partial, "checkpoint")
        except UserError as e:
            failed = f"{e}; {not_saved}"
    failed = broadcast_object(failed)  # collective: no rank writes before the directory is there
    if failed:
        raise UserError(failed)

    written: dict[str, str] = {}  # file name -> SHA-256, of what this rank wrote
    optimizer_steps, own = 0, None
    if not sharded:  # collectives, outside the `try` below: a rank that failed in one must not go on to the next
        params = engine.full_state_dict(trainable_only=True)
        optimizer, optimizer_steps = engine.optimizer_state()
    try:  # this rank's own files: whatever fails, every rank hears of it in the gather below
        if sharded:
            shards, layout, optimizer_steps = engine.local_state()
            written.update(_write(partial, shard_file(rank), shards, {"layout": json.dumps(layout)}))
        elif rank == 0:
            written.update(_write(partial, TRAINABLE, params))
            written.update(_write(partial, OPTIMIZER, {f"{name}/{key}": t for name, keys in optimizer.items()
                                                       for key, t in keys.items()}))
        rng, rng_states = capture_rng()
        written.update(_write(partial, rank_file(rank), rng,
                              {"rng": json.dumps(rng_states), "state": json.dumps(rank_state)}))
        if rank == 0:
            for name, content in (files or {}).items():
                with atomic_file(os.path.join(partial, name)) as f:  # a full disk: one line naming the file
                    f.write(content)
                written[name] = hashlib.sha256(content).hexdigest()
    except Exception as e:  # noqa: BLE001 - a bug too: rank 0 removes the partial directory before any rank raises
        own = e
    bug = own is not None and not isinstance(own, UserError)
    why = None if own is None else f"rank {rank}: {type(own).__name__}: {' '.join(str(own).split())[:200]}" \
        if bug else str(own)
    every_rank = gather_to_main((written, optimizer_steps, (why, bug)))  # collective: every rank's files are in place
    if rank == 0:
        failed = next((failure for *_, failure in every_rank if failure[0]), (None, False))
        if failed[0] is None:
            try:
                _complete(partial, final, step, state, every_rank, sharded)
            except (UserError, OSError) as e:
                failed = (str(e), False)
        if failed[0] is None:
            _prune(root, keep_last)
        else:
            shutil.rmtree(partial, ignore_errors=True)
    failed = broadcast_object(failed if rank == 0 else None)  # collective: every rank returns, or raises
    if bug:
        raise own  # a bug: its traceback (the partial directory is gone all the same)
    if failed[1]:  # another rank's bug, which that rank reports
        raise PeerFailed(f"{failed[0]}; {not_saved} (its partial directory is removed)")
    if failed[0]:
        raise UserError(f"{failed[0]}; {not_saved} (its partial directory is removed)")  # the same line on every rank
    return final


def _complete(partial: str, final: str, step: int, state: dict, every_rank: list, sharded: bool) -> None:
    """Rank 0, once every rank has written its files: state.json (its record digest over the JSON as it reads
    back), then the rename that makes the checkpoint complete."""
    digests = {name: d for rank_written, _, _ in every_rank for name, d in rank_written.items()}
    record = json.loads(json.dumps(dict(state, step=step, optimizer_steps=max(s for _, s, _ in every_rank),
                                        format=FORMATS[sharded], files=dict(sorted(digests.items())))))
    record[RECORD_DIGEST] = record_digest(record)
    write_json(os.path.join(partial, runfiles.STATE_JSON), record)
    if os.path.isdir(final):  # the same step saved again (a resumed run's final save): replace it whole
        shutil.rmtree(final)
    os.replace(partial, final)


class CheckpointManager:
    """When a training run saves and what it last saved: every `every` steps, every `every_min` minutes (rank
    0's clock; the trainer makes every rank agree), on a stop signal and at the end; `keep_last` kept.
    `files`: more files every checkpoint carries (the allocation being trained); `sharded`: the format."""

    def __init__(self, run_dir: str, rank: int, *, every: int, every_min: float, keep_last: int,
                 files: dict[str, bytes], saved_step: int | None = None, sharded: bool = False) -> None:
        self.run_dir, self.rank, self.every, self.every_min = run_dir, rank, every, every_min
        self.keep_last, self.files, self.sharded = keep_last, files, sharded
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
                                    rank_state=rank_state, files=self.files, keep_last=self.keep_last,
                                    sharded=self.sharded)
        self.saved_step, self._saved_at = step, time.monotonic()
        return self.last


_PRUNED = ".pruned_step_"
_PARTIAL = ".partial-step_"


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    # Out of the way first (one rename), then deleted: a prune killed half-way leaves no half-deleted step_N
    # behind, only a .pruned_ directory, which the next prune deletes.
    for name in os.listdir(root):
        if name.startswith(_PRUNED):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for step in complete_steps(root)[:-keep_last]:
        doomed = os.path.join(root, f"{_PRUNED}{step:08d}")
        os.replace(os.path.join(root, f"step_{step:08d}"), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------- finding and reading


def complete_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m]
    return sorted(s for s in steps if os.path.isfile(os.path.join(root, f"step_{s:08d}", runfiles.STATE_JSON)))


def find_checkpoint(resume: str, run_dir: str | None) -> tuple[str | None, list[str]]:
    """(checkpoint, warnings). `--resume latest`: the newest intact checkpoint of `run_dir`, or None (a first
    start). `--resume PATH`: that checkpoint directory (which must be intact), or a run directory's newest intact
    checkpoint. A complete checkpoint that fails its checksums is skipped for the one before it; `warnings` says
    which were skipped and why."""
    if resume == "latest":
        root = os.path.join(run_dir, runfiles.CHECKPOINTS)
        return _newest_intact(root) if complete_steps(root) else (None, [])
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, runfiles.STATE_JSON)):
        problem = Checkpoint.read(path).problem()
        if problem:
            raise UserError(f"--resume: the checkpoint {path} is damaged: {problem}")
        return path, []
    root = os.path.join(path, runfiles.CHECKPOINTS)
    if not complete_steps(root):
        raise UserError(f"--resume: '{resume}' is neither a checkpoint nor a run directory with a complete one")
    return _newest_intact(root)


def _newest_intact(root: str) -> tuple[str, list[str]]:
    warnings = []
    for step in reversed(complete_steps(root)):
        directory = os.path.join(root, f"step_{step:08d}")
        try:
            problem = Checkpoint.read(directory).problem()
        except UserError as e:
            problem = str(e)
        if not problem:
            return directory, warnings
        warnings.append(f"skipped the damaged checkpoint {directory}: {problem}")
    raise UserError(f"--resume: no intact checkpoint in {root}; newest: {warnings[0].split(': ', 1)[1]}")


def run_dir_of(checkpoint: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


@dataclass
class Checkpoint:
    directory: str
    state: dict  # state.json

    @classmethod
    def read(cls, directory: str) -> "Checkpoint":
        path = os.path.join(directory, runfiles.STATE_JSON)
        state = read_json(path)
        if not isinstance(state, dict):
            raise UserError(f"--resume: '{path}' is not a checkpoint's state (a JSON object)")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise UserError(f"--resume: '{path}' lacks '{missing[0]}'")
        return cls(directory, state)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def problem(self) -> str | None:
        """What is wrong with this checkpoint, or None; the one check `--resume` makes of it (a checkpoint with a
        problem is skipped for an older one, or refused when named). The record first: its own digest, its fields'
        types, its step against the directory's name; then the files it lists against their checksums, and that
        it lists every file its format needs. A record without its digest, format or checksums (written by an
        older spt_dist, or edited) has nothing that vouches for it: it is refused too."""
        state, name = self.state, runfiles.STATE_JSON
        missing = next((key for key in (RECORD_DIGEST, "format", "files") if key not in state), None)
        if missing:
            return f"{name} has no '{missing}' (edited, or written by an spt_dist before checkpoints had checksums)"
        if state[RECORD_DIGEST] != record_digest(state):
            return f"{name} does not match its record checksum ({RECORD_DIGEST}): edited or damaged"
        for key, least in (("step", 0), ("optimizer_steps", 0), ("samples_seen", 0), ("world_size", 1)):
            if type(state[key]) is not int or state[key] < least:  # not bool, float or str: what a save writes
                return f"{name}'s '{key}' is not a whole number >= {least}: {state[key]!r}"
        for key in ("scheduler", "config"):
            if not isinstance(state[key], dict):
                return f"{name}'s '{key}' is not a JSON object"
        directory = _STEP_DIR.match(os.path.basename(os.path.normpath(self.directory)))
        if directory and int(directory.group(1)) != state["step"]:  # (a copy under another name: not checked)
            return f"{name} says step {state['step']}, the directory {directory.group(0)}"
        fmt = state["format"]
        if fmt not in FORMATS:
            return f"{name}'s 'format' is {fmt!r}, not {' or '.join(map(repr, FORMATS))}"
        files = state["files"]
        if not isinstance(files, dict):
            return f"{name}'s 'files' is not a table of checksums"
        try:
            unlisted = next((f for f in self._required_files() if f not in files), None)
        except (KeyError, TypeError, UserError) as e:
            return f"{name}'s config names no known method.name ({e})"
        if unlisted:
            return f"{name}'s 'files' does not list {unlisted}"
        for file, digest in files.items():
            path = os.path.join(self.directory, file)
            try:
                if os.path.dirname(file) or file_digest(path) != digest:
                    return f"{file} does not match its checksum"
            except OSError as e:  # gone (e.g. pruned by the job that wrote it), unreadable, or no regular file
                return f"{file} is missing or unreadable ({e.strerror or e})"
        return None

    def _required_files(self) -> Iterator[str]:
        """The files a checkpoint of this record's format, world size and method holds (as save_checkpoint writes
        them), lazily: a damaged world size shows at its first missing rank."""
        ranks = range(self.state["world_size"])
        yield from map(shard_file, ranks) if self.sharded else (TRAINABLE, OPTIMIZER)
        yield from map(rank_file, ranks)
        if get_method(get_dotted(self.state["config"], "method.name")).selects:
            yield from (runfiles.ALLOCATION_JSON, runfiles.ALLOCATION_INDICES)

    @property
    def sharded(self) -> bool:
        return self.state.get("format") == "sharded"

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        return read_safetensors(os.path.join(self.directory, name), "--resume")

    def trainable(self) -> dict[str, torch.Tensor]:
        if self.sharded:
            return {name: parts["param"] for name, parts in self._assemble(("param",)).items()}
        return self._load(TRAINABLE)

    def optimizer(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.sharded:
            return self._assemble(ADAM_STATE)
        flat, out = self._load(OPTIMIZER), {}
        for key, tensor in flat.items():
            name, _, part = key.rpartition("/")
            out.setdefault(name, {})[part] = tensor
        for name, parts in out.items():
            if set(parts) != set(ADAM_STATE):
                raise UserError(f"--resume: '{self.directory}/{OPTIMIZER}': {name} has {sorted(parts)}")
        return out

    def _assemble(self, keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """Full tensors `name -> {key: tensor}` from every rank's shard file (sharded format). A key no shard holds
        (AdamW state before the first step) is left out; a tensor the shards do not cover exactly is an error."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        covered: dict[tuple[str, str], int] = {}
        shapes: dict[str, list[int]] = {}
        for rank in range(int(self.state["world_size"])):
            path = os.path.join(self.directory, shard_file(rank))
            try:
                with safe_open(path, "pt") as f:
                    layout, present = json.loads(f.metadata()["layout"]), set(f.keys())
                    for name, (offset, shape) in layout.items():
                        shapes[name] = shape
                        for key in keys:
                            if f"{name}/{key}" not in present:
                                continue
                            piece = f.get_tensor(f"{name}/{key}")
                            full = out.setdefault(name, {}).setdefault(key, torch.zeros(math.prod(shape)))
                            full[offset:offset + piece.numel()] = piece
                            covered[name, key] = covered.get((name, key), 0) + piece.numel()
            except (OSError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"--resume: cannot read '{path}' ({e})") from None
        for (name, key), count in covered.items():
            if count != math.prod(shapes[name]):
                raise UserError(f"--resume: the shards in {self.directory} cover {count} of the "
                                f"{math.prod(shapes[name])} entries of {name}/{key}")
        return {name: {key: t.view(shapes[name]) for key, t in parts.items()} for name, parts in out.items()
                if len(parts) == len(keys)}

    def rank_state(self, rank: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """(RNG tensors, RNG JSON, rank state JSON) that `rank` saved."""
        path = os.path.join(self.directory, rank_file(rank))
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, json.loads(meta["rng"]), json.loads(meta["state"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"--resume: cannot read '{path}' ({e})") from None
