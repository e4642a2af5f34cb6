"""Engines: DeepSpeed (ZeRO 0-3) and FSDP2 behind one interface, chosen by `engine.kind`."""

from __future__ import annotations

from torch import nn

from spt_dist.engines.base import Engine, EngineSpec


def build_engine(model: nn.Module, spec: EngineSpec) -> Engine:
    if spec.engine.kind == "deepspeed":
        from spt_dist.engines.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, spec)
    from spt_dist.engines.fsdp_engine import FSDPEngine
    return FSDPEngine(model, spec)


__all__ = ["Engine", "EngineSpec", "build_engine"]
