"""Sharded, deterministic, fault-tolerant data streams over webdataset tar shards (format: see shards.py).

Sharding: every epoch the shard list is shuffled with an RNG seeded by (seed, epoch); rank r takes
shards[r::world] and its DataLoader worker w takes [w::workers] of those, so no two (rank, worker) pairs
ever read the same shard in the same epoch. Everything random is seeded from (seed, epoch, rank, worker),
never from process state, so a run is reproducible for fixed (seed, rank, world, workers).

Faults: corrupt images, bad labels and unreadable/truncated tars are skipped and counted, never fatal.
Each worker sends a snapshot of its cumulative counts with every item, so counts reach the main process
even from DataLoader worker processes.
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
import os
import random
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spt_dist.data.shards import CLASSES_FILE, SIZES_FILE, read_json
from spt_dist.errors import UserError

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
FAULT_KINDS = ("bad_image", "bad_label", "bad_tar")
_IMAGE_EXTS = ("png", "jpg", "jpeg")
_WARN_PER_KIND = 5  # log the first few faults of each kind per worker; the counts carry the rest


# --------------------------------------------------------------------------- shard lists and metadata


def _split_top_level_commas(spec: str) -> list[str]:
    # Commas inside braces belong to the brace pattern ({a,b}); only top-level commas separate entries.
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def expand_shards(spec: str, key: str) -> list[str]:
    """Brace pattern, glob, or comma-separated list of either -> existing shard paths, in order."""
    paths: list[str] = []
    for part in _split_top_level_commas(spec or ""):
        for pattern in braceexpand.braceexpand(os.path.expanduser(part)):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise UserError(f"{key}: no file matches '{pattern}'")
                paths.extend(matches)
            elif os.path.isdir(pattern):
                raise UserError(f"{key}: '{pattern}' is a directory; give shard files, e.g. '{pattern}/train-*.tar'")
            elif not os.path.isfile(pattern):
                raise UserError(f"{key}: shard file not found: '{pattern}'")
            else:
                paths.append(pattern)
    if not paths:
        raise UserError(f"{key}: no shards given")
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:  # a shard listed twice would be read twice per epoch and break rank disjointness
        raise UserError(f"{key}: shard listed more than once: '{dupes[0]}'")
    return paths


def count_samples(shards: list[str]) -> int | None:
    """Total samples from sizes.json next to each shard; None if any shard is not listed."""
    total = 0
    for d in sorted({os.path.dirname(s) for s in shards}):
        sizes = read_json(os.path.join(d, SIZES_FILE)) or {}
        for s in (s for s in shards if os.path.dirname(s) == d):
            if os.path.basename(s) not in sizes:
                return None
            total += int(sizes[os.path.basename(s)])
    return total


def read_classes(shards: list[str]) -> list[str] | None:
    """Class names from classes.json next to the first shard; None if there is none."""
    path = os.path.join(os.path.dirname(shards[0]), CLASSES_FILE)
    names = read_json(path)
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UserError(f"{path}: must be a JSON list of class names")
    return names


# --------------------------------------------------------------------------- faults


class FaultCounter:
    """Skipped-sample counts per kind: bad_image, bad_label, bad_tar (one per shard read that failed)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(FAULT_KINDS, 0)

    def add(self, kind: str, where: str, why: object) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= _WARN_PER_KIND:
            log.warning("skipping %s: %s (%s)", kind, where, why)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


# --------------------------------------------------------------------------- pipeline stages


def read_tars(paths: list[str], faults: FaultCounter) -> Iterator[dict]:
    """Group tar members into samples {"__key__", "<ext>": bytes, ...}.

    Our own reader rather than wds.tarfile_samples: a truncated or garbage tar must cost exactly one
    bad_tar count and never leak a half-read sample into the next shard's stream.
    """
    for path in paths:
        sample: dict | None = None
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = wds.tariterators.base_plus_ext(member.name)
                    if key is None:
                        continue
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": key, "__url__": path}
                    sample[ext.lower()] = tar.extractfile(member).read()
            if sample is not None:
                yield sample
        except (OSError, tarfile.TarError, EOFError) as e:
            faults.add("bad_tar", path, e)  # the sample being read when it broke is dropped with the tar


def decode_samples(samples: Iterator[dict], num_classes: int, faults: FaultCounter) -> Iterator[dict]:
    for s in samples:
        where = f"{s['__url__']}:{s['__key__']}"
        try:
            label = int(s["cls"].decode("ascii").strip())
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            faults.add("bad_label", where, f"missing or non-integer .cls: {e!r}")
            continue
        if not 0 <= label < num_classes:
            faults.add("bad_label", where, f"label {label} not in [0, {num_classes})")
            continue
        data = next((s[e] for e in _IMAGE_EXTS if e in s), None)
        try:
            if data is None:
                raise ValueError("no .png/.jpg member")
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")  # convert() forces the full decode, so corrupt data fails here
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
            faults.add("bad_image", where, e)
            continue
        yield {"key": s["__key__"], "img": img, "label": label}


