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
from spt_dist.run_settings import RunSettings


def dataset_classes(cfg) -> int:
    return len(read_classes(expand_shards(cfg.data.train_shards, "data.train_shards")))


def train_reference(cfg, model: nn.Module, world: int, resume_from=None) -> nn.Module:
    """Trains `model` (already given its trainable parameters) in place, as `world` ranks would.

    `resume_from`: a spt_dist.checkpoint.Checkpoint of another world size: its trainable weights, AdamW state and
    schedule position are loaded, and the data is read from the start of the epoch the run was in."""
    shards = expand_shards(cfg.data.train_shards, "data.train_shards")
    num_classes = len(read_classes(shards))
    samples = count_samples(shards)
    settings = RunSettings.resolve(cfg, samples, world)
    schedule = settings.schedule
    start_step = resume_from.step if resume_from else 0
    start_epoch = resume_from.state["samples_seen"] // samples if resume_from else 0
    transform, _ = build_transforms(model, cfg.data)
    streams = [iter(TrainStream(shards, rank=r, world=world, batch_size=settings.batch_size, transform=transform,
                                num_classes=num_classes, seed=cfg.seed, workers=cfg.data.workers,
                                shuffle_buffer=cfg.data.shuffle_buffer, start_epoch=start_epoch))
               for r in range(world)]
    if resume_from:
        model.load_state_dict(resume_from.trainable(), strict=False)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule.total_steps, schedule.warmup_steps)
    names = {p: n for n, p in model.named_parameters()}
    if resume_from:
        state = resume_from.optimizer()
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p] = {"step": torch.tensor(float(resume_from.state["optimizer_steps"])),
                                      **{k: v.clone() for k, v in state[names[p]].items()}}
        for _ in range(start_step):
            scheduler.step()
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.optim.grad_accum
    for _ in range(start_step, schedule.total_steps):
        per_micro = []  # the gradient of the global-batch mean: the mean over ranks and micro-batches
        for _ in range(accum):
            for stream in streams:
                batch = next(stream)
                loss = F.cross_entropy(model(batch["images"]).float(), batch["labels"])
                per_micro.append(torch.autograd.grad(loss, params))
        for p, *grads in zip(params, *per_micro):
            p.grad = grads[0] if len(grads) == 1 else (grads[0] + grads[1]) / 2 if len(grads) == 2 \
                else sum(grads) / len(grads)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model
