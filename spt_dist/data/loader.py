"""Sharded, deterministic, fault-tolerant data streams over webdataset tar shards (format: see shards.py).

Sharding: every epoch the shard list is shuffled with an RNG seeded by (seed, epoch); rank r takes
shards[r::world] and its DataLoader worker w takes [w::workers] of those, so no two (rank, worker) pairs
ever read the same shard in the same epoch. Everything random is seeded from (seed, epoch, rank, worker),
never from process state, so a run is reproducible for fixed (seed, rank, world, workers).

Faults: corrupt images, bad labels and unreadable/truncated tars are skipped and counted, never fatal. A tar
member that is sparse or larger than `max_member_mb` is never read (a crafted one may declare any size): its
sample counts as a bad_image, and so does an image whose header declares more than `max_image_pixels` pixels
(it is never decoded).
A count is of distinct faults (a bad sample read again in a later epoch, or again after a resume, counts once),
so it says what is wrong with the data set. Each worker sends the faults new since its last item with every
item, so they reach the main process even from DataLoader worker processes.

Position: every item also carries its worker's position (epoch, samples taken from the shuffled raw stream of
that epoch, good or bad), so a TrainStream's `state_dict()` after any batch says exactly where each worker is;
a stream loaded with it re-reads the raw bytes up to there without decoding them and goes on with the same
batches in the same order.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import logging
import os
import random
import signal
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from spt_dist.data.shards import CLASSES_FILE, MAX_IMAGE_PIXELS, MAX_MEMBER_MB, open_image, read_json, read_sizes
from spt_dist.errors import UserError
from spt_dist.preemption import SIGNALS as STOP_SIGNALS

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
FAULT_KINDS = ("bad_image", "bad_label", "label_out_of_range", "bad_tar")
_IMAGE_EXTS = ("png", "jpg", "jpeg")
_WARN_PER_KIND = 5  # log the first few faults of each kind per worker; the counts carry the rest
_REFUSED = "__refused__"  # a raw sample whose member was refused unread: why (never a member: see read_tars)


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
        try:
            patterns = list(braceexpand.braceexpand(os.path.expanduser(part)))
        except braceexpand.UnbalancedBracesError:
            raise UserError(f"{key}: unbalanced braces in '{part}'") from None
        for pattern in patterns:
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
    """Total samples from sizes.json next to each shard; None if any shard is not listed. Every entry of each
    sizes.json is checked (shards.read_sizes): a bad one is a UserError naming the file, the shard and the value."""
    total = 0
    for d in sorted({os.path.dirname(s) for s in shards}):
        sizes = read_sizes(d)
        for s in (s for s in shards if os.path.dirname(s) == d):
            if os.path.basename(s) not in sizes:
                return None
            total += sizes[os.path.basename(s)]
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
    """Distinct skipped samples per kind: bad_image, bad_label (missing or not an integer), label_out_of_range,
    bad_tar (a shard that could not be read to its end)."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {k: set() for k in FAULT_KINDS}
        self._new: list[tuple[str, str]] = []

    def add(self, kind: str, where: str, why: object) -> None:
        if where in self.seen[kind]:
            return
        self.seen[kind].add(where)
        self._new.append((kind, where))
        if len(self.seen[kind]) <= _WARN_PER_KIND:
            log.warning("skipping %s: %s (%s)", kind, where, why)

    def update(self, faults: list[tuple[str, str]]) -> None:
        for kind, where in faults:
            self.seen[kind].add(where)

    def take_new(self) -> list[tuple[str, str]]:
        """The faults found since the last call (what an item sends to the main process)."""
        new, self._new = self._new, []
        return new

    def snapshot(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.seen.items()}


# --------------------------------------------------------------------------- pipeline stages


