"""Where LoRA and the allocation's modules go in a timm ViT: its weight matrices, with the fused qkv split."""

from __future__ import annotations

from torch import nn


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
