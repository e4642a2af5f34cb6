"""The baseline fine-tuning methods: full fine-tuning, linear probing and plain LoRA.

Each takes a freshly created model and decides what trains: it freezes the rest (`requires_grad=False`) so
that the engine shards, communicates and keeps optimizer state only for what trains.
"""

from __future__ import annotations

from torch import nn

from spt_dist.backbones import spec_for
from spt_dist.config import MethodConfig
from spt_dist.errors import UserError
from spt_dist.methods import get_method
from spt_dist.peft.lora import matrix_blocks
from spt_dist.peft.tuned import tune


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """A baseline method (one without a selection) applied by its registered function."""
    return get_method(cfg.name).apply_fn()(model, cfg)


def train_everything(model: nn.Module, cfg: MethodConfig) -> nn.Module:  # noqa: ARG001 - the method signature
    return model.requires_grad_(True)


def train_head(model: nn.Module, cfg: MethodConfig) -> nn.Module:  # noqa: ARG001
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)  # every method trains the new head
    return model


def add_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """LoRA (rank, alpha/rank scaling, dropout, drop-path of `cfg`) on the `lora_targets` matrices, and the head."""
    train_head(model, cfg)
    spec_for(model).prepare_model(model)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    matrices = matrix_blocks(model).values()
    kinds = list(dict.fromkeys(kind for _, kind, _ in matrices))
    for target in cfg.lora_targets:
        if target not in kinds:
            raise UserError(f"method.lora_targets: {type(model).__name__} has no '{target}' matrices (its "
                            f"matrices: {', '.join(kinds)})")
    for path, kind, rows in matrices:
        if kind in cfg.lora_targets:
            layer = tune(model, path)  # LoRA parameters are created trainable
            layer.add_lora(kind, rows, cfg.lora_rank, alpha / cfg.lora_rank)
            layer.set_dropout(cfg.lora_dropout, cfg.module_drop_path)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes added modules such as LoRA."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """The line PEFT's `print_trainable_parameters` prints."""
    trainable, total = trainable_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
