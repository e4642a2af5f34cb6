"""The shard tool's split-list builder (`list`: .txt, .csv, .json) and benchmark presets (`vtab`, `fgvc`) on tiny
fake trees: labels, keys and counts read back from the tars, exact shard counts, one-line errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from spt_dist.data import shards
from spt_dist.data.benchmarks import FGVC, VTAB
from tests.conftest import run_job

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def image(path: Path, colour: tuple[int, int, int], fmt: str = "PNG") -> Path:
    """An 8x8 single-colour image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)
    return path


def read_split(out: Path, split: str) -> dict[str, tuple[str, bytes, int]]:
    """key -> (image extension, image bytes, label), from every shard of `split`."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    samples = {}
    for key, parts in members.items():
        (ext, data), = ((e, d) for e, d in parts.items() if e != "cls")
        samples[key] = (ext, data, int(parts["cls"]))
    return samples


def colour_of(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").getpixel((4, 4))


def label_by_colour(samples: dict) -> dict[tuple[int, int, int], int]:
    # JPEG is lossy: match a decoded colour to the nearest written one.
    def nearest(rgb):
        return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, rgb)))
    return {nearest(colour_of(data)): label for _, data, label in samples.values()}


def sizes(out: Path) -> dict[str, int]:
    return json.loads((out / "sizes.json").read_text())


def classes(out: Path) -> list[str]:
    return json.loads((out / "classes.json").read_text())


def run_cli(*args) -> tuple[int, str, str]:
    """The shard tool as a user runs it: `python -m spt_dist.data.shards ...`."""
    result = run_job(["-m", "spt_dist.data.shards", *map(str, args)], launcher="python", timeout=60)
    return result.returncode, result.stdout, result.stderr


# --------------------------------------------------------------------------- list


def test_txt_lists_concatenate_keep_bytes_and_reencode_others(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    kept = {
        image(root / "images" / "a.jpg", COLOURS[0], "JPEG"): 0,
        image(root / "images" / "b c.png", COLOURS[1]): 2,  # a space: split on the last whitespace
        image(root / "images" / "d.JPEG", COLOURS[2], "JPEG"): 1,
    }
    image(root / "images" / "e.bmp", COLOURS[3], "BMP")
    (root / "train800.txt").write_text("images/a.jpg 0\n\nimages/b c.png\t2\n")
    (root / "val200.txt").write_text("images/d.JPEG 1\r\nimages/e.bmp 2\n")

    shards.main(["list", "--root", str(root), "--list", str(root / "train800.txt"), "--list", str(root / "val200.txt"),
                 "--out", str(out), "--split", "train", "--classes", "3", "--samples-per-shard", "3"])
    assert sizes(out) == {"train-000000.tar": 3, "train-000001.tar": 1}
    assert classes(out) == ["0", "1", "2"]
    samples = read_split(out, "train")
    assert sorted(samples) == [f"train_{i:08d}" for i in range(4)]
    stored = {data: (ext, label) for ext, data, label in samples.values()}
    for path, label in kept.items():
        assert stored[path.read_bytes()] == ("png" if path.suffix == ".png" else "jpg", label)  # bytes as they were
    bmp = [(ext, data, label) for ext, data, label in samples.values() if data not in {p.read_bytes() for p in kept}]
    assert [(ext, colour_of(data), label) for ext, data, label in bmp] == [("png", COLOURS[3], 2)]


def test_csv_labels_as_class_names(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    names = {"x1.png": "dog", "x2.png": "cat", "x3.png": "ant", "x4.png": "cat"}
    for i, name in enumerate(names):
        image(root / name, COLOURS[i])
    rows = "".join(f"{i},{n},{c}\n" for i, (n, c) in enumerate(names.items()))
    (root / "split.csv").write_text("id,image,class\n" + rows)

    shards.main(["list", "--root", str(root), "--list", str(root / "split.csv"), "--out", str(out), "--split", "test"])
    assert classes(out) == ["ant", "cat", "dog"]  # sorted distinct names
    assert label_by_colour(read_split(out, "test")) == {COLOURS[0]: 2, COLOURS[1]: 1, COLOURS[2]: 0, COLOURS[3]: 1}

    # --class-names fixes the order (a split may lack classes); other column names are given by flag.
    (root / "other.csv").write_text("file_name,species\n" + "".join(f"{n},{c}\n" for n, c in names.items()))
    (root / "names.txt").write_text("dog\ncat\nant\nbee\n")
    out2 = tmp_path / "out2"
    shards.main(["list", "--root", str(root), "--list", str(root / "other.csv"), "--out", str(out2), "--split", "test",
                 "--class-names", str(root / "names.txt"), "--path-column", "file_name", "--label-column", "species"])
    assert classes(out2) == ["dog", "cat", "ant", "bee"]
    assert label_by_colour(read_split(out2, "test")) == {COLOURS[0]: 0, COLOURS[1]: 1, COLOURS[2]: 2, COLOURS[3]: 1}


def test_json_mapping_and_list_of_objects(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    for i in range(4):
        image(root / "imgs" / f"{i}.png", COLOURS[i])
    (root / "a.json").write_text(json.dumps({"imgs/0.png": 3, "imgs/1.png": 0}))
    (root / "b.json").write_text(json.dumps([{"img": "imgs/2.png", "target": 1}, {"img": "imgs/3.png", "target": 2}]))

    shards.main(["list", "--root", str(root), "--list", str(root / "a.json"), "--list", str(root / "b.json"),
                 "--out", str(out), "--split", "train", "--samples-per-shard", "10"])
    assert classes(out) == ["0", "1", "2", "3"]  # no --classes: largest label + 1
    assert sizes(out) == {"train-000000.tar": 4}
    assert label_by_colour(read_split(out, "train")) == {COLOURS[0]: 3, COLOURS[1]: 0, COLOURS[2]: 1, COLOURS[3]: 2}


def test_num_shards_is_exact_and_even(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    lines = []
    for i in range(10):
        image(root / f"{i}.png", COLOURS[i % 6])
        lines.append(f"{i}.png {i % 2}\n")
    (root / "l.txt").write_text("".join(lines))
    args = ["list", "--root", str(root), "--list", str(root / "l.txt"), "--out", str(out), "--split", "train"]
    shards.main([*args, "--num-shards", "4"])
    assert sizes(out) == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 2, "train-000003.tar": 2}
    assert len(read_split(out, "train")) == 10
    shards.main([*args, "--num-shards", "10", "--seed", "1"])
    assert list(sizes(out).values()) == [1] * 10 and len(read_split(out, "train")) == 10


# --------------------------------------------------------------------------- presets


def fake_vtab(root: Path, folder: str, n_train: int, n_val: int, n_test: int, top_label: int) -> list[int]:
    """A VTAB-1k task folder as NOAH/SPT ship it, labels counting down from `top_label`; the train800val200 labels."""
    def listing(name: str, n: int) -> list[str]:
        rows = []
        for i in range(n):
            image(root / folder / "images" / name / f"{i:04d}.jpg", COLOURS[i % 6], "JPEG")
            rows.append(f"images/{name}/{i:04d}.jpg {top_label - i}\n")
        return rows
    train, val, test = listing("train800", n_train), listing("val200", n_val), listing("test", n_test)
    for name, rows in {"train800": train, "val200": val, "train800val200": train + val, "test": test}.items():
        (root / folder / f"{name}.txt").write_text("".join(rows))
    return [int(row.split()[-1]) for row in train + val]


def check_loads(out: Path, eval_split: str, num_classes: int, train_samples: int) -> None:
    """The shards load through the data set resolver a run uses."""
    from spt_dist.config import DataConfig
    from spt_dist.data.dataset import resolve_dataset
    ds = resolve_dataset(DataConfig(train_shards=f"{out}/train-*.tar", eval_shards=f"{out}/{eval_split}-*.tar"))
    assert (ds.num_classes, ds.train_samples) == (num_classes, train_samples)


def test_vtab_preset(tmp_path):
    root, out = tmp_path / "vtab-1k", tmp_path / "out"
    tasks = {t.name: t for t in VTAB}
    cifar_labels = fake_vtab(root, tasks["cifar100"].folder, 8, 3, 5, 99)
    fake_vtab(root, tasks["dtd"].folder, 6, 2, 4, 46)

    shards.main(["vtab", "--root", str(root), "--out", str(out), "--tasks", "cifar100,dtd", "--num-shards", "4"])
    for name, n_train, n_test in (("cifar100", 11, 5), ("dtd", 8, 4)):
        d = out / name
        assert len(classes(d)) == tasks[name].classes
        train = {k: v for k, v in sizes(d).items() if k.startswith("train-")}
        assert len(train) == 4 and sum(train.values()) == n_train  # train800val200
        assert sizes(d)["test-000000.tar"] == n_test and len(sizes(d)) == 5
        assert len(read_split(d, "test")) == n_test
        check_loads(d, "test", tasks[name].classes, n_train)
    assert sorted(label for *_, label in read_split(out / "cifar100", "train").values()) == sorted(cifar_labels)

    # Hyper-parameter search: train800 -> train, val200 -> val; a missing task is skipped when asked.
    shards.main(["vtab", "--root", str(root), "--out", str(tmp_path / "hp"), "--tasks", "dtd,svhn",
                 "--protocol", "val", "--num-shards", "2", "--skip-missing"])
    assert sizes(tmp_path / "hp" / "dtd") == {"train-000000.tar": 3, "train-000001.tar": 3, "val-000000.tar": 2}
    assert not (tmp_path / "hp" / "svhn").exists()


def test_fgvc_preset(tmp_path):
    root, out = tmp_path / "fgvc", tmp_path / "out"
    cub = next(t for t in FGVC if t.name == "cub")
    images = root / cub.folder / cub.image_dir
    splits = {"train": range(0, 6), "val": range(6, 8), "test": range(8, 11)}
    for split, ids in splits.items():
        mapping = {}
        for i in ids:
            rel = f"{i % 3:03d}.Bird_{i % 3}/img_{i}.jpg"
            image(images / rel, COLOURS[i % 6], "JPEG")
            mapping[rel] = (i * 37) % cub.classes
        (root / cub.folder / f"{split}.json").write_text(json.dumps(mapping))

    shards.main(["fgvc", "--root", str(root), "--out", str(out), "--tasks", "cub", "--num-shards", "3"])
    d = out / "cub"
    assert len(classes(d)) == cub.classes == 200
    assert sizes(d) == {"test-000000.tar": 3, "train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 2}
    assert sorted(read_split(d, "train")) == [f"train_{i:08d}" for i in range(8)]  # train.json + val.json
    check_loads(d, "test", 200, 8)


# --------------------------------------------------------------------------- errors


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """root/images/{0,1,2}.png, root/l.txt listing them with labels 0, 1, 1."""
    root = tmp_path / "root"
    for i in range(3):
        image(root / "images" / f"{i}.png", COLOURS[i])
    (root / "l.txt").write_text("images/0.png 0\nimages/1.png 1\nimages/2.png 1\n")
    return root


ERRORS = {
    # name: (list file name and content, extra flags, what the one line must contain)
    "missing list": (None, [], ["nope.txt", "split list not found"]),
    "no label": (("bad.txt", "images/0.png 0\nimages/1.png\n"), [], ["bad.txt:2", "expected 'IMAGE_PATH LABEL'"]),
    "label out of range": (("bad.txt", "images/0.png 0\n\nimages/1.png 5\n"), ["--classes", "3"],
                           ["bad.txt:3", "label 5 out of range [0, 3)"]),
    "image missing": (("bad.txt", "images/0.png 0\nimages/9.png 1\n"), [], ["bad.txt:2", "image not found", "9.png"]),
    "csv no label column": (("bad.csv", "image,colour\nimages/0.png,red\n"), [], ["bad.csv:1", "--label-column"]),
    "json bad label": (("bad.json", '{"images/0.png": 1, "images/1.png": 1.5}'), [],
                       ["bad.json", "key 'images/1.png'", "1.5"]),
    "listed twice": (("bad.txt", "images/0.png 0\n./images/0.png 0\n"), [], ["bad.txt:2", "listed twice", "bad.txt:1"]),
    "too many shards": (("l.txt", None), ["--num-shards", "4"], ["--num-shards", "4 shards for 3 samples"]),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_list_errors_are_one_line(name, small_tree, tmp_path):
    listing, flags, needles = ERRORS[name]
    list_file = small_tree / (listing[0] if listing else "nope.txt")
    if listing and listing[1] is not None:
        list_file.write_text(listing[1])
    rc, _, err = run_cli("list", "--root", small_tree, "--list", list_file, "--out", tmp_path / "out",
                         "--split", "train", *flags)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("spt_dist: error: "), err
    assert all(needle in err for needle in needles), err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_preset_missing_task_folder_is_one_line(tmp_path):
    rc, _, err = run_cli("fgvc", "--root", tmp_path, "--out", tmp_path / "out", "--tasks", "dogs")
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("spt_dist: error: --root: no directory 'Stanford-dogs' for task dogs"), err
    rc, _, err = run_cli("vtab", "--root", tmp_path, "--out", tmp_path / "out", "--tasks", "cifar10")
    assert rc == 2 and err.count("\n") == 1 and "--tasks: no vtab task 'cifar10'" in err, err
    rc, _, err = run_cli("vtab", "--root", tmp_path, "--out", tmp_path / "out", "--tasks", "dtd", "--skip-missing")
    assert rc == 2 and err.count("\n") == 1 and "--root: none of the tasks' folders is in" in err, err