def read_tars(paths: list[str], faults: FaultCounter, max_member_mb: float = MAX_MEMBER_MB) -> Iterator[dict]:
    """Group tar members into samples {"__key__", "<ext>": bytes, ...}.

    Our own reader rather than wds.tarfile_samples: a truncated or garbage tar must cost exactly one
    bad_tar count and never leak a half-read sample into the next shard's stream.

    A member is read only if it is a plain member of at most `max_member_mb` MB lying within the file: a
    crafted header may declare any size (a GNU sparse member 64 GiB of holes in a 1 MB shard). A sparse or
    larger member's sample comes out as {"__key__", "__url__", "__refused__": why}, its members unread, for
    decode_samples to count as a bad_image. Refused samples stay in the stream (rather than being dropped
    here) so a position counts the same raw samples whatever the cap. A member declaring more data than the
    file holds is a truncated tar (bad_tar). Members named KEY.__EXT (not data of ours) are ignored, so a
    member cannot overwrite the sample's __key__ or __url__.
    """
    cap = int(max_member_mb * 2**20)
    for path in paths:
        sample: dict | None = None
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                end = os.fstat(f.fileno()).st_size
                for member in tar:
                    key, ext = wds.tariterators.base_plus_ext(member.name) if member.isreg() else (None, None)
                    ours = key is not None and not ext.startswith("__")
                    if ours and sample is not None and sample["__key__"] != key:
                        yield sample  # complete: the next sample's first header has been read
                        sample = None
                    # tar.offset: where the next header starts. Past the end, tarfile would step there block by
                    # block (forever, for a size like 2**80) before noticing: stop here instead.
                    if tar.offset > end:
                        raise tarfile.ReadError(f"member '{member.name}' declares {member.size} bytes, past the "
                                                f"end of the {end}-byte file")
                    if not ours:
                        continue
                    if sample is None:
                        sample = {"__key__": key, "__url__": path}
                    if _REFUSED in sample:
                        continue  # the rest of a refused sample stays unread
                    if member.issparse() or not 0 <= member.size <= cap:
                        why = ("is sparse" if member.issparse()
                               else f"is over data.max_member_mb ({max_member_mb:g} MB)")
                        sample = {"__key__": key, "__url__": path,
                                  _REFUSED: f"member '{member.name}' declares {member.size} bytes and {why}; not read"}
                        continue
                    sample[ext.lower()] = tar.extractfile(member).read()
            if sample is not None:
                yield sample
        except Exception as e:  # noqa: BLE001
            # tarfile raises assorted types on crafted headers (ReadError, EOFError, IndexError from a cut-off
            # sparse extension block, MemoryError as a last resort): each is a shard that could not be read to
            # its end. The sample being read when it broke is dropped with the tar.
            faults.add("bad_tar", path, e if isinstance(e, (OSError, tarfile.TarError)) else repr(e))


def _where(sample: dict) -> str:
    """What a fault names (and counts distinct faults by): shard and key."""
    return f"{sample['__url__']}:{sample['__key__']}"


def decode_samples(samples: Iterator[dict], num_classes: int, faults: FaultCounter,
                   max_image_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[dict]:
    """Labelled RGB images; a sample whose image is missing, broken or over `max_image_pixels` (checked on its
    header, before it is decoded) counts as a bad_image."""
    for s in samples:
        if _REFUSED in s:
            faults.add("bad_image", _where(s), s[_REFUSED])
            continue
        try:
            label = int(s["cls"].decode("ascii").strip())
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            faults.add("bad_label", _where(s), f"missing or non-integer .cls: {e!r}")
            continue
        if not 0 <= label < num_classes:
            faults.add("label_out_of_range", _where(s), f"label {label} not in [0, {num_classes})")
            continue
        data = next((s[e] for e in _IMAGE_EXTS if e in s), None)
        try:
            if data is None:
                raise ValueError("no .png/.jpg member")
            with open_image(io.BytesIO(data), max_image_pixels, "data.max_image_pixels") as im:
                img = im.convert("RGB")  # convert() forces the full decode, so corrupt data fails here
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
            faults.add("bad_image", _where(s), e)
            continue
        yield {"key": s["__key__"], "img": img, "label": label, "index": s.get("__index__")}


class _SavedRngs:
    """A context that saves the global python/numpy/torch (CPU) RNG states on entry and puts them back on exit,
    whatever ran inside it (and however it ended)."""

    def __enter__(self) -> _SavedRngs:
        self.saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        return self

    def __exit__(self, *exc) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])


def _rng_seeds(seed: str) -> tuple[int, int, int]:
    """The python, numpy and torch seeds of an IsolatedRng: drawn from random.Random(seed) (a string seed hashes
    with sha512 there: the same in every process and Python run)."""
    r = random.Random(seed)
    return r.getrandbits(64), r.getrandbits(32), r.getrandbits(63)


def _seed_rngs(seeds: tuple[int, int, int]) -> None:
    """Sets the global RNGs to the states of generators freshly seeded with `seeds`: random.seed(n) gives
    random.Random(n)'s state, np.random.seed(n) np.random.RandomState(n)'s, and the default torch generator's
    manual_seed(n) torch.Generator().manual_seed(n)'s (torch.manual_seed would also seed CUDA's)."""
    random.seed(seeds[0])
    np.random.seed(seeds[1])
    torch.default_generator.manual_seed(seeds[2])


