"""FSDP2 engine: `fully_shard` per transformer block (the family's BackboneSpec says which modules) and at the
root, fp32 or bf16 compute."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from spt_dist.backbones import spec_for
from spt_dist.engines.base import ADAM_STATE, Engine, EngineSpec


class FSDPEngine(Engine):
    def __init__(self, model: nn.Module, spec: EngineSpec) -> None:
        model.to(spec.device)
        mesh = init_device_mesh(spec.device.type, (dist.get_world_size(),))
        bf16 = spec.engine.precision == "bf16"
        # bf16 compute with fp32 parameters and fp32 gradient reduction (the usual FSDP2 recipe).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in spec_for(model).block_modules(model):  # one all-gather unit per block: peak ≈ one block
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.module = model
        self.input_dtype = torch.float32  # FSDP2 casts forward inputs to param_dtype itself
        self._optimizer = spec.optimizer(model)
        self._scheduler = spec.scheduler(self._optimizer)
        self._accum = spec.optim.grad_accum
        self._clip = spec.optim.grad_clip
        # What clipping visits: the trainable parameters (FSDP2's sharded ones, which the optimizer steps and the
        # reduced gradients land on), in module order, listed once instead of every step over the frozen ones too.
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._micro_step = 0
        self._sync: bool | None = None
        self._set_sync()

    def _set_sync(self) -> None:
        # Reduce-scatter gradients only on the last micro-batch of an accumulation window. Set only when it
        # changes (setting it visits every module): with grad_accum 1, once.
        sync = self._micro_step % self._accum == self._accum - 1
        if sync != self._sync:
            self.module.set_requires_gradient_sync(sync)
            self._sync = sync

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self._accum).backward()

    def step(self) -> bool:
        boundary = self._micro_step % self._accum == self._accum - 1
        self._micro_step += 1
        if boundary:
            if self._clip > 0:  # parameters without a gradient are skipped, as clip_grad_norm_ does itself
                torch.nn.utils.clip_grad_norm_([p for p in self._trainable if p.grad is not None], self._clip)
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

    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self._scheduler

    def _sharded_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The module's parameters as the optimizer holds them. After a forward without backward (evaluation)
        the root module keeps its parameters unsharded (the root does not reshard after forward), and
        named_parameters() would give those: reshard first."""
        for module in self.module.modules():
            if hasattr(module, "reshard"):
                module.reshard()
        return self.module.named_parameters()

    def optimizer_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        if not self._optimizer.state:  # no step taken yet
            return {}, 0
        out, steps = {}, 0
        for name, param in self._sharded_parameters():  # the same order on every rank: full_tensor gathers
            if param.requires_grad:
                state = self._optimizer.state[param]
                out[name] = {k: _full(state[k]).float().cpu() for k in ADAM_STATE}
                steps = max(steps, int(state["step"]))
        return out, steps

    def local_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list], int]:
        rank, world = dist.get_rank(), dist.get_world_size()
        tensors, layout, steps = {}, {}, 0
        for name, param in self._sharded_parameters():
            if not param.requires_grad:
                continue
            if not isinstance(param, DTensor) and rank:  # not sharded: rank 0 saves it
                continue
            rows = param.shape[0]  # FSDP2 shards dim 0 like torch.chunk (see local_gradients)
            first_row = min(rank * math.ceil(rows / world), rows) if isinstance(param, DTensor) else 0
            local = _local(param)
            if local.numel() == 0:
                continue
            layout[name] = [first_row * (param.numel() // rows), list(param.shape)]
            tensors[f"{name}/param"] = local.detach().reshape(-1).float().cpu()
            state = self._optimizer.state.get(param)
            if state:
                tensors.update({f"{name}/{k}": _local(state[k]).reshape(-1).float().cpu() for k in ADAM_STATE})
                steps = max(steps, int(state["step"]))
        return tensors, layout, steps

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        for name, param in self._sharded_parameters():
            if not param.requires_grad:
                continue
            slot = self._optimizer.state[param]  # AdamW's state is lazy: made here as its first step would
            slot["step"] = torch.tensor(float(step))
            for key in ADAM_STATE:
                full = state[name][key].to(param.device)  # a DTensor's device is its local shard's
                if isinstance(param, DTensor):  # this rank's shard of the full tensor, placed like the parameter
                    slot[key] = distribute_tensor(full, param.device_mesh, param.placements)
                else:
                    slot[key] = full.clone()
        self._micro_step = 0  # checkpoints are taken at accumulation boundaries
        self._set_sync()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t  # a collective all-gather for a DTensor
