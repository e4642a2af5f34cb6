"""FSDP2 engine: `fully_shard` per transformer block and at the root, fp32 or bf16 compute."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from spt_dist.engines.base import Engine, EngineSpec


class FSDPEngine(Engine):
    def __init__(self, model: nn.Module, spec: EngineSpec) -> None:
        model.to(spec.device)
        mesh = init_device_mesh(spec.device.type, (dist.get_world_size(),))
        bf16 = spec.engine.precision == "bf16"
        # bf16 compute with fp32 parameters and fp32 gradient reduction (the usual FSDP2 recipe).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in model.blocks:  # one all-gather unit per block: peak memory ≈ one unsharded block
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.module = model
        self.input_dtype = torch.float32  # FSDP2 casts forward inputs to param_dtype itself
        self._optimizer = spec.optimizer(model)
        self._scheduler = spec.scheduler(self._optimizer)
        self._accum = spec.optim.grad_accum
        self._clip = spec.optim.grad_clip
        self._micro_step = 0
        self._set_sync()

    def _set_sync(self) -> None:
        # Reduce-scatter gradients only on the last micro-batch of an accumulation window.
        self.module.set_requires_gradient_sync(self._micro_step % self._accum == self._accum - 1)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self._accum).backward()

    def step(self) -> bool:
        boundary = self._micro_step % self._accum == self._accum - 1
        self._micro_step += 1
        if boundary:
            if self._clip > 0:
                params = [p for p in self.module.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self._clip)
            self._optimizer.step()
            self._scheduler.step()
            self._optimizer.zero_grad(set_to_none=True)
        self._set_sync()
        return boundary

    def local_gradients(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        rank = dist.get_rank()
        for name, param in self.module.named_parameters():
            if param.grad is None:
                continue
            # FSDP2 shards dim 0 like torch.chunk: rank r holds rows [r * ceil(rows / world), ...).
            rows = param.shape[0]
            first_row = min(rank * math.ceil(rows / dist.get_world_size()), rows)
            local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            yield name, first_row * (param.numel() // rows), local.reshape(-1).float()

    def lr(self) -> float:
        return self._scheduler.get_last_lr()[0]

    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self.module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param  # collective all-gather
            out[name] = full.detach().float().cpu().clone()
        return out

    def save_checkpoint(self, directory: str) -> None:
        model_state, optim_state = get_state_dict(self.module, self._optimizer)
        state = {"model": model_state, "optim": optim_state, "scheduler": self._scheduler.state_dict(),
                 "micro_step": self._micro_step}
        dcp.save(state, checkpoint_id=directory)

    def load_checkpoint(self, directory: str) -> None:
        model_state, optim_state = get_state_dict(self.module, self._optimizer)
        state = {"model": model_state, "optim": optim_state, "scheduler": self._scheduler.state_dict(),
                 "micro_step": self._micro_step}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.module, self._optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self._scheduler.load_state_dict(state["scheduler"])
        self._micro_step = state["micro_step"]
        self._set_sync()
