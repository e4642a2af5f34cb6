"""The shard tool on hostile ImageFolder trees and split lists (symlinks out of the tree, devices, loops, files
that are no images, decompression bombs), whole-run atomicity, --out onto a file, the loader's pixel cap
(data.max_image_pixels) and unbalanced braces in shard patterns (issue 26, items 5, 6, 8)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from spt_dist import report
from spt_dist.config import load_config
from spt_dist.data import loader, shards
from spt_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def png(path: Path, rgb=(200, 30, 30), size=8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, format="PNG")
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG of just a signature, an IHDR declaring width x height and IEND: a few dozen bytes that PIL opens
    (and reports the size of) without complaint."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def tree(tmp_path: Path) -> Path:
    """src/{cat,dog}/ with two real 8x8 PNGs each."""
    src = tmp_path / "src"
    for i, cls in enumerate(("cat", "dog")):
        for j in range(2):
            png(src / cls / f"{j}.png", (200 * (1 - i), 30, 200 * i))
    return src


def run_cli(*args, memory_gib: float = 3) -> subprocess.CompletedProcess:
    """`python -m spt_dist.data.shards ...` in a child limited to `memory_gib` of address space and 60 s: a tool
    that reads /dev/zero ends with a MemoryError there instead of taking the machine's memory."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(memory_gib * 2**30), resource.RLIM_INFINITY))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        return subprocess.run([sys.executable, "-m", "spt_dist.data.shards", *map(str, args)], cwd=REPO, env=env,
                              check=False, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the shard tool hung on: {args}")


def members(out: Path) -> dict[str, bytes]:
    got = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            got.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return got


def images_of(out: Path) -> list[bytes]:
    return [data for name, data in members(out).items() if not name.endswith(".cls")]


