"""The interface every engine offers the trainer: forward, backward, step, full weights, checkpoints."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from spt_dist.errors import UserError
from spt_dist.config import EngineConfig, OptimConfig

# AdamW's per-entry state: what a checkpoint keeps of the optimizer besides its step count.
ADAM_STATE = ("exp_avg", "exp_avg_sq")

# Builds an LR scheduler for the optimizer the engine ends up stepping (DeepSpeed wraps the client one).
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class EngineSpec:
    engine: EngineConfig
    optim: OptimConfig
    micro_batch_size: int
    scheduler: SchedulerFactory
    device: torch.device
    # The optimizer to wrap; None: AdamW per `optim` (the score pass passes one that never changes anything).
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None


class Engine(ABC):
    """A model wrapped for data-parallel training (sharded or not), with its optimizer and schedule."""

    module: nn.Module  # call it for the forward pass
    input_dtype: torch.dtype  # the dtype images must have on entry

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (scaled by 1/grad_accum inside)."""

    @abstractmethod
    def step(self) -> bool:
        """Ends a micro-step; at an accumulation boundary clips, steps optimizer and schedule, zeroes
        gradients and returns True."""

    @abstractmethod
    def local_gradients(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(parameter name, flat offset, gradient) for this rank's own shard of each trainable parameter.

        Valid after the backward of an accumulation boundary and before `step()`: the gradient of the
        global-batch mean loss (reduced over ranks), fp32, 1-D, a view into the engine's own storage.
        Shards of all ranks together cover every parameter exactly once; no rank gathers anything.
        """

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that holds the state (inside ZeRO's wrapper: the client one, on flat partitions)."""

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (Adam: exp_avg, exp_avg_sq, step), local shards only."""
        total = 0
        for state in self.optimizer().state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    local = value.to_local() if hasattr(value, "to_local") else value
                    total += local.numel() * local.element_size()
        return total

    @abstractmethod
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or every trainable one) as a full fp32 CPU tensor, on every rank. Collective: all
        ranks must call it."""

    @abstractmethod
    def optimizer_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        """Collective. ({trainable parameter name: {"exp_avg": t, "exp_avg_sq": t}}, the optimizer's step count):
        full fp32 CPU tensors shaped like the parameters, the same on any world size and engine (complete on
        rank 0 at least)."""

    @abstractmethod
    def local_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list], int]:
        """This rank's own shard of the trainable state, gathering nothing (a sharded checkpoint): ({'<name>/param',
        '<name>/exp_avg', '<name>/exp_avg_sq': 1-D fp32 CPU tensors}, {name: [flat offset, full shape]}, the
        optimizer's step count). Shards of all ranks cover every trainable parameter exactly once; AdamW state is
        left out before the first step."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Collective: the inverse of `optimizer_state`, into this engine's shards (every rank passes all of it)."""

    def restore_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """After a resume loaded `weights` (full fp32) into the module before wrapping: engines that keep fp32
        master copies made from low-precision module weights (DeepSpeed bf16) set them from `weights` here."""

    @abstractmethod
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler: ...

    def load_scheduler_state(self, state: dict) -> None:
        """Restores the schedule's position and sets the learning rate the next optimizer step uses, from this
        run's schedule at that position (a resumed run may plan more steps than the interrupted one did)."""
        scheduler = self.scheduler()
        lambdas = scheduler.lr_lambdas
        scheduler.load_state_dict(state)
        scheduler.lr_lambdas = lambdas  # ours are closures: state_dict() leaves them out, keep this run's
        try:
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        except (TypeError, ValueError) as e:  # a record whose checksum was recomputed after an edit
            raise UserError(f"--resume: the checkpoint's scheduler state does not load ({e})") from None
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()
