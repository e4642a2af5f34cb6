"""Image transforms from timm, resolved from the model's own input size and normalisation."""

from __future__ import annotations

from typing import Callable

from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms as T

from spt_dist.config import DataConfig
from spt_dist.errors import UserError


def model_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(height, width) the model takes. timm's `pretrained_cfg` keeps the size of the weights it was defined for
    (224 for vit_giant_patch14_224) even when the model is built at another `img_size`; the patch embedding
    holds the real one. None for a backbone without one (its pretrained_cfg is then all there is)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return (int(size[0]), int(size[1])) if size is not None else None


def _data_config(model: nn.Module, args: dict) -> dict:
    size = model_input_size(model)
    if size is not None:
        args = dict(args, input_size=(3, *size))
    return resolve_data_config(args, model=model)


def _check_output_size(transform: Callable, model: nn.Module, what: str) -> None:
    """Refuses, before any data is read, a deterministic transform whose images the model cannot take: otherwise
    the first step fails inside the model on every rank. (Random transforms are not run here: they would draw
    from the run's RNG streams; their random crops are made at the same resolved size.)"""
    size = model_input_size(model)
    if size is None:
        return
    out = tuple(transform(Image.new("RGB", (size[1] + 7, size[0] + 3))).shape[-2:])
    if out != size:
        raise UserError(f"the {what} transform gives {out[0]}x{out[1]} images but the model takes "
                        f"{size[0]}x{size[1]} (model.img_size)")


def build_transforms(model: nn.Module, cfg: DataConfig) -> tuple[Callable, Callable]:
    """(train, eval) transforms: PIL RGB image -> normalised float tensor [3, H, W], at the model's input size."""
    data_cfg = _data_config(model, {"crop_pct": cfg.crop_pct})
    eval_transform = create_transform(**data_cfg, is_training=False)
    # data.augment: random resized crop and flip, as the FGVC recipe says (timm's default would add colour jitter).
    train_transform = create_transform(**data_cfg, is_training=True, color_jitter=None) if cfg.augment \
        else eval_transform
    _check_output_size(eval_transform, model, "evaluation")
    return train_transform, eval_transform


def build_contrastive_transform(model: nn.Module) -> Callable:
    """GPS's views for the contrastive score (SPEC 3): random resized crop, flip, colour jitter (p 0.8),
    greyscale (p 0.2), at the model's input size and normalisation."""
    data_cfg = _data_config(model, {})
    return T.Compose([
        T.RandomResizedCrop(data_cfg["input_size"][1:], interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(data_cfg["mean"], data_cfg["std"]),
    ])