class IsolatedRng:
    """Runs the transform under its own python/numpy/torch RNG states, seeded per (seed, epoch, rank, worker).

    Random augmentations then do not depend on (or disturb) the trainer's global RNG, and give the same
    result whether the pipeline runs in-process (workers=0) or in a DataLoader worker.
    """

    def __init__(self, seed: str):
        r = random.Random(seed)
        self.py = random.Random(r.getrandbits(64)).getstate()
        self.np = np.random.RandomState(r.getrandbits(32)).get_state()
        self.torch = torch.Generator().manual_seed(r.getrandbits(63)).get_state()

    def __call__(self, fn: Callable, x):
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.torch)
        try:
            return fn(x)
        finally:
            self.py, self.np, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _transformed(samples: Iterator[dict], transform: Transform, rng: IsolatedRng | None) -> Iterator[dict]:
    for s in samples:
        img = s.pop("img")
        s["image"] = rng(transform, img) if rng else transform(img)
        yield s


def _batches(samples: Iterator[dict], batch_size: int, partial_last: bool, worker: int, faults: FaultCounter):
    """Items sent to the main process: {"worker", "faults", "batch"}; a final item with batch=None says
    "this worker is done" and carries the last fault counts (faults after the last batch would else be lost)."""
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield {"worker": worker, "faults": faults.snapshot(), "batch": _collate(buf)}
            buf = []
    if buf and partial_last:
        yield {"worker": worker, "faults": faults.snapshot(), "batch": _collate(buf)}
    yield {"worker": worker, "faults": faults.snapshot(), "batch": None}