def folder(src: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("folder", "--src", src, "--out", out, "--split", "train", "--num-shards", "2", *extra)


def assert_complete(out: Path, samples: int, classes=("cat", "dog")) -> None:
    """A complete output: sizes.json and classes.json, and every sample the summary counts in the tars."""
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == samples and sorted(sizes) == sorted(p.name for p in out.glob("*.tar"))
    assert json.loads((out / "classes.json").read_text()) == list(classes)
    assert len(images_of(out)) == samples
    for data in images_of(out):  # every packed image opens as one
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB")


# --------------------------------------------------------------------------- what the tool reads


def test_symlink_to_etc_passwd_is_not_packed(tmp_path):
    src = tree(tmp_path)
    (src / "cat" / "passwd.png").symlink_to("/etc/passwd")
    # Links within the tree are followed: to a file, and a class made of another class's images.
    (src / "dog" / "again.png").symlink_to(src / "cat" / "0.png")
    (src / "cow").symlink_to(src / "dog", target_is_directory=True)
    result = folder(src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "out", 2 + 3 + 3, ("cat", "cow", "dog"))
    assert Path("/etc/passwd").read_bytes() not in images_of(tmp_path / "out")
    assert "skipped 1 of 9 files: 1 leaving the tree" in result.stdout, result.stdout
    assert "/etc/passwd" in result.stderr, result.stderr


def test_symlink_to_dev_zero_and_a_fifo_end_quickly(tmp_path):
    src = tree(tmp_path)
    (src / "cat" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(src / "dog" / "fifo.png")  # inside the tree, but opening it for reading would wait for a writer
    result = folder(src, tmp_path / "out")
    assert result.returncode == 0 and "MemoryError" not in result.stderr, result.stderr
    assert_complete(tmp_path / "out", 4)
    assert "skipped 2" in result.stdout and "not a regular file" in result.stdout, result.stdout


def test_class_directory_linking_out_of_the_tree_is_refused(tmp_path):
    src = tree(tmp_path)
    png(tmp_path / "elsewhere" / "x.png")
    (src / "zebra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    result = folder(src, tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("spt_dist: error: --src: class directory 'zebra'"), result.stderr
    assert "outside" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_empty_text_and_bomb_files_are_skipped_and_counted(tmp_path):
    src = tree(tmp_path)
    (src / "cat" / "empty.png").write_bytes(b"")
    (src / "cat" / "notes.jpg").write_text("not a JPEG at all\n" * 20)
    (src / "dog" / "bomb.png").write_bytes(png_header(50000, 50000))  # 2.5 Gpx: over PIL's own limit
    (src / "dog" / "big.png").write_bytes(png_header(6000, 5000))  # 30 Mpx: below PIL's, over ours
    result = folder(src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "out", 4)
    summary = result.stdout
    assert "skipped 4 of 8 files" in summary and "1 empty" in summary and "1 not an image" in summary, summary
    assert "2 over the pixel cap" in summary, summary
    assert "notes.jpg" in result.stderr and "6000x5000" in result.stderr, result.stderr


def test_pixel_cap_flag_and_file_size_cap(tmp_path):
    src = tree(tmp_path)
    png(src / "dog" / "large.png", size=64)
    result = folder(src, tmp_path / "out", "--max-image-pixels", "1000")
    assert result.returncode == 0 and "1 over the pixel cap" in result.stdout, result.stdout + result.stderr
    assert len(images_of(tmp_path / "out")) == 4
    (src / "dog" / "large.png").unlink()
    (src / "dog" / "padded.png").write_bytes((src / "dog" / "0.png").read_bytes() + b"\0" * (2 << 20))
    result = folder(src, tmp_path / "out2", "--max-file-mb", "1")
    assert result.returncode == 0 and "1 over the size cap" in result.stdout, result.stdout + result.stderr


def test_symlink_loops_are_skipped(tmp_path):
    src = tree(tmp_path)
    (src / "cat" / "a.png").symlink_to(src / "cat" / "b.png")
    (src / "cat" / "b.png").symlink_to(src / "cat" / "a.png")
    (src / "dog" / "sub").symlink_to(src / "dog", target_is_directory=True)  # a directory loop
    result = folder(src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "out", 4)
    assert "skipped 2" in result.stdout, result.stdout


def test_listed_paths_leaving_the_root_are_skipped(tmp_path):
    root = tmp_path / "root"
    png(root / "a.png"), png(root / "b.png", (0, 0, 200))
    png(tmp_path / "secret.png", (1, 2, 3))
    (root / "l.txt").write_text("a.png 0\nb.png 1\n../secret.png 1\n")
    result = run_cli("list", "--root", root, "--list", root / "l.txt", "--out", tmp_path / "out", "--split", "train")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "secret.png").read_bytes() not in images_of(tmp_path / "out")
    assert len(images_of(tmp_path / "out")) == 2 and "skipped 1" in result.stdout, result.stdout
    assert "l.txt:3" in result.stderr, result.stderr


def test_nothing_left_is_one_line(tmp_path):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "x.png").write_bytes(b"")
    result = folder(src, tmp_path / "out")
    *warnings, error = result.stderr.splitlines()
    assert result.returncode == 2 and error.startswith("spt_dist: error: --src"), result.stderr
    assert "no image to pack" in error and "1 empty" in error, result.stderr
    assert warnings == [f"spt-shards: warning: --src: skipping '{src / 'cat' / 'x.png'}': an empty file"]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- whole-run atomicity


def _fail_on_second_shard(monkeypatch):
    real, calls = shards._write_shard, []

    def write(path, samples):
        calls.append(path)
        if len(calls) == 2:
            raise UserError(f"cannot write '{path}': no space left on the device (simulated)")
        real(path, samples)
    monkeypatch.setattr(shards, "_write_shard", write)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_failed_run_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    src = tree(tmp_path)
    args = ["folder", "--src", str(src), "--split", "train", "--num-shards", "3"]
    _fail_on_second_shard(monkeypatch)
    assert shards.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "no space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no temp directory beside it
    monkeypatch.undo()

    # A complete earlier output (another split beside it) survives a failed run untouched.
    out = tmp_path / "out"
    assert shards.main([*args, "--out", str(out)]) == 0
    assert shards.main([*args, "--out", str(out), "--split", "val", "--num-shards", "2"]) == 0
    before = _snapshot(out)
    _fail_on_second_shard(monkeypatch)
    assert shards.main([*args, "--out", str(out), "--seed", "7", "--num-shards", "4"]) == 2
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_synthetic_split_failure_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    _fail_on_second_shard(monkeypatch)
    out = tmp_path / "syn"
    assert shards.main(["synthetic", "--out", str(out), "--classes", "2", "--train", "8", "--test", "0",
                        "--samples-per-shard", "2"]) == 2
    assert not out.exists() and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- --out onto a file


def test_shard_tool_out_onto_a_file_is_one_line(tmp_path):
    src, target = tree(tmp_path), tmp_path / "a_file"
    target.write_text("keep me")
    for args in (["folder", "--src", src, "--out", target],
                 ["synthetic", "--out", target, "--train", "4", "--test", "0", "--classes", "2"],
                 ["folder", "--src", src, "--out", target / "below"]):
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"spt_dist: error: --out: '{target}") and "Traceback" not in result.stderr
        assert "not a directory" in result.stderr, result.stderr
    assert target.read_text() == "keep me"


