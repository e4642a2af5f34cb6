"""Write image-classification data sets as webdataset tar shards.

On-disk format (one directory per data set):
  {split}-{i:06d}.tar  members KEY.png or KEY.jpg (encoded image bytes) and KEY.cls (decimal label, ASCII)
  sizes.json           {"train-000000.tar": 250, ...}: sample count per shard, all splits
  classes.json         ["name0", "name1", ...]: class names, index = label

CLI:  python -m spt_dist.data.shards folder --src DIR --out DIR [--split train] ...
      python -m spt_dist.data.shards synthetic --out DIR [--classes 10] ...

Deliberately torch-free (numpy + PIL only) so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import os
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

from spt_dist.atomic import atomic_file, write_json
from spt_dist.errors import UserError

IMAGE_EXTS = ("png", "jpg")
SIZES_FILE = "sizes.json"
CLASSES_FILE = "classes.json"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_FOLDER_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}  # jpeg bytes are kept, only the suffix is normalised

Sample = tuple[str, bytes, str, int]  # (key, image bytes, "png"|"jpg", label)


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
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None


def write_split(samples: Iterable[Sample], out_dir: str, split: str, samples_per_shard: int) -> list[str]:
    """Write `samples` as out_dir/{split}-{i:06d}.tar shards; update sizes.json. Returns the shard file names.

    Streams: at most one shard of samples is held in memory. Shards of the same split left over from an
    earlier, larger run are deleted so a glob over the directory never mixes two runs.
    """
    if not _SPLIT_RE.match(split):
        raise UserError(f"--split: {split!r} must be letters, digits or '_'")
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard: must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    names: list[str] = []
    sizes: dict[str, int] = {}
    pending: list[Sample] = []

    def flush() -> None:
        name = f"{split}-{len(names):06d}.tar"
        _write_shard(os.path.join(out_dir, name), pending)
        names.append(name)
        sizes[name] = len(pending)
        pending.clear()

    for sample in samples:
        _check_sample(sample)
        pending.append(sample)
        if len(pending) == samples_per_shard:
            flush()
    if pending:
        flush()
    if not names:
        raise UserError(f"split '{split}': no samples to write")

    ours = re.compile(rf"^{split}-\d{{6}}\.tar$")
    for stale in sorted(n for n in os.listdir(out_dir) if ours.match(n) and n not in sizes):
        os.unlink(os.path.join(out_dir, stale))
    sizes_path = os.path.join(out_dir, SIZES_FILE)
    merged = {k: v for k, v in read_json(sizes_path, {}).items() if not ours.match(k)}
    merged.update(sizes)
    write_json(sizes_path, dict(sorted(merged.items())))
    return names


def write_classes(out_dir: str, names: list[str]) -> None:
    write_json(os.path.join(out_dir, CLASSES_FILE), names)


# --------------------------------------------------------------------------- ImageFolder


def folder_samples(src: str, split: str, seed: int) -> tuple[list[str], Iterator[Sample]]:
    """Classes (sorted sub-directory names) and a seed-shuffled sample iterator for an ImageFolder tree."""
    if not os.path.isdir(src):
        raise UserError(f"--src: no such directory '{src}'")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[str, str, int]] = []
    for label, name in enumerate(classes):
        for root, dirs, fnames in os.walk(os.path.join(src, name)):
            dirs.sort()  # os.walk order is file-system dependent; sorting makes the seeded shuffle reproducible
            for fname in sorted(fnames):
                ext = _FOLDER_EXTS.get(os.path.splitext(fname)[1].lower())
                if ext and not fname.startswith("."):
                    files.append((os.path.join(root, fname), ext, label))
    if not files:
        raise UserError(f"--src: no .jpg/.jpeg/.png images in class sub-directories of '{src}'")
    # Shuffle before sharding so every shard mixes classes (shard-level shuffling at train time relies on it).
    random.Random(seed).shuffle(files)

    def read() -> Iterator[Sample]:
        for i, (path, ext, label) in enumerate(files):
            with open(path, "rb") as f:
                yield f"{split}_{i:08d}", f.read(), ext, label

    return classes, read()


def _cmd_folder(args: argparse.Namespace) -> None:
    classes, samples = folder_samples(args.src, args.split, args.seed)
    sizes = read_json(os.path.join(args.out, SIZES_FILE), {})
    existing = read_json(os.path.join(args.out, CLASSES_FILE), None)
    other_splits = [k for k in sizes if not k.startswith(f"{args.split}-")]
    # Labels are indices into classes.json: another split written with different classes would be mislabelled.
    if existing is not None and existing != classes and other_splits:
        raise UserError(
            f"--src: classes of '{args.src}' differ from {os.path.join(args.out, CLASSES_FILE)} "
            f"(used by {other_splits[0]}); write to a fresh --out"
        )
    names = write_split(samples, args.out, args.split, args.samples_per_shard)
    write_classes(args.out, classes)
    _report(args.out, args.split, names)


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


def synthetic_samples(split: str, n: int, num_classes: int, size: int, seed: int) -> Iterator[Sample]:
    # Each split has its own RNG stream so e.g. changing --test leaves the train split unchanged.
    rng = np.random.default_rng([seed, *split.encode()])
    labels = rng.permutation(np.arange(n) % num_classes)  # balanced classes, shuffled order
    for i, label in enumerate(labels.tolist()):
        buf = io.BytesIO()
        Image.fromarray(synthetic_image(label, num_classes, size, rng)).save(buf, format="PNG", compress_level=1)
        yield f"{split}_{i:08d}", buf.getvalue(), "png", label


def _cmd_synthetic(args: argparse.Namespace) -> None:
    for flag, value, low in (("--classes", args.classes, 2), ("--train", args.train, 1), ("--test", args.test, 0), ("--size", args.size, 8)):
        if value < low:
            raise UserError(f"{flag}: must be >= {low}, got {value}")
    for split, n in (("train", args.train), ("test", args.test)):
        if n > 0:
            names = write_split(synthetic_samples(split, n, args.classes, args.size, args.seed), args.out, split, args.samples_per_shard)
            _report(args.out, split, names)
    write_classes(args.out, [f"class_{c}" for c in range(args.classes)])


# --------------------------------------------------------------------------- CLI


def _report(out: str, split: str, names: list[str]) -> None:
    sizes = read_json(os.path.join(out, SIZES_FILE), {})
    total = sum(sizes[n] for n in names)
    print(f"{split}: {total} samples in {len(names)} shards {out}/{split}-{{000000..{len(names) - 1:06d}}}.tar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spt_dist.data.shards", description="Write webdataset tar shards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folder", help="shard an ImageFolder tree (DIR/<class>/*.jpg|jpeg|png)")
    f.add_argument("--src", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--split", default="train")
    f.add_argument("--samples-per-shard", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(run=_cmd_folder)
    s = sub.add_parser("synthetic", help="write a small learnable synthetic data set (train + test splits)")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--test", type=int, default=500)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--samples-per-shard", type=int, default=250)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_cmd_synthetic)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"spt_dist: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
