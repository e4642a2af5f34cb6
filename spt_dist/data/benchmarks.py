"""The benchmark suites of the papers (../shared/SPEC.md): VTAB-1k's 19 tasks in three groups and the five FGVC
data sets, with what their usual on-disk layouts, the recipes and the results tables need to know.

Torch-free: the shard builder and the report import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # our name: the data set's key in configs, shard directories and the results table
    folder: str  # its directory in the usual layout (VTAB-1k as NOAH/SPT ship it; FGVC as VPT does)
    classes: int  # from the data set, not from the labels seen: a 1k-image split misses classes of SUN397
    group: str  # VTAB: natural | specialized | structured; FGVC: fgvc
    gps_k: int  # GPS's top-K inputs per neuron for this task (SPEC 3)
    column: str  # the results table's column header
    image_dir: str = ""  # FGVC: where the split files' paths start, relative to `folder`


VTAB_GROUPS = ("natural", "specialized", "structured")

# VTAB-1k: train on train800val200 (1000 images), test on the full test split (SPEC 2, the papers' protocol).
VTAB = (
    Task("cifar100", "cifar", 100, "natural", 1, "CIFAR-100"),
    Task("caltech101", "caltech101", 102, "natural", 1, "Caltech101"),
    Task("dtd", "dtd", 47, "natural", 1, "DTD"),
    Task("flowers102", "oxford_flowers102", 102, "natural", 1, "Flowers102"),
    Task("pets", "oxford_iiit_pet", 37, "natural", 1, "Pets"),
    Task("svhn", "svhn", 10, "natural", 1, "SVHN"),
    Task("sun397", "sun397", 397, "natural", 1, "Sun397"),
    Task("patch_camelyon", "patch_camelyon", 2, "specialized", 2, "Camelyon"),
    Task("eurosat", "eurosat", 10, "specialized", 1, "EuroSAT"),
    Task("resisc45", "resisc45", 45, "specialized", 1, "Resisc45"),
    Task("retinopathy", "diabetic_retinopathy", 5, "specialized", 1, "Retinopathy"),
    Task("clevr_count", "clevr_count", 8, "structured", 1, "Clevr-Count"),
    Task("clevr_dist", "clevr_dist", 6, "structured", 1, "Clevr-Dist"),
    Task("dmlab", "dmlab", 6, "structured", 1, "DMLab"),
    Task("kitti_dist", "kitti", 4, "structured", 1, "KITTI-Dist"),
    Task("dsprites_loc", "dsprites_loc", 16, "structured", 1, "dSpr-Loc"),
    Task("dsprites_ori", "dsprites_ori", 16, "structured", 1, "dSpr-Ori"),
    Task("smallnorb_azi", "smallnorb_azi", 18, "structured", 1, "sNORB-Azim"),
    Task("smallnorb_ele", "smallnorb_ele", 9, "structured", 1, "sNORB-Elev"),
)

# FGVC: VPT's splits (train.json, val.json, test.json: {"relative/path.jpg": label}); train on train + val.
FGVC = (
    Task("cub", "CUB_200_2011", 200, "fgvc", 2, "CUB-200-2011", image_dir="images"),
    Task("nabirds", "nabirds", 555, "fgvc", 20, "NABirds", image_dir="images"),
    Task("flowers", "OxfordFlower", 102, "fgvc", 1, "Oxford Flowers"),
    Task("dogs", "Stanford-dogs", 120, "fgvc", 1, "Stanford Dogs", image_dir="Images"),
    Task("cars", "Stanford-cars", 196, "fgvc", 15, "Stanford Cars"),
)

SUITES = {"vtab": VTAB, "fgvc": FGVC}


def find_task(name: str) -> tuple[str, Task] | None:
    """(suite, task) for a task name such as `cifar100` or `vtab/cifar100`; None if unknown."""
    suite_hint, _, task_name = name.lower().rpartition("/")
    for suite, tasks in SUITES.items():
        if suite_hint and suite_hint != suite:
            continue
        for task in tasks:
            if task.name == task_name:
                return suite, task
    return None
