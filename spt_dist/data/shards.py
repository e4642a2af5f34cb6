"""Write image-classification data sets as webdataset tar shards.

On-disk format (one directory per data set):
  {split}-{i:06d}.tar  members KEY.png or KEY.jpg (encoded image bytes) and KEY.cls (decimal label, ASCII)
  sizes.json           {"train-000000.tar": 250, ...}: sample count per shard, all splits (read_sizes checks it)
  classes.json         ["name0", "name1", ...]: class names, index = label

CLI:  python -m spt_dist.data.shards folder --src DIR --out DIR [--split train] ...
      python -m spt_dist.data.shards list --root DIR --list FILE [--list FILE ...] --out DIR --split NAME ...
      python -m spt_dist.data.shards vtab --root VTAB_1K_DIR --out DIR [--tasks cifar100,dtd] [--protocol val]
      python -m spt_dist.data.shards fgvc --root FGVC_DIR --out DIR [--tasks cub,dogs] [--protocol val]
      python -m spt_dist.data.shards synthetic --out DIR [--classes 10] [--size 32] [--format png|jpg] ...
      python -m spt_dist.data.shards digits --out DIR --digits 5-9 [--size 32]
  `list` reads split files (.txt, .csv, .json: see `list --help`); `vtab` and `fgvc` run it over the usual
  layouts of the benchmarks (VTAB-1k as NOAH/SPT ship it, FGVC as VPT does) into DIR/<task>/.

What `folder`, `list` and the presets pack: regular files inside the source tree (--src, --root; links are
followed only within it, a class directory linking out of it is an error), of at most --max-file-mb and
--max-image-pixels (from the header, nothing decoded), that PIL reads as images. Other files are skipped: named on
stderr (the first few of each kind) and counted in the summary. A split appears whole or not at all: its shards,
sizes.json and classes.json are written into a hidden directory (beside --out, or inside it) and moved in at the end.

Deliberately torch-free (numpy + PIL only) so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import csv
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import stat
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image

from spt_dist.atomic import atomic_file, make_temp_dir, open_regular, require_directory, write_json
from spt_dist.cli import command
from spt_dist.data.benchmarks import SUITES, Task
from spt_dist.errors import UserError

IMAGE_EXTS = ("png", "jpg")
SIZES_FILE = "sizes.json"
CLASSES_FILE = "classes.json"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
# The image files ImageFolder trees are read for.
_KEPT_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
# Image formats whose bytes are stored as they are, under the suffix of what they are (whatever the file's name);
# others are re-encoded as PNG.
_KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg"}
# The largest tar member the loader reads (data.max_member_mb's default): the shard tool skips larger image
# files (--max-file-mb), which the loader would refuse unread anyway.
MAX_MEMBER_MB = 64.0
# The largest image, in pixels, the loader decodes (data.max_image_pixels's default) and the shard tool packs
# (--max-image-pixels). The loader decodes a whole image before resizing it: 25 Mpx is 75 MB as 8-bit RGB (more
# while converting from other modes) in every loader worker of every rank. That is above the ordinary photo of a
# camera or phone (12-24 Mpx), and far above the benchmarks' images (VTAB, FGVC: about 0.1-1 Mpx), yet far
# below PIL's own limit (~179 Mpx: 0.5 GB decoded, several times that while converting).
MAX_IMAGE_PIXELS = 25_000_000
_MAX_FILE_BYTES = int(MAX_MEMBER_MB * 2**20)

Sample = tuple[str, bytes, str, int]  # (key, image bytes, "png"|"jpg", label)


# --------------------------------------------------------------------------- reading images (shard tool and loader)


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than the cap: refused before it is decoded."""


def open_image(fp, max_pixels: int, cap: str) -> Image.Image:
    """PIL's Image.open, which reads the header only (nothing is decoded yet), with the pixel cap checked on the
    size the header declares; `cap` names the setting in the message. The shard tool checks what it packs with
    it, and the loader what it decodes, so the two agree."""
    with warnings.catch_warnings():
        # PIL warns from ~89 Mpx and refuses from ~179 Mpx by itself: our cap, lower by default, decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise TooManyPixels(f"over PIL's own limit ({e})") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise TooManyPixels(f"{width}x{height} = {width * height} pixels, over {cap} ({max_pixels})")
    return im


# --------------------------------------------------------------------------- writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) so the same samples always give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: str, samples: list[Sample]) -> None:
    with atomic_file(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, ext, label in samples:
            _tar_member(tar, f"{key}.{ext}", data)
            _tar_member(tar, f"{key}.cls", str(label).encode())


def _check_sample(sample: Sample) -> None:
    key, data, ext, label = sample
    # webdataset groups tar members by the name up to the first dot, so a key must not contain one.
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r}: must be non-empty without '.' or '/'")
    if ext not in IMAGE_EXTS:
        raise ValueError(f"sample {key}: image extension {ext!r} is not one of {IMAGE_EXTS}")
    if not isinstance(data, bytes) or isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"sample {key}: need bytes image data and an int label >= 0")


