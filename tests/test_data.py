"""Tests for spt_dist.data: shard writer CLI, deterministic rank/worker sharding, fault tolerance, errors."""

import contextlib
import io
import json
import os
import resource
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from spt_dist.data import shards
from spt_dist.data.loader import EvalStream, TrainStream, count_samples, expand_shards, read_classes, require_shards
from spt_dist.errors import UserError
from tests.conftest import check, run_job

TRAIN, TEST, PER_SHARD = 240, 70, 30  # -> 8 train shards of 30; test shards of 30, 30, 10


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def random_flip(img):
    # Uses the global torch RNG, like timm's augmentations: must still be reproducible.
    x = to_tensor(img)
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def run_cli(args):
    """The shard tool as a user runs it: `python -m spt_dist.data.shards ...`."""
    result = run_job(["-m", "spt_dist.data.shards", *args], launcher="python", timeout=60)
    return result.returncode, result.stdout, result.stderr


def png_bytes(rgb, size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    shards.main(["synthetic", "--out", out, "--classes", "4", "--train", str(TRAIN), "--test", str(TEST),
                 "--size", "16", "--samples-per-shard", str(PER_SHARD), "--seed", "1"])
    return out


def train_shards(d):
    return expand_shards(f"{d}/train-{{000000..000007}}.tar", "data.train_shards")


def all_keys(paths):
    keys = []
    for p in paths:
        with tarfile.open(p) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".cls")]
    return keys


# --------------------------------------------------------------------------- shard writer CLI


def test_synthetic_cli(tmp_path):
    out = tmp_path / "s"
    rc, stdout, err = run_cli(["synthetic", "--out", str(out), "--classes", "5", "--train", "100", "--test", "30",
                               "--samples-per-shard", "40"])
    assert rc == 0, err
    assert "train: 100 samples in 3 shards" in stdout
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 40, "train-000001.tar": 40, "train-000002.tar": 20, "test-000000.tar": 30}
    assert json.loads((out / "classes.json").read_text()) == [f"class_{c}" for c in range(5)]
    assert count_samples(expand_shards(f"{out}/train-*.tar", "k")) == 100
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left behind
    with tarfile.open(out / "train-000002.tar") as t:
        names = t.getnames()
        labels = [int(t.extractfile(n).read()) for n in names if n.endswith(".cls")]
    assert len(names) == 40 and names[:2] == [names[0].split(".")[0] + ".png", names[0].split(".")[0] + ".cls"]
    assert all(0 <= label < 5 for label in labels)

    # Deterministic: same seed -> byte-identical shards.
    shards.main(["synthetic", "--out", str(tmp_path / "again"), "--classes", "5", "--train", "100", "--test", "30",
                 "--samples-per-shard", "40"])
    assert (out / "train-000001.tar").read_bytes() == (tmp_path / "again" / "train-000001.tar").read_bytes()

    # Re-writing a split with fewer shards removes the stale ones (a glob must not mix two runs).
    shards.main(["synthetic", "--out", str(out), "--classes", "5", "--train", "50", "--test", "30", "--samples-per-shard", "40"])
    assert not (out / "train-000002.tar").exists()
    assert json.loads((out / "sizes.json").read_text())["train-000001.tar"] == 10


def test_synthetic_jpeg(tmp_path):
    """--format jpg: JPEG members (what the loader benchmark reads), decoded by the streams like any others."""
    shards.main(["synthetic", "--out", str(tmp_path), "--classes", "2", "--train", "6", "--test", "0", "--size", "24",
                 "--format", "jpg", "--samples-per-shard", "3"])
    paths = expand_shards(f"{tmp_path}/train-*.tar", "k")
    with tarfile.open(paths[0]) as t:
        assert [n.split(".")[1] for n in t.getnames()] == ["jpg", "cls"] * 3
        assert t.extractfile(t.getnames()[0]).read()[:2] == b"\xff\xd8"  # a JPEG's start-of-image marker
    batches = list(EvalStream(paths, rank=0, world=1, batch_size=4, transform=to_tensor, num_classes=2))
    assert sum(len(b["keys"]) for b in batches) == 6 and batches[0]["images"].shape[1:] == (3, 24, 24)


