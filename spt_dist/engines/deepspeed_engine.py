"""DeepSpeed engine: ZeRO stage 0-3, fp32 or bf16, our AdamW and schedule as client objects."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_grad
from torch import nn

from spt_dist.engines.base import Engine, EngineSpec

_CHECKPOINT_TAG = "engine"


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, spec: EngineSpec) -> None:
        deepspeed.utils.logger.setLevel(logging.WARNING)
        bf16 = spec.engine.precision == "bf16"
        config = {
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": spec.optim.grad_accum,
            # Explicit: DeepSpeed's default clips at 1.0, which would differ from every other engine.
            "gradient_clipping": spec.optim.grad_clip,
            "zero_optimization": {"stage": spec.engine.zero_stage},
            "bf16": {"enabled": bf16},
            # Our AdamW is a client optimizer; under ZeRO it steps on flat fp32 partitions, which is exact
            # because AdamW is elementwise.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        # The model is built normally (not under zero.Init, which would discard timm's init); initialize()
        # moves it to the device and, at stage 3, partitions it.
        optimizer = spec.optimizer(model)
        self._engine, _, _, self._scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=spec.scheduler,
            config=config)
        self.module = self._engine
        self.input_dtype = torch.bfloat16 if bf16 else torch.float32
        self._stage = spec.engine.zero_stage

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> bool:
        boundary = self._engine.is_gradient_accumulation_boundary()
        self._engine.step()
        return boundary

    def local_gradients(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        rank, world = dist.get_rank(), dist.get_world_size()
        for name, param in self._engine.module.named_parameters():
            if not param.requires_grad:
                continue
            if hasattr(param, "ds_id"):
                # ZeRO-3: this rank's flat partition of ceil(numel / world) entries, zero-padded at the end.
                size = param.ds_tensor.ds_numel
                start = min(rank * size, param.ds_numel)
                grad = safe_get_local_grad(param).view(-1)[: max(0, min(size, param.ds_numel - start))]
                yield name, start, grad
            elif self._stage in (1, 2):
                # ZeRO-1/2: the fragment of the parameter inside this rank's flat optimizer partition (the
                # same view deepspeed's safe_get_full_grad reads before its all-reduce). None: no fragment here.
                mapping = param._hp_mapping
                if mapping is None:
                    continue
                address = mapping.lp_fragment_address
                grad = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
                if grad.numel() == param.numel() and address.numel != param.numel():
                    grad = grad.narrow(0, address.start, address.numel)
                yield name, address.start, grad.float()
            else:
                # ZeRO-0: every rank holds the whole all-reduced gradient; each takes an equal slice of it.
                size = math.ceil(param.numel() / world)
                start = min(rank * size, param.numel())
                yield name, start, param.grad.view(-1)[start : start + size].float()

    def lr(self) -> float:
        return self._scheduler.get_last_lr()[0]

    def optimizer(self) -> torch.optim.Optimizer:
        wrapper = self._engine.optimizer
        return getattr(wrapper, "optimizer", wrapper)  # ZeRO 1-3 wrap the client optimizer

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self._engine.module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param) if param.requires_grad else None  # collective at stage 3
            if full is None and hasattr(param, "ds_id"):  # a frozen stage-3 parameter: gather its shards
                with deepspeed.zero.GatheredParameters([param]):
                    full = param.detach().clone()
            out[name] = (param.detach() if full is None else full).float().cpu().clone()
        return out

    def save_checkpoint(self, directory: str) -> None:
        self._engine.save_checkpoint(directory, tag=_CHECKPOINT_TAG)

    def load_checkpoint(self, directory: str) -> None:
        self._engine.load_checkpoint(directory, tag=_CHECKPOINT_TAG)
