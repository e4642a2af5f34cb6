"""The baseline fine-tuning methods: full fine-tuning, linear probing and plain LoRA.

Each takes a freshly created model and decides what trains: it freezes the rest (`requires_grad=False`) so
that the engine shards, communicates and keeps optimizer state only for what trains.
"""

from __future__ import annotations

from torch import nn

from spt_dist.config import MethodConfig
from spt_dist.peft.lora import inject_lora, matrix_blocks


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    if cfg.name == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if cfg.name == "lora":
        targets: dict[str, dict[str, tuple[int, int]]] = {}
        for matrix, (path, kind, rows) in matrix_blocks(model).items():
            if kind in cfg.lora_targets:
                targets.setdefault(path, {})[kind] = rows
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
        for lora in inject_lora(model, targets, cfg.lora_rank, alpha / cfg.lora_rank, cfg.lora_dropout):
            lora.lora_A.requires_grad_(True)
            lora.lora_B.requires_grad_(True)
    model.get_classifier().requires_grad_(True)  # every method trains the new head
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
