"""The final weights of a training run. Baselines: every parameter, consolidated, in one fp32 safetensors file.
PEFT methods: the artifact (`peft/`) and, unless Adapters make that impossible, the merged plain timm
checkpoint `model.safetensors`, made from the artifact as a user would."""

from __future__ import annotations

import os

import torch

from spt_dist import runfiles
from spt_dist.atomic import write_safetensors
from spt_dist.config import Config
from spt_dist.engines.base import Engine
from spt_dist.methods import get_method
from spt_dist.peft.artifact import load_pretrained, merged_state_dict, save_pretrained


def export_weights(engine: Engine, model: torch.nn.Module, run_dir: str, cfg: Config, num_classes: int, *,
                   is_main: bool, say=print) -> None:
    """Collective (the engine consolidates the weights); rank 0 writes."""
    method = get_method(cfg.method.name)
    state = engine.full_state_dict(trainable_only=method.selects)  # the frozen backbone is known
    if not is_main:
        return
    meta = {"model": cfg.model.name, "method": cfg.method.name}
    merged_path = os.path.join(run_dir, runfiles.MODEL)
    if not method.selects:
        write_safetensors(merged_path, state, meta)
        return
    state.update({k: v.detach().cpu() for k, v in model.named_buffers()})
    artifact = os.path.join(run_dir, runfiles.PEFT)
    save_pretrained(artifact, model, state, dict(
        model=cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size,
        checkpoint=cfg.model.checkpoint, seed=cfg.seed, method=cfg.method.name))
    if not method.mergeable:
        say(f"PEFT artifact: {artifact} (Adapters are not mergeable into plain timm weights)")
        return
    write_safetensors(merged_path, merged_state_dict(load_pretrained(artifact)), meta)
    say(f"PEFT artifact: {artifact}; merged timm checkpoint: {merged_path}")
