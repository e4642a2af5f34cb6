"""Parallel LoRA on row blocks of a Linear, so timm's fused qkv can carry separate q, k and v modules.

y = W x + b + scale · B_i A_i dropout(x) on the output rows of block i. A is kaiming-uniform, B zero, so the
model starts exactly at the base model; `merged_weight()` folds the low-rank products back into W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, blocks: dict[str, tuple[int, int]], rank: int, scale: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.blocks = dict(blocks)
        self.rank = rank
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, end) in self.blocks.items():
            a = torch.empty(rank, base.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and the LoRA reference
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(end - start, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x)
        for name, (start, end) in self.blocks.items():
            # In place on the base output is safe: the base Linear's backward needs its input, not its output.
            y[..., start:end] += self.scale * F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name])
        return y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        weight = self.base.weight.detach().clone()
        for name, (start, end) in self.blocks.items():
            weight[start:end] += self.scale * (self.lora_B[name] @ self.lora_A[name])
        return weight


def matrix_blocks(model: nn.Module) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """Maps every ViT weight matrix to (Linear's module path, matrix type, row range).

    Matrix types are q, k, v (row thirds of the fused qkv Linear), proj, fc1 and fc2; e.g.
    'blocks.3.attn.q' -> ('blocks.3.attn.qkv', 'q', (0, 768)).
    """
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not path.startswith("blocks."):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "qkv":
            d = module.out_features // 3
            for i, kind in enumerate("qkv"):
                out[f"{path[:-3]}{kind}"] = (path, kind, (i * d, (i + 1) * d))
        elif leaf in ("proj", "fc1", "fc2"):
            out[path] = (path, leaf, (0, module.out_features))
    return out


def inject_lora(model: nn.Module, targets: dict[str, dict[str, tuple[int, int]]], rank: int, scale: float,
                dropout: float) -> list[LoRALinear]:
    """Replaces each Linear named in `targets` ({module path: {block: rows}}) by a LoRALinear around it."""
    added = []
    for path, blocks in targets.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        lora = LoRALinear(getattr(parent, leaf), blocks, rank=rank, scale=scale, dropout=dropout)
        setattr(parent, leaf, lora)
        added.append(lora)
    return added