def test_report_out_onto_a_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(load_config())))
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert report.main([str(tmp_path / "runs"), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"spt_dist: error: --out: '{target}' is a file, not a directory\n", err
    assert target.read_text() == "keep me"


# --------------------------------------------------------------------------- loader: pixel cap, brace patterns


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _png_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            for name, blob in ((f"{key}.png", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("workers", [0, 1])
def test_images_over_max_image_pixels_count_as_bad_image(tmp_path, workers, caplog):
    """Checked from the header, before decoding: a 16x16 image is over a cap of 100 pixels, an 8x8 one is not; a
    header declaring 50000x50000 is a bad_image too (PIL's own limit)."""
    for i in range(2):
        _write_tar(tmp_path / f"px-{i:06d}.tar", [(f"{i}small", _png_bytes(8), 1), (f"{i}large", _png_bytes(16), 0),
                                                  (f"{i}bomb", png_header(50000, 50000), 0)])
    paths = loader.expand_shards(f"{tmp_path}/px-*.tar", "data.eval_shards")
    evals = loader.EvalStream(paths, rank=0, world=1, batch_size=4, transform=to_tensor, num_classes=2,
                              workers=workers, max_image_pixels=100)
    assert sorted(k for b in evals for k in b["keys"]) == ["0small", "1small"]
    assert evals.faults() == {"bad_image": 4, "bad_label": 0, "label_out_of_range": 0, "bad_tar": 0}
    if workers == 0:
        assert "16x16" in caplog.text and "data.max_image_pixels" in caplog.text, caplog.text
    train = loader.TrainStream(paths, rank=0, world=1, batch_size=2, transform=to_tensor, num_classes=2, seed=0,
                               workers=workers, shuffle_buffer=4, max_image_pixels=100)
    assert {k for _ in range(3) for k in next(train)["keys"]} == {"0small", "1small"}
    assert train.faults()["bad_image"] == 4
    train.close()


def test_max_image_pixels_is_one_default_and_a_config_key():
    assert shards.MAX_IMAGE_PIXELS == 25_000_000
    assert load_config().data.max_image_pixels == shards.MAX_IMAGE_PIXELS
    assert load_config(overrides=["data.max_image_pixels=1000000"]).data.max_image_pixels == 1_000_000
    for bad in ("0", "-5"):
        with pytest.raises(UserError, match=r"^data\.max_image_pixels: must be a positive number of pixels"):
            load_config(overrides=[f"data.max_image_pixels={bad}"])
    with pytest.raises(UserError, match=r"^data\.max_image_pixels: "):
        load_config(overrides=["data.max_image_pixels=lots"])


@pytest.mark.parametrize("spec", ["{d}/train-{{000000..000001.tar", "{d}/train-000000.tar}}", "{d}/a-{{0,1}}}}.tar"])
def test_unbalanced_braces_are_one_line(tmp_path, spec):
    spec = spec.format(d=tmp_path)
    with pytest.raises(UserError, match=r"^data\.train_shards: unbalanced braces in ") as e:
        loader.expand_shards(spec, "data.train_shards")
    assert str(tmp_path) in str(e.value)
