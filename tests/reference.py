"""The plain-PyTorch reference the engines are checked against: one process playing every rank.

The same per-rank micro-batches (read through the same data pipeline for each rank of `world`), the gradient
of the global-batch mean loss formed as the mean of the ranks' gradients like the all-reduce, and torch's
AdamW with the same groups and schedule. On CPU in fp32 every engine must match it bit for bit at 1 and 2
ranks: halving is exact and a 2-term sum commutes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spt_dist.data.loader import TrainStream, count_samples, expand_shards, read_classes
from spt_dist.data.transforms import build_transforms
from spt_dist.optim import build_optimizer, build_scheduler
from spt_dist.trainer import Schedule


def dataset_classes(cfg) -> int:
    return len(read_classes(expand_shards(cfg.data.train_shards, "data.train_shards")))


def train_reference(cfg, model: nn.Module, world: int) -> nn.Module:
    """Trains `model` (already given its trainable parameters) in place, as `world` ranks would."""
    shards = expand_shards(cfg.data.train_shards, "data.train_shards")
    num_classes = len(read_classes(shards))
    schedule = Schedule.plan(cfg, count_samples(shards), world)
    transform, _ = build_transforms(model, cfg.data)
    streams = [iter(TrainStream(shards, rank=r, world=world, batch_size=cfg.data.batch_size, transform=transform,
                                num_classes=num_classes, seed=cfg.seed, workers=cfg.data.workers,
                                shuffle_buffer=cfg.data.shuffle_buffer)) for r in range(world)]
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule.total_steps, schedule.warmup_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(schedule.total_steps):
        per_rank = []
        for stream in streams:
            batch = next(stream)
            loss = F.cross_entropy(model(batch["images"]).float(), batch["labels"])
            per_rank.append(torch.autograd.grad(loss, params))
        for p, *grads in zip(params, *per_rank):
            p.grad = grads[0] if world == 1 else (grads[0] + grads[1]) / 2 if world == 2 else sum(grads) / world
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model
