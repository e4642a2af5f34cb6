"""What a run's config means on this many ranks: the per-rank batch and the schedule, resolved once. The
config itself is never changed, so what is saved and compared on resume is what the user wrote."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spt_dist.config import Config, OptimConfig, per_rank_batch_size
from spt_dist.errors import UserError


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    epochs: int

    @classmethod
    def plan(cls, optim: OptimConfig, train_samples: int, global_batch: int) -> "Schedule":
        steps_per_epoch = train_samples // global_batch
        if steps_per_epoch == 0:
            raise UserError(f"data.batch_size: a global batch of {global_batch} (batch_size x grad_accum x "
                            f"ranks) is larger than the {train_samples} training samples")
        total = optim.max_steps or optim.epochs * steps_per_epoch
        warmup = min(round(optim.warmup_epochs * steps_per_epoch), total - 1)
        return cls(steps_per_epoch, total, warmup, math.ceil(total / steps_per_epoch))


@dataclass(frozen=True)
class RunSettings:
    world_size: int
    batch_size: int  # per rank and micro-step
    grad_accum: int
    schedule: Schedule

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def samples_after(self, steps: int) -> int:
        return steps * self.global_batch

    @classmethod
    def resolve(cls, cfg: Config, train_samples: int, world_size: int) -> "RunSettings":
        batch = per_rank_batch_size(cfg, world_size)
        global_batch = batch * cfg.optim.grad_accum * world_size
        return cls(world_size, batch, cfg.optim.grad_accum, Schedule.plan(cfg.optim, train_samples, global_batch))
