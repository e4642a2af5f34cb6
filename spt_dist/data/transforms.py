"""Image transforms from timm, resolved from the model's own input size and normalisation."""

from __future__ import annotations

from typing import Callable

from timm.data import create_transform, resolve_data_config
from torch import nn

from spt_dist.config import DataConfig


def build_transforms(model: nn.Module, cfg: DataConfig) -> tuple[Callable, Callable]:
    """(train, eval) transforms: PIL RGB image -> normalised float tensor [3, H, W]."""
    data_cfg = resolve_data_config({"crop_pct": cfg.crop_pct}, model=model)
    eval_transform = create_transform(**data_cfg, is_training=False)
    train_transform = create_transform(**data_cfg, is_training=True) if cfg.augment else eval_transform
    return train_transform, eval_transform