class IsolatedRng:
    """Runs the transform under its own python/numpy/torch RNG states (training: seeded per sample, by
    (seed, epoch, rank, worker, the sample's place in the epoch's shuffled stream), so a resumed stream draws
    the same augmentation for each sample without replaying the ones before it). A second call goes on from
    the states the first one left.

    Random augmentations then do not depend on (or disturb) the trainer's global RNG, and give the same
    result whether the pipeline runs in-process (workers=0) or in a DataLoader worker.

    The states are those of random.Random, np.random.RandomState and torch.Generator seeded with _rng_seeds(seed),
    set by seeding the global generators (_seed_rngs: cheaper than building each and copying its state in). A
    train stream seeds them the same way for each sample but saves and restores the global states once per batch
    (_transformed, _batches): the same augmentation as an IsolatedRng per sample, at a fraction of the cost.
    """

    def __init__(self, seed: str):
        self._seeds = _rng_seeds(seed)
        self._states: tuple | None = None  # the states the last call left

    def __call__(self, fn: Callable, x):
        with _SavedRngs():
            if self._states is None:
                _seed_rngs(self._seeds)
            else:
                random.setstate(self._states[0])
                np.random.set_state(self._states[1])
                torch.set_rng_state(self._states[2])
            try:
                return fn(x)
            finally:
                self._states = random.getstate(), np.random.get_state(), torch.get_rng_state()


def _transformed(samples: Iterator[dict], transform: Transform, seed: str | None) -> Iterator[dict]:
    """seed None: the transform as it is (evaluation); else each sample under the RNG states of an
    IsolatedRng of (seed, index), set in the global RNGs without saving them: the consumer (_batches with
    keep_rngs) saves them before taking a batch's samples and puts them back before the batch leaves."""
    for s in samples:
        img = s.pop("img")
        if seed is not None:
            _seed_rngs(_rng_seeds(seed_string(seed, s["index"])))
        s["image"] = transform(img)
        yield s


class Position:
    """Where a train worker is: its epoch and how many samples of that epoch's shuffled raw stream it has taken."""

    def __init__(self, epoch: int = 0, taken: int = 0) -> None:
        self.epoch, self.taken = epoch, taken

    def counted(self, raw: Iterator[dict]) -> Iterator[dict]:
        for sample in raw:
            self.taken += 1
            sample["__index__"] = self.taken
            yield sample


def _batches(samples: Iterator[dict], batch_size: int, partial_last: bool, worker: int, faults: FaultCounter,
             position: Position | None = None, keep_rngs: bool = False):
    """Items sent to the main process: {"worker", "faults", "position", "batch"}; a final item with batch=None
    says "this worker is done" and carries the last faults (faults after the last batch would else be lost).

    The stages are lazy generators: when a batch is complete nothing past its last sample has been taken, so
    the position sent with it is exactly the end of that batch. keep_rngs: the stages set the global RNGs
    (seeded transforms); they are saved before a batch's samples are taken and put back before it leaves,
    so the code the batch goes to (the trainer itself, with workers=0) finds them as it left them."""
    def item(batch):
        where = None if position is None else (position.epoch, position.taken)
        return {"worker": worker, "faults": faults.take_new(), "position": where, "batch": batch}

    samples = iter(samples)
    while True:
        with _SavedRngs() if keep_rngs else contextlib.nullcontext():
            buf = list(itertools.islice(samples, batch_size))
        if len(buf) < batch_size:
            break
        yield item(_collate(buf))
    if buf and partial_last:
        yield item(_collate(buf))
    yield item(None)