def read_json(path: str, default=None):
    """A metadata file (sizes.json, classes.json), or `default` if it does not exist."""
    if not os.path.exists(path):
        return default
    try:
        with open_regular(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None
    except RecursionError:  # nested deeper than the parser goes: no file we write is
        raise UserError(f"{path}: cannot read JSON (nested too deeply)") from None


# The fewest bytes a sample takes in a tar: two members (image, label) of at least a 512-byte header each.
_MIN_SAMPLE_BYTES = 1024


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_sizes(directory: str, replacing: re.Pattern | None = None) -> dict[str, int]:
    """sizes.json in `directory` ({shard file name: sample count}; {} if there is none), every entry checked:
    a JSON integer >= 0, and no more than its shard file (where it exists) can hold. The counts decide the epoch
    length, so a wrong one would end a run untrained (negative) or never (1e12). `replacing`: entries whose
    names match are left out unchecked (the shard tool is about to replace them)."""
    path = os.path.join(directory, SIZES_FILE)
    sizes = read_json(path, {})
    if not isinstance(sizes, dict):
        raise UserError(f"{path}: must be a JSON object {{shard file name: sample count}}, not a "
                        f"{type(sizes).__name__}")
    checked: dict[str, int] = {}
    for name, count in sizes.items():
        if replacing is not None and replacing.match(name):
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UserError(f"{path}: shard {_short(name)}: sample count {_short(count)} is not an integer >= 0")
        try:
            size = os.stat(os.path.join(directory, name)).st_size
        except (OSError, ValueError):  # not there (another node's copy may hold only some splits): unchecked
            size = None
        if size is not None and count > size // _MIN_SAMPLE_BYTES:
            raise UserError(f"{path}: shard {_short(name)}: sample count {_short(count)} cannot fit in its {size} "
                            f"bytes (at most {size // _MIN_SAMPLE_BYTES})")
        checked[name] = count
    return checked


# Without --samples-per-shard / --num-shards: shards of at most this many samples, and at least MIN_SHARDS of them
# (fewer only when there are fewer samples), so that a small data set still gives every rank x loader worker of an
# ordinary run (32 ranks x 2 workers) shards of its own.
MAX_SAMPLES_PER_SHARD = 1000
MIN_SHARDS = 64


def shard_sizes(total: int, samples_per_shard: int | None = None, num_shards: int | None = None) -> list[int]:
    """Samples in each shard of a split of `total`: `samples_per_shard` each (the last one takes the rest), or
    exactly `num_shards` shards as even as possible (a run needs at least ranks x loader workers train shards);
    neither: as many even shards as MAX_SAMPLES_PER_SHARD and MIN_SHARDS ask for."""
    if num_shards is None and samples_per_shard is None:
        num_shards = max(math.ceil(total / MAX_SAMPLES_PER_SHARD), min(MIN_SHARDS, total))
    if num_shards is not None:
        if not 1 <= num_shards <= total:
            raise UserError(f"--num-shards: {num_shards} shards for {total} samples; must be in [1, {total}]")
        base, extra = divmod(total, num_shards)
        return [base + 1] * extra + [base] * (num_shards - extra)
    if samples_per_shard is None or samples_per_shard < 1:
        raise UserError(f"--samples-per-shard: must be >= 1, got {samples_per_shard}")
    full, rest = divmod(total, samples_per_shard)
    return [samples_per_shard] * full + ([rest] if rest else [])


def write_split(samples: Iterable[Sample], out_dir: str, split: str, sizes: list[int],
                classes: list[str] | None = None) -> list[str]:
    """Write `samples` as out_dir/{split}-{i:06d}.tar shards of `sizes` samples each (see shard_sizes); update
    sizes.json and, given `classes`, write classes.json. Returns the shard file names.

    Streams: at most one shard of samples is held in memory. All or nothing: the shards are written into a
    hidden directory (beside out_dir, or inside it if it exists) and moved in only once every one is complete,
    so a run that fails (a bad image, a full disk, an interrupt) leaves out_dir as it was. Shards of the same
    split left over from an earlier, larger run are deleted so a glob over the directory never mixes two runs.
    """
    if not _SPLIT_RE.match(split):
        raise UserError(f"--split: {split!r} must be letters, digits or '_'")
    if not sizes:
        raise UserError(f"split '{split}': no samples to write")
    ours = re.compile(rf"^{split}-\d{{6}}\.tar$")
    require_directory(out_dir, "--out")
    read_sizes(out_dir, replacing=ours)  # a broken sizes.json stops the tool before it writes anything
    if os.path.isdir(out_dir):  # inside it: its parent need not be ours to write; the shards are moved in
        stage = make_temp_dir(out_dir, split, "--out")
    else:  # beside it: renamed into place whole
        out_abs = os.path.abspath(out_dir)
        stage = make_temp_dir(os.path.dirname(out_abs), os.path.basename(out_abs), "--out")
    try:
        written: dict[str, int] = {}
        stream = iter(samples)
        for i, size in enumerate(sizes):
            shard = list(itertools.islice(stream, size))
            if len(shard) != size:
                raise ValueError(f"split '{split}': {len(shard)} samples left for shard {i} of {size}")
            for sample in shard:
                _check_sample(sample)
            name = f"{split}-{i:06d}.tar"
            _write_shard(os.path.join(stage, name), shard)
            written[name] = size
        if next(stream, None) is not None:
            raise ValueError(f"split '{split}': more samples than the {sum(sizes)} planned")
        _move_in(stage, out_dir, ours, written, classes)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already where it became out_dir
    return list(written)


def _move_in(stage: str, out_dir: str, ours: re.Pattern, written: dict[str, int], classes: list[str] | None) -> None:
    """Put a split's complete shards (in `stage`, beside or inside out_dir) into out_dir, with its sizes.json
    entries and classes.json."""
    if not os.path.lexists(out_dir):
        # A new directory: completed in the stage and renamed into place in one step.
        write_json(os.path.join(stage, SIZES_FILE), dict(sorted(written.items())))
        if classes is not None:
            write_classes(stage, classes)
        with contextlib.suppress(OSError):  # made meanwhile by another run (and not empty): merge into it below
            os.rename(stage, out_dir)
            return
    # Into an existing directory, file by file (renames within one file system: once the shards are written,
    # little is left that can fail).
    merged = read_sizes(out_dir, replacing=ours)  # read now: another split may have been written meanwhile
    try:
        for name in written:
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
        for stale in sorted(n for n in os.listdir(out_dir) if ours.match(n) and n not in written):
            os.unlink(os.path.join(out_dir, stale))
    except OSError as e:
        raise UserError(f"--out: cannot move the shards into '{out_dir}' ({e.strerror or e})") from None
    merged.update(written)
    write_json(os.path.join(out_dir, SIZES_FILE), dict(sorted(merged.items())))
    if classes is not None:
        write_classes(out_dir, classes)


def write_classes(out_dir: str, names: list[str]) -> None:
    write_json(os.path.join(out_dir, CLASSES_FILE), names)


# --------------------------------------------------------------------------- image files (folder, list, presets)


class ImageFile(NamedTuple):
    path: str
    label: int
    where: str  # what an error about this image names: "--src", or the split list's "FILE:LINE" / "FILE: key 'K'"


class ImageTree(NamedTuple):
    """Where image files may come from, and how large they may be."""
    root: str  # a real path: files (links followed) whose real path is not below it are skipped
    name: str  # what messages call the input: "--src 'DIR'", the split lists
    max_bytes: int = _MAX_FILE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS


# Why the shard tool leaves an image file out, as its summary counts them.
SKIPPED = {"outside": "leaving the tree", "unreadable": "unreadable", "not_regular": "not a regular file",
           "empty": "empty", "too_big": "over the size cap", "not_image": "not an image",
           "too_many_pixels": "over the pixel cap"}
_WARN_PER_KIND = 5  # files named on stderr per kind of skip; the summary counts the rest


class _Skipped(Exception):
    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


@contextlib.contextmanager
def _open_image_file(path: str, tree: ImageTree) -> Iterator[io.BufferedReader]:
    """The file at `path`, open for reading, if it is a regular file of 1 to tree.max_bytes bytes inside the
    tree (after links); else _Skipped. Links are followed, but one out of the tree (to /etc/passwd, /dev/zero)
    would pack whatever it points at."""
    real = os.path.realpath(path)
    if not _inside(real, tree.root):
        raise _Skipped("outside", f"a link out of the tree, to '{real}'")
    try:
        # O_NONBLOCK: opening a FIFO would wait for a writer. O_NOFOLLOW: `real` has no links left; one there now
        # (or a loop, which realpath leaves unresolved) fails with ELOOP.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise _Skipped("unreadable", f"cannot open it ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        info = os.fstat(fd)  # of what was opened: nothing can swap it between this check and the reads
        if not stat.S_ISREG(info.st_mode):
            raise _Skipped("not_regular", "not a regular file (a device, FIFO, socket or directory)")
        if info.st_size == 0:
            raise _Skipped("empty", "an empty file")
        if info.st_size > tree.max_bytes:
            raise _Skipped("too_big", f"{info.st_size} bytes, over --max-file-mb ({tree.max_bytes / 2**20:g} MB)")
        yield f


def _image_kind(fp, tree: ImageTree, decode: bool) -> str | None:
    """"png" or "jpg": an image of that format, stored as it is; None: another format, to re-encode (`decode`:
    decoded now, so that a broken one is skipped here rather than failing the run while its shard is written).
    Otherwise _Skipped. A cheap check: PNG and JPEG files are not decoded, only their headers read."""
    try:
        with open_image(fp, tree.max_pixels, "--max-image-pixels") as im:
            kind = _KEPT_FORMATS.get(im.format)
            if kind is None and decode:
                im.load()
            return kind
    except TooManyPixels as e:
        raise _Skipped("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...) on junk
        raise _Skipped("not_image", f"not an image PIL can read ({e})") from None


def check_images(files: Iterable[ImageFile], tree: ImageTree) -> tuple[list[ImageFile], Counter]:
    """The files the shard tool packs, and the number it skips per kind (SKIPPED), each checked as it will be
    read (_open_image_file, _image_kind); the first few skipped of each kind are named on stderr."""
    kept: list[ImageFile] = []
    skipped: Counter = Counter()
    for image in files:
        try:
            with _open_image_file(image.path, tree) as f:
                _image_kind(f, tree, decode=True)
        except _Skipped as e:
            skipped[e.kind] += 1
            if skipped[e.kind] <= _WARN_PER_KIND:
                print(f"spt-shards: warning: {image.where}: skipping '{image.path}': {e}", file=sys.stderr)
            continue
        kept.append(image)
    return kept, skipped


def skipped_text(skipped: Counter) -> str:
    return ", ".join(f"{skipped[kind]} {what}" for kind, what in SKIPPED.items() if skipped[kind])


def _image_bytes(image: ImageFile, tree: ImageTree) -> tuple[bytes, str]:
    try:
        with _open_image_file(image.path, tree) as f:
            data = f.read(tree.max_bytes + 1)
        if len(data) > tree.max_bytes:
            raise _Skipped("too_big", f"over --max-file-mb ({tree.max_bytes / 2**20:g} MB)")
        kind = _image_kind(io.BytesIO(data), tree, decode=False)  # again: these are the bytes that are packed
        if kind:
            return data, kind
        # PNG is lossless, and the loader decodes every image to RGB anyway.
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue(), "png"
    except (_Skipped, OSError, ValueError, SyntaxError) as e:  # the last three: PIL's, re-encoding
        # It passed check_images: it changed since. The split is planned without it, so the run stops (and,
        # writing into a stage, leaves nothing behind).
        raise UserError(f"{image.where}: '{image.path}' changed while being packed ({e}); run again") from None


class ImageSamples:
    """The samples of image files in a seed-shuffled order, read lazily; the files are checked first
    (check_images: those the shard tool will not pack are skipped and counted in `skipped`), so their number is
    known before any is packed and the shard sizes can be planned (--num-shards)."""

    def __init__(self, files: Iterable[ImageFile], split: str, seed: int, tree: ImageTree) -> None:
        files = list(files)
        self.files, self.skipped = check_images(files, tree)
        if not self.files:
            raise UserError(f"{tree.name}: no image to pack; skipped all {len(files)} files "
                            f"({skipped_text(self.skipped)})")
        # Shuffle before sharding so every shard mixes classes (shard-level shuffling at train time relies on it).
        random.Random(seed).shuffle(self.files)
        self.split, self.tree = split, tree

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Sample]:
        for i, image in enumerate(self.files):
            yield f"{self.split}_{i:08d}", *_image_bytes(image, self.tree), image.label


def write_image_split(out: str, split: str, classes: list[str], samples: ImageSamples, sizes: list[int],
                      source: str) -> None:
    """Shard one split (`sizes`: see shard_sizes) and write classes.json; `source` names the input in errors."""
    existing = read_json(os.path.join(out, CLASSES_FILE), None)
    other_splits = list(read_sizes(out, replacing=re.compile(rf"^{re.escape(split)}-")))
    # Labels are indices into classes.json: another split written with different classes would be mislabelled.
    if existing is not None and existing != classes and other_splits:
        raise UserError(f"{source}: classes differ from {os.path.join(out, CLASSES_FILE)} "
                        f"(used by {other_splits[0]}); write to a fresh --out")
    names = write_split(samples, out, split, sizes, classes)
    _report(out, split, names)
    if samples.skipped:
        print(f"{split}: skipped {sum(samples.skipped.values())} of {len(samples) + sum(samples.skipped.values())} "
              f"files: {skipped_text(samples.skipped)}")


# --------------------------------------------------------------------------- ImageFolder


def folder_samples(src: str, split: str, seed: int, max_bytes: int = _MAX_FILE_BYTES,
                   max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[str], ImageSamples]:
    """Classes (sorted sub-directory names) and the seed-shuffled samples of an ImageFolder tree: regular image
    files inside it (links followed only within it), of at most `max_bytes` bytes and `max_pixels` pixels."""
    if not os.path.isdir(src):
        raise UserError(f"--src: no such directory '{src}'")
    root = os.path.realpath(src)
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    for name in classes:
        real = os.path.realpath(os.path.join(src, name))
        if not _inside(real, root):
            # Refused rather than skipped: leaving out a class would shift the labels of every class after it.
            raise UserError(f"--src: class directory '{name}' is a link to '{real}', outside '{src}'; copy it in "
                            "or remove the link")
    files: list[ImageFile] = []
    for label, name in enumerate(classes):
        # Links to directories below a class are not followed (os.walk's default): no loops, no second copies.
        for root_dir, dirs, fnames in os.walk(os.path.join(src, name)):
            dirs.sort()  # os.walk order is file-system dependent; sorting makes the seeded shuffle reproducible
            for fname in sorted(fnames):
                if os.path.splitext(fname)[1].lower() in _KEPT_EXTS and not fname.startswith("."):
                    files.append(ImageFile(os.path.join(root_dir, fname), label, "--src"))
    if not files:
        raise UserError(f"--src: no .jpg/.jpeg/.png images in class sub-directories of '{src}'")
    return classes, ImageSamples(files, split, seed, ImageTree(root, f"--src '{src}'", max_bytes, max_pixels))


def _cmd_folder(args: argparse.Namespace) -> None:
    classes, samples = folder_samples(args.src, args.split, args.seed, *_limits(args))
    sizes = shard_sizes(len(samples), args.samples_per_shard, args.num_shards)
    write_image_split(args.out, args.split, classes, samples, sizes, f"--src '{args.src}'")


# --------------------------------------------------------------------------- split lists

PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path", "img")
LABEL_COLUMNS = ("label", "class_id", "class", "target", "category_id")
_INT_RE = re.compile(r"^[+-]?\d+$")


class ListedImage(NamedTuple):
    path: str  # relative to the image root
    label: str  # as written: a class index or a class name
    where: str  # "FILE:LINE", "FILE: key 'K'" or "FILE: item I", for errors


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (spreadsheet exports) is not text
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _pick_column(available: Iterable[str], candidates: tuple[str, ...], given: str | None, flag: str,
                 where: str) -> str:
    available = list(available)
    if given is not None:
        if given not in available:
            raise UserError(f"{where}: no '{given}' ({flag}) among {available}")
        return given
    found = next((c for c in candidates if c in available), None)
    if found is None:
        raise UserError(f"{where}: none of {', '.join(candidates)} among {available}; name it with {flag}")
    return found


def _read_txt(path: str) -> list[ListedImage]:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)  # on the last whitespace: paths may contain spaces
        if len(parts) != 2:
            raise UserError(f"{path}:{n}: expected 'IMAGE_PATH LABEL', got {line.strip()!r}")
        rows.append(ListedImage(parts[0], parts[1], f"{path}:{n}"))
    return rows