def _collate(samples: list[dict]) -> dict:
    return {
        "keys": [s["key"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def seed_string(*parts) -> str:
    # String seeds hash with sha512 inside random.Random: stable across processes and Python runs.
    return "spt_dist/" + "/".join(map(str, parts))


def epoch_shards(shards: list[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
    """The shards that (rank, worker) reads in `epoch` of a TrainStream."""
    order = list(shards)
    random.Random(seed_string(seed, epoch)).shuffle(order)
    return order[rank::world][worker::workers]


# --------------------------------------------------------------------------- datasets (run inside workers)


class _TrainShards(IterableDataset):
    def __init__(self, shards, rank, world, batch_size, transform, num_classes, seed, shuffle_buffer):
        super().__init__()
        self.shards, self.rank, self.world, self.batch_size = shards, rank, world, batch_size
        self.transform, self.num_classes, self.seed, self.shuffle_buffer = transform, num_classes, seed, shuffle_buffer

    def _samples(self, worker: int, workers: int, faults: FaultCounter) -> Iterator[dict]:
        tried: set[str] = set()
        found = False
        for epoch in itertools.count():
            mine = epoch_shards(self.shards, self.seed, epoch, self.rank, self.world, worker, workers)
            seed = seed_string(self.seed, epoch, self.rank, worker)
            raw = read_tars(mine, faults)
            # Shuffle raw bytes (small) before decoding, so the buffer never holds decoded images.
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=random.Random(seed))(raw)
            for s in _transformed(decode_samples(raw, self.num_classes, faults), self.transform, IsolatedRng(seed)):
                found = True
                yield s
            tried.update(mine)
            # One epoch of only bad shards can be bad luck; every shard bad would loop forever and hang the run.
            if not found and len(tried) == len(self.shards):
                raise UserError(
                    f"data.train_shards: rank {self.rank} worker {worker} found no valid sample in any of the "
                    f"{len(self.shards)} shards (skipped: {faults.snapshot()})"
                )

    def __iter__(self):
        worker, workers = _worker_slot()
        faults = FaultCounter()
        pipeline = wds.DataPipeline(
            partial(self._samples, worker, workers, faults),
            partial(_batches, batch_size=self.batch_size, partial_last=False, worker=worker, faults=faults),
        )
        try:
            yield from pipeline
        except UserError as e:
            # Exceptions from DataLoader workers reach the main process as tracebacks; send the message as data.
            yield {"worker": worker, "faults": faults.snapshot(), "batch": None, "error": str(e)}


class _EvalShards(IterableDataset):
    def __init__(self, shards, rank, world, batch_size, transform, num_classes):
        super().__init__()
        self.shards, self.rank, self.world, self.batch_size = shards, rank, world, batch_size
        self.transform, self.num_classes = transform, num_classes

    def __iter__(self):
        worker, workers = _worker_slot()
        faults = FaultCounter()
        mine = self.shards[self.rank :: self.world][worker::workers]
        return iter(
            wds.DataPipeline(
                lambda: read_tars(mine, faults),
                partial(decode_samples, num_classes=self.num_classes, faults=faults),
                partial(_transformed, transform=self.transform, rng=None),
                partial(_batches, batch_size=self.batch_size, partial_last=True, worker=worker, faults=faults),
            )
        )


# --------------------------------------------------------------------------- main-process streams


def _identity(x):
    return x


def _loader(dataset: IterableDataset, workers: int, pin_memory: bool, persistent: bool) -> DataLoader:
    # Our own generator: otherwise each DataLoader iterator draws its worker base seed from the global torch
    # RNG, shifting the trainer's random stream. (Our stages seed themselves; this seed is otherwise unused.)
    return DataLoader(
        dataset,
        batch_size=None,  # batches are built in the pipeline
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def _merge_workers(items: Iterator[dict], workers: int, faults: dict[int, dict[str, int]]) -> Iterator[dict]:
    """Yield batches round-robin over workers (worker 0, 1, ..., skipping finished ones).

    The DataLoader already round-robins, but once a worker finishes, which worker gets the next slot
    depends on timing; re-ordering by worker id here makes the order deterministic. The buffer stays
    small because the DataLoader's own order differs from this one only after a worker has finished.
    """
    pending = {w: deque() for w in range(max(workers, 1))}
    active = list(pending)
    turn = 0
    while active:
        w = active[turn % len(active)]
        while not pending[w]:
            item = next(items)  # cannot run dry: a worker's final item (batch=None) always arrives
            pending[item["worker"]].append(item)
        item = pending[w].popleft()
        faults[w] = item["faults"]
        if item.get("error"):
            raise UserError(item["error"])
        if item["batch"] is None:
            active.remove(w)
            continue  # `turn` now already points at the next worker
        turn = (turn + 1) % len(active)
        yield item["batch"]


def _sum_faults(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    total = dict.fromkeys(FAULT_KINDS, 0)
    for counts in per_worker.values():
        for k, v in counts.items():
            total[k] += v
    return total


class TrainStream:
    """Infinite iterator of full batches {"keys", "images" [B,3,H,W], "labels" [B]} for one rank."""

    def __init__(self, shards: list[str], *, rank: int, world: int, batch_size: int, transform: Transform,
                 num_classes: int, seed: int, workers: int, shuffle_buffer: int, pin_memory: bool = False):
        need = world * max(workers, 1)
        if len(shards) < need:
            raise UserError(
                f"data.train_shards: {len(shards)} shards for {world} ranks x {max(workers, 1)} workers; "
                f"need at least {need}"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        dataset = _TrainShards(list(shards), rank, world, batch_size, transform, num_classes, seed, shuffle_buffer)
        self._loader = _loader(dataset, workers, pin_memory, persistent=False)
        self._workers = workers
        self._faults: dict[int, dict[str, int]] = {}
        self._it: Iterator[dict] | None = None  # started lazily: constructing reads nothing

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = _merge_workers(iter(self._loader), self._workers, self._faults)
        return next(self._it)

    def faults(self) -> dict[str, int]:
        """Samples skipped so far on this rank, per kind (as of the latest batch from each worker)."""
        return _sum_faults(self._faults)

    def close(self) -> None:
        """Stop the DataLoader workers (closing the generator drops the DataLoader iterator)."""
        if self._it is not None:
            self._it.close()
            self._it = None


class EvalStream:
    """Finite: each sample of this rank's shards (shards[rank::world]) exactly once, in a fixed order.

    The last batch may be partial; a rank or worker without shards yields nothing. Each iter() is a new pass;
    faults() reports the current (or last) pass.
    """

    def __init__(self, shards: list[str], *, rank: int, world: int, batch_size: int, transform: Transform,
                 num_classes: int, workers: int = 0, pin_memory: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        dataset = _EvalShards(list(shards), rank, world, batch_size, transform, num_classes)
        self._loader = _loader(dataset, workers, pin_memory, persistent=True)  # no worker start-up per pass
        self._workers = workers
        self._faults: dict[int, dict[str, int]] = {}

    def __iter__(self) -> Iterator[dict]:
        self._faults.clear()
        return _merge_workers(iter(self._loader), self._workers, self._faults)

    def faults(self) -> dict[str, int]:
        return _sum_faults(self._faults)