def test_synthetic_is_learnable(syn):
    """Nearest class-mean colour already separates the classes; the model has stripes on top."""
    def features(split):
        feats, labels = [], []
        for b in EvalStream(expand_shards(f"{syn}/{split}-*.tar", "k"), rank=0, world=1, batch_size=64,
                            transform=to_tensor, num_classes=4):
            feats.append(b["images"].mean(dim=(2, 3)))
            labels.append(b["labels"])
        return torch.cat(feats), torch.cat(labels)

    x, y = features("train")
    centroids = torch.stack([x[y == c].mean(0) for c in range(4)])
    xt, yt = features("test")
    acc = (torch.cdist(xt, centroids).argmin(1) == yt).float().mean().item()
    assert acc > 0.9
    assert x.std(0).min() > 0.01  # images vary within the data set


def test_folder_cli(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    colours = {"cat": (220, 20, 20), "dog": (20, 20, 220)}
    jpegs = set()
    for cls, files in {"cat": ["a.png", "b.png", "c.jpeg"], "dog": ["d.jpg", "e.PNG"]}.items():
        (src / cls).mkdir(parents=True)
        for name in files:
            fmt = "JPEG" if name.endswith(("jpg", "jpeg")) else "PNG"
            Image.new("RGB", (12, 12), colours[cls]).save(src / cls / name, format=fmt)
            if fmt == "JPEG":
                jpegs.add((src / cls / name).read_bytes())
    (src / "cat" / "notes.txt").write_text("ignored")

    shards.main(["folder", "--src", str(src), "--out", str(out), "--split", "val", "--samples-per-shard", "2"])
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    assert json.loads((out / "sizes.json").read_text()) == {"val-000000.tar": 2, "val-000001.tar": 2, "val-000002.tar": 1}
    paths = expand_shards(f"{out}/val-{{000000..000002}}.tar", "data.eval_shards")
    assert read_classes(paths) == ["cat", "dog"] and count_samples(paths) == 5

    stored = set()
    for p in paths:
        with tarfile.open(p) as t:
            stored |= {t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")}
    assert stored == jpegs  # JPEG bytes copied as-is

    batches = list(EvalStream(paths, rank=0, world=1, batch_size=4, transform=to_tensor, num_classes=2))
    images, labels = torch.cat([b["images"] for b in batches]), torch.cat([b["labels"] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    red_minus_blue = images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))
    assert ((red_minus_blue > 0) == (labels == 0)).all()  # labels follow the class directories

    first = (out / "val-000000.tar").read_bytes()
    shards.main(["folder", "--src", str(src), "--out", str(out), "--split", "val", "--samples-per-shard", "2"])
    assert (out / "val-000000.tar").read_bytes() == first  # deterministic shuffle

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no .jpg/.jpeg/.png images"):
        shards.folder_samples(str(tmp_path / "empty"), "train", 0)
    with pytest.raises(UserError, match="no such directory"):
        shards.folder_samples(str(tmp_path / "nope"), "train", 0)


def test_cli_user_error_is_one_line(tmp_path):
    rc, out, err = run_cli(["folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2 and err.strip().count("\n") == 0
    assert err.startswith("spt_dist: error: --src: no such directory") and "missing" in err


# --------------------------------------------------------------------------- determinism and sharding


def train_stream(paths, **kw):
    args = dict(rank=0, world=1, batch_size=16, transform=to_tensor, num_classes=4, seed=0, workers=0, shuffle_buffer=50)
    return TrainStream(paths, **(args | kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_deterministic(syn, workers):
    paths = train_shards(syn)
    a = take(train_stream(paths, workers=workers, transform=random_flip), 20)  # 20 x 16 > 240: crosses an epoch
    b = take(train_stream(paths, workers=workers, transform=random_flip), 20)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert a[0]["images"].shape == (16, 3, 16, 16) and a[0]["labels"].dtype == torch.long
    assert all(len(x["keys"]) == 16 for x in a)
    assert keys_of(take(train_stream(paths, workers=workers, seed=1), 20)) != keys_of(a)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_resumes_exactly_from_its_state(syn, workers):
    """A stream loaded with another's state after k batches yields what that one yields after k: the same
    samples, order and augmentation, across an epoch boundary (k = 17 of 15 per epoch)."""
    paths = train_shards(syn)
    whole = train_stream(paths, workers=workers, transform=random_flip)
    first = take(whole, 17)
    state = json.loads(json.dumps(whole.state_dict()))  # as a checkpoint stores it
    rest = take(whole, 8)
    resumed = train_stream(paths, workers=workers, transform=random_flip)
    resumed.load_state_dict(state)
    again = take(resumed, 8)
    assert keys_of(again) == keys_of(rest) and keys_of(first)[-16:] != keys_of(again)[:16]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(rest, again))
    whole.close()
    resumed.close()
    with pytest.raises(ValueError, match="cannot continue"):
        train_stream(paths, world=2, workers=workers, transform=random_flip).load_state_dict(state)


def test_train_stream_epoch_and_rng_isolation(syn):
    paths = train_shards(syn)
    stream = train_stream(paths, transform=random_flip)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch0 = keys_of(take(stream, TRAIN // 16))
    assert torch.equal(torch.rand(3), expected)  # the stream's random transform left the global RNG alone
    assert sorted(epoch0) == sorted(all_keys(paths))  # one epoch = every sample exactly once


def test_train_augmentation_is_seeded_by_the_sample_alone(syn):
    """Sample i of a worker's epoch is transformed under the python, numpy and torch RNG states of generators
    seeded from random.Random("spt_dist/spt_dist/SEED/EPOCH/RANK/WORKER/i") (seed_string(seed_string(seed, epoch,
    rank, worker), i); what an IsolatedRng of that string gives):
    fixed across versions, so a checkpoint resumes with the same augmentation; and the global states are the
    trainer's again after each batch."""
    import random

    from spt_dist.data.loader import IsolatedRng

    def draws(img):  # the first draw of each RNG, as the "image"
        return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)

    def expected(seed):
        r = random.Random(seed)
        py, npy, th = r.getrandbits(64), r.getrandbits(32), r.getrandbits(63)
        return [random.Random(py).random(), np.random.RandomState(npy).rand(),
                torch.rand((), generator=torch.Generator().manual_seed(th)).item()]

    paths = train_shards(syn)
    stream = train_stream(paths, transform=draws, seed=5, shuffle_buffer=7)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    def np_state():
        name, key, *rest = np.random.get_state()
        return name, key.tobytes(), *rest

    trainer = random.getstate(), np_state(), torch.get_rng_state()
    got = []
    for _ in range(TRAIN // 16 + 2):  # into the second epoch
        got += next(stream)["images"].tolist()
        assert random.getstate() == trainer[0] and np_state() == trainer[1]
        assert torch.equal(torch.get_rng_state(), trainer[2])
    seeds = [f"spt_dist/spt_dist/5/{i // TRAIN}/0/0/{i % TRAIN + 1}" for i in range(len(got))]
    assert got == [expected(s) for s in seeds]
    assert got[3] == IsolatedRng(seeds[3])(draws, None).tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_disjoint_in_process(syn, workers):
    paths = train_shards(syn)
    per_rank = TRAIN // 2 // 10  # batches of 10 covering exactly this rank's first epoch
    keys = [keys_of(take(train_stream(paths, rank=r, world=2, batch_size=10, workers=workers), per_rank)) for r in (0, 1)]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(all_keys(paths))

    test = expand_shards(f"{syn}/test-*.tar", "data.eval_shards")
    evals = [EvalStream(test, rank=r, world=2, batch_size=16, transform=to_tensor, num_classes=4, workers=workers)
             for r in (0, 1)]
    ek = [keys_of(e) for e in evals]
    assert sorted(ek[0] + ek[1]) == sorted(all_keys(test)) and len(all_keys(test)) == TEST
    assert keys_of(evals[0]) == ek[0]  # re-iterable, same order
    assert [len(b["keys"]) for b in evals[1]][-1] <= 16


def test_eval_rank_without_shards(syn):
    test = expand_shards(f"{syn}/test-000000.tar", "k")
    for workers in (0, 2):
        assert list(EvalStream(test, rank=1, world=2, batch_size=8, transform=to_tensor, num_classes=4, workers=workers)) == []


def test_torchrun_two_ranks(syn, tmp_path):
    batches, workers = TRAIN // 2 // 10, 2
    check(run_job(["tests/workers/read_keys.py", f"{syn}/train-{{000000..000007}}.tar", f"{syn}/test-*.tar", "10",
                   str(batches), str(workers), str(tmp_path)], nproc=2, timeout=300))
    got = [json.loads((tmp_path / f"keys-rank{r}.json").read_text()) for r in (0, 1)]
    test = expand_shards(f"{syn}/test-*.tar", "k")
    e0, e1 = got[0]["eval_keys"], got[1]["eval_keys"]
    assert not set(e0) & set(e1) and sorted(e0 + e1) == sorted(all_keys(test))  # each test sample exactly once
    t0, t1 = got[0]["train_keys"], got[1]["train_keys"]
    assert not set(t0) & set(t1) and sorted(t0 + t1) == sorted(all_keys(train_shards(syn)))
    # The distributed job reads exactly what an in-process stream with the same (seed, rank, world, workers) reads.
    paths = train_shards(syn)
    for r in (0, 1):
        local = take(train_stream(paths, rank=r, world=2, batch_size=10, workers=workers, shuffle_buffer=50), batches)
        assert got[r]["train_keys"] == keys_of(local)


# --------------------------------------------------------------------------- faults


def write_tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """3 shards: 6 good + 4 bad samples; a truncated tar (5 good before the cut); a garbage file."""
    d = tmp_path_factory.mktemp("faulty")
    good = png_bytes((200, 30, 30))
    members = [m for i in range(6) for m in ((f"good{i}.png", good), (f"good{i}.cls", b"1"))]
    members += [("corrupt.png", good[: len(good) // 2]), ("corrupt.cls", b"0"),  # truncated PNG data
                ("nolabel.png", good),
                ("notint.png", good), ("notint.cls", b"one"),
                ("range.png", good), ("range.cls", b"7")]
    write_tar(d / "mixed-000000.tar", members)
    write_tar(d / "mixed-000001.tar", [m for i in range(10) for m in ((f"t{i}.png", good), (f"t{i}.cls", b"0"))])
    with tarfile.open(d / "mixed-000001.tar") as t:
        cut = next(m for m in t.getmembers() if m.name == "t5.png")
    with open(d / "mixed-000001.tar", "r+b") as f:
        f.truncate(cut.offset_data + cut.size // 2)
    (d / "mixed-000002.tar").write_bytes(b"this is not a tar file\n" * 40)
    paths = expand_shards(f"{d}/mixed-*.tar", "data.eval_shards")
    good_keys = {f"good{i}" for i in range(6)} | {f"t{i}" for i in range(5)}
    return paths, good_keys


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_skips_faults(faulty, workers):
    paths, good_keys = faulty
    stream = EvalStream(paths, rank=0, world=1, batch_size=4, transform=to_tensor, num_classes=2, workers=workers)
    keys = keys_of(stream)
    assert sorted(keys) == sorted(good_keys)
    expected = {"bad_image": 1, "bad_label": 2, "label_out_of_range": 1, "bad_tar": 2}
    assert stream.faults() == expected
    keys_of(stream)
    assert stream.faults() == expected  # per pass, not cumulative


@pytest.mark.parametrize("workers", [0, 2])
def test_train_skips_faults(faulty, workers):
    paths, good_keys = faulty
    stream = train_stream(paths, batch_size=4, num_classes=2, workers=workers, shuffle_buffer=8)
    seen = set()
    for _ in range(40):  # one epoch is ~3 batches; the truncated tar must not stop the stream
        seen |= set(next(stream)["keys"])
    assert seen == good_keys
    # ~13 epochs read: each fault is counted once, not once per epoch.
    assert stream.faults() == {"bad_image": 1, "bad_label": 2, "label_out_of_range": 1, "bad_tar": 2}
    stream.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_train_all_bad_shards_fail_loudly(faulty, workers):
    paths, _ = faulty
    with pytest.raises(UserError, match="found no valid sample in any of the 1 shards"):
        next(train_stream([paths[2]], workers=workers))


# --------------------------------------------------------------------------- user errors


def test_shard_spec_errors(syn, tmp_path):
    with pytest.raises(UserError, match=r"data\.train_shards: shard file not found: '.*train-000008\.tar'"):
        expand_shards(f"{syn}/train-{{000000..000009}}.tar", "data.train_shards")
    with pytest.raises(UserError, match=r"data\.eval_shards: no file matches '.*val-\*\.tar'"):
        expand_shards(f"{syn}/val-*.tar", "data.eval_shards")
    with pytest.raises(UserError, match="no shards given"):
        expand_shards(" , ", "data.train_shards")
    with pytest.raises(UserError, match="is a directory"):
        expand_shards(syn, "data.train_shards")
    with pytest.raises(UserError, match="more than once"):
        expand_shards(f"{syn}/train-000000.tar,{syn}/train-*.tar", "data.train_shards")
    # Comma list mixing a brace pattern (with its own commas) and a plain path.
    got = expand_shards(f"{syn}/train-{{000000,000003}}.tar, {syn}/test-000000.tar", "k")
    assert [os.path.basename(p) for p in got] == ["train-000000.tar", "train-000003.tar", "test-000000.tar"]

    with pytest.raises(UserError, match=r"data\.train_shards: 8 shards for 2 ranks x 5 workers; need at least 10"):
        train_stream(train_shards(syn), world=2, workers=5)

    (tmp_path / "x.tar").write_bytes(b"")
    assert count_samples([str(tmp_path / "x.tar")]) is None  # no sizes.json
    assert count_samples(train_shards(syn)[:3]) == 3 * PER_SHARD


# --------------------------------------------------------------------------- hostile shards and metadata


def _tar_number(n, width=12):
    """A tar numeric field: octal digits and a NUL, or GNU base-256 (0x80, big-endian) when too large."""
    if n < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, n)
    return bytes([0x80]) + n.to_bytes(width - 1, "big")


def gnu_sparse_member(name, data, realsize, extended=False):
    """An old-GNU sparse member ('S'): `data` stored, at the end of a `realsize`-byte file of holes. tarfile can
    read but not write these; extracting one allocates `realsize` bytes."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136], h[136:148] = _tar_number(len(data)), _tar_number(0)
    h[156:157], h[257:265] = b"S", b"ustar  \0"  # old GNU magic
    h[386:398], h[398:410] = _tar_number(realsize - len(data)), _tar_number(len(data))  # sparse map entry 0
    h[482] = int(extended)
    h[483:495] = _tar_number(realsize)
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + b"\0" * (-len(data) % 512)


def plain_member(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


@contextlib.contextmanager
def limited_address_space(extra=2 << 30):
    """This process may map at most `extra` more bytes: an attempt to allocate 64 GiB fails at once with
    MemoryError instead of reaching for the machine's memory."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    saved = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, saved)


def test_sparse_member_declaring_64_gib_is_refused_unread(tmp_path):
    """A GNU sparse member declaring 64 GiB in a small shard: its sample is counted as bad_image without
    reading it, the samples around it come through, a forged '.__key__' member changes nothing; a sparse
    header whose extension block is cut off, and a member declaring 2**80 bytes, are bad_tars (not a traceback
    or a hang)."""
    good = png_bytes((200, 30, 30))
    shard = tmp_path / "evil-000000.tar"
    shard.write_bytes(plain_member("good0.png", good) + plain_member("good0.cls", b"1")
                      + plain_member("good0.__key__", b"forged")
                      + plain_member("huge.cls", b"0") + gnu_sparse_member("huge.png", b"x", 64 << 30)
                      + plain_member("huge.jpg", good)  # the rest of the refused sample: skipped unread too
                      + plain_member("good1.png", good) + plain_member("good1.cls", b"0") + b"\0" * 1024)
    cut = tmp_path / "evil-000001.tar"
    cut.write_bytes(plain_member("a.png", good) + plain_member("a.cls", b"0")
                    + gnu_sparse_member("b.png", b"x", 64 << 30, extended=True)[:512])  # extension block cut off
    liar = tarfile.TarInfo("d.png")
    liar.size = 2**80  # a plain member declaring more than the file holds: a truncated tar, never stepped over
    lying = tmp_path / "evil-000002.tar"
    lying.write_bytes(plain_member("c.png", good) + plain_member("c.cls", b"1")
                      + liar.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 512)
    paths = [str(shard), str(cut), str(lying)]
    start = time.perf_counter()
    with limited_address_space():
        stream = EvalStream(paths, rank=0, world=1, batch_size=4, transform=to_tensor, num_classes=2)
        batches = list(stream)
    assert time.perf_counter() - start < 5
    assert keys_of(batches) == ["good0", "good1", "c"]  # "a" is dropped with its tar, like any half-read sample
    assert batches[0]["labels"].tolist() == [1, 0, 1]
    assert stream.faults() == {"bad_image": 1, "bad_label": 0, "label_out_of_range": 0, "bad_tar": 2}


@pytest.mark.parametrize("workers", [0, 1])
def test_member_over_max_member_mb_is_refused(tmp_path, workers, caplog):
    """An ordinary member over the configured cap (train and eval streams take it as `max_member_mb`): its sample
    is dropped and counted, named with the member and its size, and reading goes on with the next one."""
    big = b"\0" * (300 << 10)  # 300 KiB > 0.25 MB
    good = png_bytes((30, 200, 30))
    members = [("s0.png", good), ("s0.cls", b"1"), ("big.cls", b"0"), ("big.png", big), ("s1.png", good),
               ("s1.cls", b"0")]
    for i in range(2):
        write_tar(tmp_path / f"cap-{i:06d}.tar", [(f"{i}{name}", data) for name, data in members])
    paths = expand_shards(f"{tmp_path}/cap-*.tar", "data.train_shards")
    evals = EvalStream(paths, rank=0, world=1, batch_size=4, transform=to_tensor, num_classes=2, workers=workers,
                       max_member_mb=0.25)
    assert sorted(keys_of(evals)) == ["0s0", "0s1", "1s0", "1s1"]
    assert evals.faults()["bad_image"] == 2 and evals.faults()["bad_tar"] == 0
    if workers == 0:
        assert f"{paths[0]}:0big" in caplog.text and "0big.png" in caplog.text and str(len(big)) in caplog.text
    train = train_stream(paths, batch_size=2, num_classes=2, workers=workers, shuffle_buffer=4, max_member_mb=0.25)
    assert {k for _ in range(6) for k in next(train)["keys"]} == {"0s0", "0s1", "1s0", "1s1"}
    assert train.faults()["bad_image"] == 2
    train.close()


def test_max_member_mb_config_key():
    from spt_dist.config import load_config
    assert load_config().data.max_member_mb == 64
    assert load_config(overrides=["data.max_member_mb=0.5"]).data.max_member_mb == 0.5
    for bad in ("0", "-3", "nan", "inf"):
        with pytest.raises(UserError, match=r"^data\.max_member_mb: (must be a positive number|expected a finite)"):
            load_config(overrides=[f"data.max_member_mb={bad}"])
    with pytest.raises(UserError, match=r"^data\.max_member_mb: expected a number"):
        load_config(overrides=["data.max_member_mb=lots"])


def test_sizes_json_entries_are_checked(tmp_path):
    """sizes.json decides the epoch length: a count that is no integer, negative, or more than its shard file can
    hold stops the run with one line naming the file, the shard and the value (the reader and the shard tool)."""
    def write_train(test="0"):  # the shard tool, raising its UserError
        return shards.main.__wrapped__(["synthetic", "--out", str(tmp_path), "--classes", "2", "--train", "6",
                                        "--test", test, "--size", "8", "--samples-per-shard", "3"])

    write_train(test="3")
    paths = expand_shards(f"{tmp_path}/train-*.tar", "data.train_shards")
    sizes_path = tmp_path / "sizes.json"
    good = json.loads(sizes_path.read_text())
    assert count_samples(paths) == 6
    most = os.path.getsize(paths[1]) // 1024  # every sample is two members of at least a 512-byte header each
    sizes_path.write_text(json.dumps(good | {"train-000001.tar": most, "gone-000000.tar": 10**6}))
    assert count_samples(paths) == 3 + most  # at the bound; a listed shard that is not there is not checked
    sizes_path.write_text(json.dumps(good | {"train-000001.tar": 0}))
    assert count_samples(paths) == 3
    for value in (-1, 1e12, 10**12, most + 1, True, "3", 3.0, None, [3]):
        for shard, read in (("train-000001.tar", lambda: count_samples(paths[:1])),  # even of a shard not read
                            ("test-000000.tar", write_train)):  # another split's entry
            sizes_path.write_text(json.dumps(good | {shard: value}))
            with pytest.raises(UserError) as e:
                read()
            msg = str(e.value)
            assert "\n" not in msg and str(sizes_path) in msg and shard in msg and repr(value) in msg, msg
    # The shard tool replaces its own split's entries, so re-writing the split repairs them.
    sizes_path.write_text(json.dumps(good | {"train-000001.tar": -5}))
    write_train()
    assert json.loads(sizes_path.read_text()) == good
    for bad in ("[3, 3]", '"x"', "{"):
        sizes_path.write_text(bad)
        for read in (lambda: count_samples(paths), write_train):
            with pytest.raises(UserError, match=f"^{sizes_path}: "):
                read()


# --------------------------------------------------------------------------- samples log (output.log_samples)

HOSTILE_KEYS = ["plain_00000001", "with space", "two\nlines", "100%", "%41", "", "tab\tand\rcr", "ünïcödé",
                "line\u2028sep", "nul\0", "\udcff-undecodable-byte", " ", "a+b/c?d=e&f#g"]


def test_sample_log_round_trips_hostile_keys(tmp_path):
    from spt_dist.sample_log import SampleLog, read_sample_log
    path = str(tmp_path / "samples" / "rank_00000.txt")
    steps = [(1, HOSTILE_KEYS), (2, ["ok", ""]), (3, []), (4, HOSTILE_KEYS[::-1])]
    with SampleLog(path, resume_step=None) as log:
        for step, keys in steps:
            log.write(step, keys)
        with pytest.raises(ValueError, match="step 4 written after step 4"):
            log.write(4, ["again"])
    assert read_sample_log(path) == steps
    text = open(path, "rb").read()
    assert text.count(b"\n") == len(steps) and all(32 <= b < 127 for b in text.replace(b"\n", b""))
    assert text.startswith(b"1 plain_00000001 with%20space two%0Alines 100%25 %2541  ")  # ordinary keys readable


def test_sample_log_resume_keeps_steps_up_to_the_checkpoint(tmp_path):
    from spt_dist.sample_log import SampleLog, read_sample_log
    path = tmp_path / "rank_00000.txt"
    with SampleLog(str(path), resume_step=None) as log:
        for step in range(1, 6):
            log.write(step, [f"k{step}", "with space"])
    whole = path.read_text()
    with open(path, "a") as f:
        f.write("6 torn-by-the-kil")  # the interrupted run's last write
    assert read_sample_log(str(path)) == [(s, [f"k{s}", "with space"]) for s in range(1, 6)]  # torn line left out

    with SampleLog(str(path), resume_step=3) as log:  # resumed from the checkpoint of step 3
        log.write(4, ["new4"])
    assert read_sample_log(str(path)) == [(1, ["k1", "with space"]), (2, ["k2", "with space"]),
                                          (3, ["k3", "with space"]), (4, ["new4"])]
    SampleLog(str(path), resume_step=10).close()  # past the file's end: all of it kept
    assert [s for s, _ in read_sample_log(str(path))] == [1, 2, 3, 4]

    # A malformed line (e.g. an old unescaped key with a newline) ends what a resume keeps; reading it is one error.
    path.write_text(whole.replace("3 k3 with%20space\n", "3 k3 two\nlines\n"))
    with pytest.raises(UserError, match=rf"^{path}:4: not a line of a samples log"):
        read_sample_log(str(path))
    SampleLog(str(path), resume_step=5).close()
    assert path.read_text() == "1 k1 with%20space\n2 k2 with%20space\n3 k3 two\n"
    for bad in ("1 k1\n", "x k\n", "2 a%zz\n", "2 caf\xe9\n", "-2 k\n", "02 k\n", "2 tab\tkey\n",
                "9" * 5000 + " k\n"):
        path.write_bytes(b"1 ok\n" + bad.encode("latin-1") + b"3 after\n")
        SampleLog(str(path), resume_step=5).close()
        assert read_sample_log(str(path)) == [(1, ["ok"])], bad
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # rewritten atomically, nothing left over


def test_small_data_sets_use_fewer_loader_workers():
    """Each (rank, loader worker) reads shards of its own: with too few shards a run uses fewer workers per rank
    (it says so) rather than refusing; fewer shards than ranks stays an error."""
    from spt_dist.data.loader import loader_workers
    assert [loader_workers(8, 2, 2), loader_workers(2, 2, 2), loader_workers(3, 2, 4), loader_workers(5, 1, 0)] == \
        [2, 1, 1, 0]
    with pytest.raises(UserError, match="1 shards for 2 ranks x 1 workers; need at least 2"):
        require_shards(["a.tar"], 2, loader_workers(1, 2, 2))


def test_training_augmentation_is_crop_and_flip_only():
    """data.augment: random resized crop and flip (the FGVC recipe), no colour jitter."""
    from torchvision import transforms as T

    from spt_dist.config import DataConfig
    from spt_dist.data.transforms import build_transforms
    from spt_dist.models import create_model
    train, _ = build_transforms(create_model("vit_test_tiny_patch8_32", 4), DataConfig(augment=True))
    kinds = [type(t).__name__ for t in train.transforms]
    assert kinds[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert not any(isinstance(t, T.ColorJitter) for t in train.transforms)