def _read_csv(path: str, path_column: str | None, label_column: str | None) -> list[ListedImage]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = reader.fieldnames or []
    path_key = _pick_column(header, PATH_COLUMNS, path_column, "--path-column", f"{path}:1")
    label_key = _pick_column(header, LABEL_COLUMNS, label_column, "--label-column", f"{path}:1")
    rows = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        image, label = (row.get(path_key) or "").strip(), (row.get(label_key) or "").strip()
        if not image or not label:
            raise UserError(f"{where}: empty or missing '{path_key}' or '{label_key}'")
        rows.append(ListedImage(image, label, where))
    return rows


def _json_label(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: label {value!r} is neither an integer nor a class name")
    return str(value)


def _json_object(item: object, where: str, path_column: str | None,
                 label_column: str | None) -> tuple[str, object, object]:
    """(where, image path, label) of one object of a JSON list."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: must be an object with an image path and a label")
    return (where, item[_pick_column(item, PATH_COLUMNS, path_column, "--path-column", where)],
            item[_pick_column(item, LABEL_COLUMNS, label_column, "--label-column", where)])


def _read_json_list(path: str, path_column: str | None, label_column: str | None) -> list[ListedImage]:
    data = read_json(path)
    if isinstance(data, dict):  # VPT's FGVC splits: {"relative/path.jpg": label}
        items = [(f"{path}: key '{image}'", image, label) for image, label in data.items()]
    elif isinstance(data, list):
        items = [_json_object(item, f"{path}: item {i}", path_column, label_column) for i, item in enumerate(data)]
    else:
        raise UserError(f"{path}: must be a mapping {{image path: label}} or a list of objects")
    rows = []
    for where, image, label in items:
        if not isinstance(image, str) or not image:
            raise UserError(f"{where}: image path {image!r} is not a non-empty string")
        rows.append(ListedImage(image, _json_label(label, where), where))
    return rows


def read_list(path: str, path_column: str | None = None, label_column: str | None = None) -> list[ListedImage]:
    """Split list formats, image paths relative to --root:
  .txt   lines 'relative/path label' (VTAB-1k as NOAH/SPT ship it), split on the last whitespace; blank lines skipped
  .csv   a header row; the path column is the first of path, filepath, file, filename, image, image_path, img,
         the label column the first of label, class_id, class, target, category_id (or --path-column/--label-column)
  .json  {"relative/path.jpg": label} (VPT's FGVC splits), or a list of objects with keys as for .csv
Labels are class indices, or class names: indices by the sorted distinct names, or by --class-names."""
    _require_file(path, "split list")
    kind = os.path.splitext(path)[1].lower()
    if kind == ".txt":
        return _read_txt(path)
    if kind == ".csv":
        return _read_csv(path, path_column, label_column)
    if kind == ".json":
        return _read_json_list(path, path_column, label_column)
    raise UserError(f"{path}: unknown split list format '{kind}'; use .txt, .csv or .json")


def read_class_names(path: str) -> list[str]:
    """--class-names: one name per line, or a JSON list (such as another data set's classes.json)."""
    _require_file(path, "--class-names file")
    if path.lower().endswith(".json"):
        names = read_json(path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path}: must be a JSON list of class names")
    else:
        names = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"{path}: need at least 2 class names, each once")
    return names


def _labels(rows: list[ListedImage], classes: int | None, class_names: list[str] | None,
            source: str) -> tuple[list[str], list[int]]:
    """Class names and an index label per row: labels are indices if all are integers, else class names."""
    if all(_INT_RE.match(row.label) for row in rows):
        labels = [int(row.label) for row in rows]
        names = class_names or [str(c) for c in range(classes or max(labels) + 1)]
        for row, label in zip(rows, labels):
            if not 0 <= label < len(names):
                raise UserError(f"{row.where}: label {label} out of range [0, {len(names)})")
        return names, labels
    names = class_names or sorted({row.label for row in rows})
    if class_names is None and classes is not None and len(names) != classes:
        # A split may lack some classes: indices from its names alone would not match the other splits'.
        raise UserError(f"{source}: {len(names)} distinct class names, but --classes {classes}; "
                        "give all names in order with --class-names")
    index = {name: i for i, name in enumerate(names)}
    for row in rows:
        if row.label not in index:
            raise UserError(f"{row.where}: label '{row.label}' is not one of the --class-names")
    return names, [index[row.label] for row in rows]


def list_files(root: str, lists: list[str], *, classes: int | None = None, class_names: list[str] | None = None,
               path_column: str | None = None, label_column: str | None = None) -> tuple[list[str], list[ImageFile]]:
    """Class names and the image files of split lists, concatenated in order. Checks every image exists before
    any is read, so a bad list fails before a shard is written (what is there is checked by ImageSamples)."""
    rows = [row for path in lists for row in read_list(path, path_column, label_column)]
    if not rows:
        raise UserError(f"{', '.join(lists)}: no images listed")
    names, labels = _labels(rows, classes, class_names, ", ".join(lists))
    files: list[ImageFile] = []
    first_listed: dict[str, str] = {}
    for row, label in zip(rows, labels):
        path = os.path.normpath(os.path.join(root, row.path))
        if not os.path.lexists(path):
            raise UserError(f"{row.where}: image not found: '{path}'")
        if path in first_listed:  # e.g. train800val200.txt given together with val200.txt
            raise UserError(f"{row.where}: '{row.path}' is listed twice (first at {first_listed[path]})")
        first_listed[path] = row.where
        files.append(ImageFile(path, label, row.where))
    return names, files


def _cmd_list(args: argparse.Namespace) -> None:
    if args.classes is not None and args.classes < 2:
        raise UserError(f"--classes: must be >= 2, got {args.classes}")
    class_names = read_class_names(args.class_names) if args.class_names else None
    names, files = list_files(args.root, args.list, classes=args.classes, class_names=class_names,
                              path_column=args.path_column, label_column=args.label_column)
    samples = ImageSamples(files, args.split, args.seed, ImageTree(os.path.realpath(args.root),
                                                                   ", ".join(args.list), *_limits(args)))
    sizes = shard_sizes(len(samples), args.samples_per_shard, args.num_shards)
    write_image_split(args.out, args.split, names, samples, sizes, ", ".join(args.list))


# --------------------------------------------------------------------------- benchmark presets

# Split lists per (suite, protocol): `test` trains on train + val and tests on the test split (the papers'
# protocol); `val` trains on train alone and evaluates on val (hyper-parameter search).
PRESET_SPLITS = {
    ("vtab", "test"): (("train", ("train800val200.txt",)), ("test", ("test.txt",))),
    ("vtab", "val"): (("train", ("train800.txt",)), ("val", ("val200.txt",))),
    ("fgvc", "test"): (("train", ("train.json", "val.json")), ("test", ("test.json",))),
    ("fgvc", "val"): (("train", ("train.json",)), ("val", ("val.json",))),
}
EVAL_SAMPLES_PER_SHARD = 1000


def _chosen_tasks(suite: str, names: str | None) -> list[Task]:
    tasks = {task.name: task for task in SUITES[suite]}
    if names is None:
        return list(tasks.values())
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in tasks:
            raise UserError(f"--tasks: no {suite} task '{name}'; one of {', '.join(tasks)}")
        chosen.append(tasks[name])
    if not chosen:
        raise UserError(f"--tasks: no task named in {names!r}")
    return chosen


def _preset_shard_sizes(split: str, total: int, num_shards: int) -> list[int]:
    # Train: a fixed shard count, so every (rank, loader worker) pair gets shards; eval splits: a fixed shard size.
    if split == "train":
        return shard_sizes(total, num_shards=num_shards)
    return shard_sizes(total, samples_per_shard=EVAL_SAMPLES_PER_SHARD)


def _cmd_preset(args: argparse.Namespace) -> None:
    # Every task's lists are read and checked before the first shard is written: a bad task fails the run early.
    planned = []
    for task in _chosen_tasks(args.suite, args.tasks):
        task_dir = os.path.join(args.root, task.folder)
        if not os.path.isdir(task_dir):
            if args.skip_missing:
                print(f"{task.name}: skipped, no directory '{task_dir}'")
                continue
            raise UserError(f"--root: no directory '{task.folder}' for task {task.name} in '{args.root}' "
                            "(--skip-missing skips it)")
        for split, list_names in PRESET_SPLITS[args.suite, args.protocol]:
            lists = [os.path.join(task_dir, name) for name in list_names]
            image_root = os.path.join(task_dir, task.image_dir)
            names, files = list_files(image_root, lists, classes=task.classes)
            samples = ImageSamples(files, split, args.seed,
                                   ImageTree(os.path.realpath(image_root), ", ".join(lists), *_limits(args)))
            try:
                sizes = _preset_shard_sizes(split, len(samples), args.num_shards)
            except UserError as e:
                raise UserError(f"{task.name} {split}: {e}") from None
            planned.append((task, split, names, samples, sizes, ", ".join(lists)))
    if not planned:  # everything skipped: most likely the wrong --root
        raise UserError(f"--root: none of the tasks' folders is in '{args.root}'")
    for task, split, names, samples, sizes, source in planned:
        write_image_split(os.path.join(args.out, task.name), split, names, samples, sizes, source)
# --------------------------------------------------------------------------- synthetic data


def synthetic_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class `label`.

    A class is a base colour (hue spread evenly over the classes) times a stripe pattern whose orientation
    (4 angles) and frequency (3 values) also depend on the class; phase, brightness and pixel noise are
    random per image. Colour alone separates up to ~10 classes, the stripes help beyond that: a tiny ViT
    learns it in a few hundred steps, but it is not a constant image per class.
    """
    r, g, b = colorsys.hsv_to_rgb(label / num_classes, 0.75, 0.9)
    base = np.array([r, g, b]) * rng.uniform(0.85, 1.15)
    theta = (label % 4) * np.pi / 4
    cycles = 2.0 + 1.5 * ((label // 4) % 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    img = base * (0.5 + 0.5 * stripes[..., None]) + rng.normal(0.0, 0.05, (size, size, 3))
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def synthetic_samples(split: str, n: int, num_classes: int, size: int, seed: int,
                      fmt: str = "png") -> Iterator[Sample]:
    """`fmt` "png" (lossless) or "jpg" (quality 90, like most photo data sets: what the loader benchmark reads)."""
    if fmt not in IMAGE_EXTS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(IMAGE_EXTS)}")
    # Each split has its own RNG stream so e.g. changing --test leaves the train split unchanged.
    rng = np.random.default_rng([seed, *split.encode()])
    labels = rng.permutation(np.arange(n) % num_classes)  # balanced classes, shuffled order
    for i, label in enumerate(labels.tolist()):
        buf = io.BytesIO()
        image = Image.fromarray(synthetic_image(label, num_classes, size, rng))
        if fmt == "png":
            image.save(buf, format="PNG", compress_level=1)
        else:
            image.save(buf, format="JPEG", quality=90)
        yield f"{split}_{i:08d}", buf.getvalue(), fmt, label


def _cmd_synthetic(args: argparse.Namespace) -> None:
    for flag, value, low in (("--classes", args.classes, 2), ("--train", args.train, 1), ("--test", args.test, 0), ("--size", args.size, 8)):
        if value < low:
            raise UserError(f"{flag}: must be >= {low}, got {value}")
    for split, n in (("train", args.train), ("test", args.test)):
        if n > 0:
            samples = synthetic_samples(split, n, args.classes, args.size, args.seed, args.format)
            names = write_split(samples, args.out, split, shard_sizes(n, args.samples_per_shard),
                                [f"class_{c}" for c in range(args.classes)])
            _report(args.out, split, names)


# --------------------------------------------------------------------------- digits (scikit-learn's, bundled)


def _digit_range(text: str) -> list[int]:
    """'5-9' or '0,2,4' -> digits, each in 0..9, at least two."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            digits = list(range(first, last + 1))
        else:
            digits = [int(x) for x in text.split(",")]
    except ValueError:
        digits = []
    if len(set(digits)) < 2 or not all(0 <= d <= 9 for d in digits):
        raise UserError(f"--digits: expected at least two digits in 0-9 as 'A-B' or 'A,B,...', got {text!r}")
    return sorted(set(digits))


def digits_samples(digits: list[int], size: int, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI; shipped with scikit-learn, nothing downloaded) of
    `digits`, labelled 0.. in that order, upscaled to size x size RGB; a stratified, seeded train/test split."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only this command needs it
    data = load_digits()
    rng = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {"train": [], "test": []}
    for label, digit in enumerate(digits):
        where = rng.permutation(np.flatnonzero(data.target == digit))
        cut = round(len(where) * test_fraction)
        for split, part in (("test", where[:cut]), ("train", where[cut:])):
            for i in part.tolist():
                grey = Image.fromarray((data.images[i] * (255 / 16)).round().astype(np.uint8))
                buf = io.BytesIO()
                grey.resize((size, size), Image.BILINEAR).convert("RGB").save(buf, format="PNG", compress_level=1)
                out[split].append((f"{split}_{i:05d}", buf.getvalue(), "png", label))
    for split in out:  # classes interleaved, in a seeded order
        order = rng.permutation(len(out[split])).tolist()
        out[split] = [out[split][i] for i in order]
    return out


def _cmd_digits(args: argparse.Namespace) -> None:
    digits = _digit_range(args.digits)
    if args.size < 8:
        raise UserError(f"--size: must be >= 8, got {args.size}")
    if not 0.0 < args.test_fraction < 1.0:
        raise UserError(f"--test-fraction: must be in (0, 1), got {args.test_fraction}")
    for split, samples in digits_samples(digits, args.size, args.test_fraction, args.seed).items():
        names = write_split(samples, args.out, split, shard_sizes(len(samples), num_shards=args.num_shards),
                            [f"digit_{d}" for d in digits])
        _report(args.out, split, names)


# --------------------------------------------------------------------------- CLI


def _report(out: str, split: str, names: list[str]) -> None:
    sizes = read_sizes(out)
    total = sum(sizes[n] for n in names)
    print(f"{split}: {total} samples in {len(names)} shards {out}/{split}-{{000000..{len(names) - 1:06d}}}.tar")


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-file-mb", type=float, default=MAX_MEMBER_MB,
                   help="skip larger image files (default: data.max_member_mb's, which the loader reads at most)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="skip images of more pixels, from their headers (default: data.max_image_pixels's, which "
                   "the loader decodes at most)")


def _limits(args: argparse.Namespace) -> tuple[int, int]:
    """(largest file in bytes, largest image in pixels) of --max-file-mb and --max-image-pixels."""
    if not (math.isfinite(args.max_file_mb) and args.max_file_mb > 0):
        raise UserError(f"--max-file-mb: must be a positive number of MB, got {args.max_file_mb}")
    if args.max_image_pixels < 1:
        raise UserError(f"--max-image-pixels: must be >= 1, got {args.max_image_pixels}")
    return int(args.max_file_mb * 2**20), args.max_image_pixels


def _add_sharding(p: argparse.ArgumentParser) -> None:
    sharding = p.add_mutually_exclusive_group()
    sharding.add_argument("--samples-per-shard", type=int,
                          help=f"default: even shards of at most {MAX_SAMPLES_PER_SHARD}, at least {MIN_SHARDS} of them "
                          "(fewer only for fewer samples)")
    sharding.add_argument("--num-shards", type=int, help="exactly N shards, as even as possible "
                          "(a run needs at least ranks x loader workers train shards)")
    p.add_argument("--seed", type=int, default=0, help="of the shuffle before sharding")


def _add_preset(sub, suite: str, layout: str) -> None:
    names = ",".join(task.name for task in SUITES[suite])
    p = sub.add_parser(suite, help=f"shard the {suite.upper()} tasks from {layout} into OUT/<task>/")
    p.add_argument("--root", required=True, help=f"the directory holding the task folders ({layout})")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", help=f"comma-separated, default all: {names}")
    p.add_argument("--protocol", choices=("test", "val"), default="test",
                   help="test: train on train+val, test on test; val: train on train, evaluate on val")
    p.add_argument("--num-shards", type=int, default=64, help="train shards per task (eval splits: "
                   f"{EVAL_SAMPLES_PER_SHARD} samples per shard); 64 is enough for 32 ranks x 2 loader workers")
    p.add_argument("--seed", type=int, default=0, help="of the shuffle before sharding")
    p.add_argument("--skip-missing", action="store_true", help="skip tasks whose folder is missing")
    _add_limits(p)
    p.set_defaults(run=_cmd_preset, suite=suite)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spt-shards", description="Write webdataset tar shards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folder", help="shard an ImageFolder tree (DIR/<class>/*.jpg|jpeg|png)")
    f.add_argument("--src", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--split", default="train")
    _add_sharding(f)
    _add_limits(f)
    f.set_defaults(run=_cmd_folder)
    ls = sub.add_parser("list", help="shard the images of split list files (.txt, .csv, .json)",
                        description=read_list.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--root", required=True, help="the directory the listed image paths are relative to")
    ls.add_argument("--list", required=True, action="append", help="a split list; repeat to concatenate them in order")
    ls.add_argument("--out", required=True)
    ls.add_argument("--split", required=True)
    classes = ls.add_mutually_exclusive_group()
    classes.add_argument("--classes", type=int, help="the class count (labels must be below it); "
                         "default: the largest label + 1")
    classes.add_argument("--class-names", help="class names in label order: one per line, or a JSON list")
    _add_sharding(ls)
    ls.add_argument("--path-column", help="CSV/JSON: the image path column")
    ls.add_argument("--label-column", help="CSV/JSON: the label column")
    _add_limits(ls)
    ls.set_defaults(run=_cmd_list)
    _add_preset(sub, "vtab", "VTAB-1k as NOAH/SPT ship it: <task>/{train800val200,train800,val200,test}.txt")
    _add_preset(sub, "fgvc", "VPT's FGVC layout: <task>/{train,val,test}.json")
    s = sub.add_parser("synthetic", help="write a small learnable synthetic data set (train + test splits)")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--test", type=int, default=500)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--format", choices=IMAGE_EXTS, default="png", help="image encoding: png (lossless) or jpg "
                   "(quality 90)")
    s.add_argument("--samples-per-shard", type=int, default=250)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_cmd_synthetic)
    d = sub.add_parser("digits", help="scikit-learn's bundled 8x8 handwritten digits (some of them), upscaled")
    d.add_argument("--out", required=True)
    d.add_argument("--digits", default="0-9", help="which digits, as 'A-B' or 'A,B,...'; labelled 0.. in order")
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--test-fraction", type=float, default=0.25)
    d.add_argument("--num-shards", type=int, default=8, help="per split (a run needs ranks x loader workers)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=_cmd_digits)
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    require_directory(args.out, "--out")  # before anything is read: --out onto a file is a one-line mistake
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
