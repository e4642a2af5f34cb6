"""DeepSpeed engine: ZeRO stage 0-3, fp32 or bf16, our AdamW and schedule as client objects."""

from __future__ import annotations

import logging

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from spt_dist.engines.base import Engine, EngineSpec
from spt_dist.optim import build_optimizer

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
        self._engine, _, _, self._scheduler = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, spec.optim), lr_scheduler=spec.scheduler,
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

    def lr(self) -> float:
        return self._scheduler.get_last_lr()[0]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self._engine.module.named_parameters():
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
