"""Where LoRA and the allocation's modules go in a timm ViT: its weight matrices, with fused projections split."""

from __future__ import annotations

from torch import nn


# Fused projections: one Linear computing several matrices' outputs, stacked by rows. The reference models
# build each as its own Linear, so each row block is a matrix (and its slice of the bias a vector) of its own.
FUSED = {"qkv": "qkv", "kv": "kv"}


def matrix_blocks(model: nn.Module) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """Maps every ViT weight matrix to (Linear's module path, matrix type, row range).

    Matrix types are q, k, v (row blocks of a fused qkv or kv Linear), proj, fc1 and fc2; e.g.
    'blocks.3.attn.q' -> ('blocks.3.attn.qkv', 'q', (0, 768)).
    """
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not path.startswith("blocks."):
            continue
        parent, _, leaf = path.rpartition(".")
        if leaf in FUSED:
            kinds = FUSED[leaf]
            d = module.out_features // len(kinds)
            for i, kind in enumerate(kinds):
                out[f"{parent}.{kind}"] = (path, kind, (i * d, (i + 1) * d))
        elif leaf in ("proj", "fc1", "fc2"):
            out[path] = (path, leaf, (0, module.out_features))
    return out
