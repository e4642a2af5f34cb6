"""Engines: DeepSpeed (ZeRO 0-3) and FSDP2 behind one interface, chosen by `engine.kind`."""

from __future__ import annotations

import dataclasses

from torch import nn

from spt_dist.engines.base import Engine, EngineSpec
from spt_dist.optim import build_optimizer

# Every engine setting by short name (EngineConfig fields): what the tests, benchmarks and the library's
# `score(engine=...)` choose from; VARIANTS: the same as config overrides.
ENGINE_SETTINGS: dict[str, dict] = {
    **{f"zero{stage}": {"kind": "deepspeed", "zero_stage": stage} for stage in range(4)},
    "fsdp2": {"kind": "fsdp"},
}
VARIANTS: dict[str, list[str]] = {name: [f"engine.{key}={value}" for key, value in fields.items()]
                                  for name, fields in ENGINE_SETTINGS.items()}


def build_engine(model: nn.Module, spec: EngineSpec) -> Engine:
    if spec.optimizer is None:  # the default: AdamW per `optim`
        spec = dataclasses.replace(spec, optimizer=lambda m: build_optimizer(m, spec.optim))
    if spec.engine.kind == "deepspeed":
        from spt_dist.engines.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, spec)
    from spt_dist.engines.fsdp_engine import FSDPEngine
    return FSDPEngine(model, spec)


__all__ = ["ENGINE_SETTINGS", "VARIANTS", "Engine", "EngineSpec", "build_engine"]
