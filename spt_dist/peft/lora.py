"""Where LoRA and the allocation's modules go in a backbone: its weight matrices, with fused projections split
(the family's BackboneSpec says which Linears are matrices and their row blocks)."""

from __future__ import annotations

from torch import nn

from spt_dist.backbones import spec_for


def matrix_blocks(model: nn.Module) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """Maps every weight matrix to (Linear's module path, matrix type, row range).

    Matrix types are those of the family: for ViT q, k, v (row blocks of a fused qkv or kv Linear), proj, fc1
    and fc2; e.g. 'blocks.3.attn.q' -> ('blocks.3.attn.qkv', 'q', (0, 768)).
    """
    return spec_for(model).matrix_blocks(model)
