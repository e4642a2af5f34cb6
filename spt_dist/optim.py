"""AdamW with the weight-decay rule of the spec, and a per-step cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from spt_dist.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weight matrices only; never on biases, norms, the tokens timm names in `no_weight_decay()`, or
    sparse entries: deltas are 1-D, and a tensor trained through a gradient mask (a `<name>_mask` buffer beside
    it: method.sparse_update=dense_masked) is all sparse entries."""
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    masked = {name.removesuffix("_mask") for name, _ in model.named_buffers() if name.endswith("_mask")}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name in masked else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class AdamW(torch.optim.AdamW):
    """torch's AdamW that can leave out one step (`optim.nonfinite=skip`): the engine calls step() as always,
    so its own bookkeeping (accumulation, zeroing) goes on, but the parameters and the state do not move."""

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    # foreach=False: the single-tensor kernel is elementwise, so the same update results whether the
    # optimizer sees whole tensors (one process, FSDP shards) or ZeRO's flat partitions.
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, foreach=False)


def lr_at(step: int, cfg: OptimConfig, total_steps: int, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, cfg, total_steps, warmup_steps) / cfg.lr)