def _collate(samples: list[dict]) -> dict:
    # default_collate stacks the images straight into shared memory in a DataLoader worker: the batch is sent
    # through shared memory, and would otherwise be copied there when it is sent.
    return {
        "keys": [s["key"] for s in samples],
        "images": default_collate([s["image"] for s in samples]),
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
    def __init__(self, shards, rank, world, batch_size, transform, num_classes, seed, shuffle_buffer, *,
                 max_member_mb=MAX_MEMBER_MB, max_image_pixels=MAX_IMAGE_PIXELS):
        super().__init__()
        self.shards, self.rank, self.world, self.batch_size = shards, rank, world, batch_size
        self.transform, self.num_classes, self.seed, self.shuffle_buffer = transform, num_classes, seed, shuffle_buffer
        self.max_member_mb, self.max_image_pixels = max_member_mb, max_image_pixels
        self.start: dict[int, tuple[int, int]] = {}  # worker -> (epoch, samples taken): where to begin

    def _samples(self, worker: int, workers: int, faults: FaultCounter, position: Position) -> Iterator[dict]:
        tried: set[str] = set()
        found = position.taken > 0 or position.epoch > 0
        skip = position.taken
        for epoch in itertools.count(position.epoch):
            position.epoch, position.taken = epoch, 0
            mine = epoch_shards(self.shards, self.seed, epoch, self.rank, self.world, worker, workers)
            seed = seed_string(self.seed, epoch, self.rank, worker)
            raw = read_tars(mine, faults, self.max_member_mb)
            # Shuffle raw bytes (small) before decoding, so the buffer never holds decoded images.
            raw = position.counted(wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer),
                                               rng=random.Random(seed))(raw))
            # Resuming: the samples already taken are read (the shuffle must see them) but not decoded.
            for _ in itertools.islice(raw, skip):
                pass
            skip = 0
            samples = decode_samples(raw, self.num_classes, faults, self.max_image_pixels)
            for s in _transformed(samples, self.transform, seed):
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
        position = Position(*self.start.get(worker, (0, 0)))
        pipeline = wds.DataPipeline(
            partial(self._samples, worker, workers, faults, position),
            partial(_batches, batch_size=self.batch_size, partial_last=False, worker=worker, faults=faults,
                    position=position, keep_rngs=True),
        )
        try:
            yield from pipeline
        except UserError as e:
            # Exceptions from DataLoader workers reach the main process as tracebacks; send the message as data.
            yield {"worker": worker, "faults": faults.take_new(), "position": None, "batch": None, "error": str(e)}


class _EvalShards(IterableDataset):
    def __init__(self, shards, rank, world, batch_size, transform, num_classes, *, max_member_mb=MAX_MEMBER_MB,
                 max_image_pixels=MAX_IMAGE_PIXELS):
        super().__init__()
        self.shards, self.rank, self.world, self.batch_size = shards, rank, world, batch_size
        self.transform, self.num_classes, self.max_member_mb = transform, num_classes, max_member_mb
        self.max_image_pixels = max_image_pixels

    def __iter__(self):
        worker, workers = _worker_slot()
        faults = FaultCounter()
        mine = self.shards[self.rank :: self.world][worker::workers]
        return iter(
            wds.DataPipeline(
                lambda: read_tars(mine, faults, self.max_member_mb),
                partial(decode_samples, num_classes=self.num_classes, faults=faults,
                        max_image_pixels=self.max_image_pixels),
                partial(_transformed, transform=self.transform, seed=None),
                partial(_batches, batch_size=self.batch_size, partial_last=True, worker=worker, faults=faults),
            )
        )


# --------------------------------------------------------------------------- main-process streams


def _identity(x):
    return x


def _own_process_group(worker_id: int) -> None:  # noqa: ARG001
    """A DataLoader worker leaves its rank's process group: torchrun passes SIGTERM to each rank's whole group,
    and a worker killed by it would fail the rank before the rank could save its checkpoint. The worker still
    stops with its rank (the DataLoader shuts it down, and it exits by itself once its rank is gone).
    Other launchers signal every process one by one (DeepSpeed's launch process terminates each rank's whole
    process tree; Slurm's `--signal` reaches every process of a job step): a worker ignores every signal its rank
    handles as a request to stop, and leaves the stopping to the rank."""
    os.setsid()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
        worker_init_fn=_own_process_group,
    )


class _Progress:
    """What the main process has taken from a stream's workers: their faults (distinct, all workers), each
    worker's position after its latest batch taken, and the number of batches taken."""

    def __init__(self) -> None:
        self.faults = FaultCounter()
        self.positions: dict[int, tuple[int, int]] = {}
        self.batches = 0


def _merge_workers(items: Iterator[dict], workers: int, progress: _Progress) -> Iterator[dict]:
    """Yield batches round-robin over workers (worker 0, 1, ..., skipping finished ones).

    The DataLoader already round-robins, but once a worker finishes, which worker gets the next slot
    depends on timing; re-ordering by worker id here makes the order deterministic. The buffer stays
    small because the DataLoader's own order differs from this one only after a worker has finished.
    A resumed train stream starts at the turn its batch count gives (train workers never finish).
    """
    pending = {w: deque() for w in range(max(workers, 1))}
    active = list(pending)
    turn = progress.batches % len(active)
    while active:
        w = active[turn % len(active)]
        while not pending[w]:
            item = next(items)  # cannot run dry: a worker's final item (batch=None) always arrives
            pending[item["worker"]].append(item)
        item = pending[w].popleft()
        progress.faults.update(item["faults"])
        if item.get("error"):
            raise UserError(item["error"])
        if item["batch"] is None:
            active.remove(w)
            continue  # `turn` now already points at the next worker
        if item["position"] is not None:
            progress.positions[w] = item["position"]
        progress.batches += 1
        turn = (turn + 1) % len(active)
        yield item["batch"]


