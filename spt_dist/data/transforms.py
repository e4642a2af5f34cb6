"""Image transforms from timm, resolved from the model's own input size and normalisation."""

from __future__ import annotations

from typing import Callable

from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms as T

from spt_dist.config import DataConfig


def build_transforms(model: nn.Module, cfg: DataConfig) -> tuple[Callable, Callable]:
    """(train, eval) transforms: PIL RGB image -> normalised float tensor [3, H, W]."""
    data_cfg = resolve_data_config({"crop_pct": cfg.crop_pct}, model=model)
    eval_transform = create_transform(**data_cfg, is_training=False)
    # data.augment: random resized crop and flip, as the FGVC recipe says (timm's default would add colour jitter).
    train_transform = create_transform(**data_cfg, is_training=True, color_jitter=None) if cfg.augment \
        else eval_transform
    return train_transform, eval_transform


def build_contrastive_transform(model: nn.Module) -> Callable:
    """GPS's views for the contrastive score (SPEC 3): random resized crop, flip, colour jitter (p 0.8),
    greyscale (p 0.2), at the model's input size and normalisation."""
    data_cfg = resolve_data_config({}, model=model)
    return T.Compose([
        T.RandomResizedCrop(data_cfg["input_size"][1:], interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(data_cfg["mean"], data_cfg["std"]),
    ])
