"""The data set a run reads, checked before anything heavy is built: shard lists, classes, sample count."""

from __future__ import annotations

from dataclasses import dataclass

from spt_dist.config import DataConfig
from spt_dist.data.loader import count_samples, expand_shards, read_classes
from spt_dist.errors import UserError


@dataclass(frozen=True)
class Dataset:
    train_shards: list[str]
    eval_shards: list[str]
    num_classes: int
    train_samples: int


def resolve_dataset(cfg: DataConfig) -> Dataset:
    train = expand_shards(cfg.train_shards, "data.train_shards")
    evaluation = expand_shards(cfg.eval_shards, "data.eval_shards")
    classes = read_classes(train)
    num_classes = cfg.num_classes or (len(classes) if classes else None)
    if num_classes is None:
        raise UserError("data.num_classes: not set and no classes.json beside the train shards")
    samples = cfg.train_samples or count_samples(train)
    if samples is None:
        raise UserError("data.train_samples: not set and no sizes.json beside the train shards lists them all")
    return Dataset(train, evaluation, num_classes, samples)