def loader_workers(shards: int, world: int, workers: int) -> int:
    """The loader workers a rank of a train stream can use: `workers`, or fewer when `shards` train shards cannot
    give every (rank, worker) shards of its own (a small data set); 0 stays 0 (reading in the rank itself)."""
    return max(1, min(workers, shards // world)) if workers else 0


def require_shards(shards: list[str], world: int, workers: int) -> None:
    """Every (rank, worker) of a train stream reads its own shards: there must be at least that many."""
    need = world * max(workers, 1)
    if len(shards) < need:
        raise UserError(f"data.train_shards: {len(shards)} shards for {world} ranks x {max(workers, 1)} workers; "
                        f"need at least {need}")


def _check_caps(max_member_mb: float, max_image_pixels: int) -> None:
    if not max_member_mb > 0:
        raise ValueError(f"max_member_mb {max_member_mb} must be > 0")
    if not max_image_pixels > 0:
        raise ValueError(f"max_image_pixels {max_image_pixels} must be > 0")


class TrainStream:
    """Infinite iterator of full batches {"keys", "images" [B,3,H,W], "labels" [B]} for one rank.

    `state_dict()` / `load_state_dict()`: the exact position after the latest batch, for a resume with the same
    shards, rank, world and workers. `start_epoch`: begin at the start of that epoch instead (a resume on
    another world size, where positions cannot carry over because the shards are dealt out differently).
    `max_member_mb`: larger (and sparse) tar members are refused unread, their samples counted as bad_image;
    `max_image_pixels`: larger images are not decoded, their samples counted as bad_image.
    """

    def __init__(self, shards: list[str], *, rank: int, world: int, batch_size: int, transform: Transform,
                 num_classes: int, seed: int, workers: int, shuffle_buffer: int, pin_memory: bool = False,
                 start_epoch: int = 0, max_member_mb: float = MAX_MEMBER_MB,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        require_shards(shards, world, workers)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        _check_caps(max_member_mb, max_image_pixels)
        self._dataset = _TrainShards(list(shards), rank, world, batch_size, transform, num_classes, seed,
                                     shuffle_buffer, max_member_mb=max_member_mb, max_image_pixels=max_image_pixels)
        self._dataset.start = {w: (start_epoch, 0) for w in range(max(workers, 1))}
        self._loader = _loader(self._dataset, workers, pin_memory, persistent=False)
        self._workers, self._world = workers, world
        self._progress = _Progress()
        self._it: Iterator[dict] | None = None  # started lazily: constructing reads nothing

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = _merge_workers(iter(self._loader), self._workers, self._progress)
        return next(self._it)

    def faults(self) -> dict[str, int]:
        """Distinct samples (tars) skipped so far on this rank, per kind."""
        return self._progress.faults.snapshot()

    def state_dict(self) -> dict:
        """JSON-able: per worker [epoch, samples taken], batches taken, faults found."""
        return {"world": self._world, "workers": self._workers, "batches": self._progress.batches,
                "positions": {str(w): list(p) for w, p in sorted(self._progress.positions.items())},
                "faults": {k: sorted(v) for k, v in self._progress.faults.seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch `state` was taken at (before the first batch is drawn)."""
        if self._it is not None:
            raise RuntimeError("load_state_dict after iteration started")
        if (state["world"], state["workers"]) != (self._world, self._workers):
            raise ValueError(f"a stream of {state['world']} ranks x {state['workers']} workers cannot continue "
                             f"on {self._world} x {self._workers}")
        for w, (epoch, taken) in state["positions"].items():
            self._dataset.start[int(w)] = (epoch, taken)
        self._progress.batches = state["batches"]
        self._progress.faults.update([(k, where) for k, v in state["faults"].items() for where in v])

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
                 num_classes: int, workers: int = 0, pin_memory: bool = False, max_member_mb: float = MAX_MEMBER_MB,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        _check_caps(max_member_mb, max_image_pixels)
        dataset = _EvalShards(list(shards), rank, world, batch_size, transform, num_classes,
                              max_member_mb=max_member_mb, max_image_pixels=max_image_pixels)
        self._loader = _loader(dataset, workers, pin_memory, persistent=True)  # no worker start-up per pass
        self._workers = workers
        self._progress = _Progress()

    def __iter__(self) -> Iterator[dict]:
        self._progress = _Progress()
        return _merge_workers(iter(self._loader), self._workers, self._progress)

    def faults(self) -> dict[str, int]:
        return self._progress.faults.snapshot()
