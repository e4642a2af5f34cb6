"""Engines: DeepSpeed (ZeRO 0-3) and FSDP2 behind one interface, chosen by `engine.kind`."""

from __future__ import annotations

import dataclasses

from torch import nn

from spt_dist.engines.base import Engine, EngineSpec
from spt_dist.optim import build_optimizer

# Every engine setting by short name, as config overrides: what the tests and benchmarks sweep over.
VARIANTS: dict[str, list[str]] = {
    "zero0": ["engine.kind=deepspeed", "engine.zero_stage=0"],
    "zero1": ["engine.kind=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine.kind=fsdp"],
}


def build_engine(model: nn.Module, spec: EngineSpec) -> Engine:
    if spec.optimizer is None:  # the default: AdamW per `optim`
        spec = dataclasses.replace(spec, optimizer=lambda m: build_optimizer(m, spec.optim))
    if spec.engine.kind == "deepspeed":
        from spt_dist.engines.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, spec)
    from spt_dist.engines.fsdp_engine import FSDPEngine
    return FSDPEngine(model, spec)


__all__ = ["VARIANTS", "Engine", "EngineSpec", "build_engine"]
