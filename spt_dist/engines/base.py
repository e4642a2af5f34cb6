"""The interface every engine offers the trainer: forward, backward, step, full weights, checkpoints."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from spt_dist.config import EngineConfig, OptimConfig

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
    def save_checkpoint(self, directory: str) -> None:
        """Collective: the engine's own sharded checkpoint of weights, optimizer and schedule."""

    @abstractmethod
    def load_checkpoint(self, directory: str) -> None:
        """Collective: restores what `save_checkpoint` wrote."""

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()
