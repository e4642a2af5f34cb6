"""timm's VisionTransformer under every name: ViT (`vit_*`, incl. DINOv2 with layer scale and registers, CLIP
and MAE/MoCo-style ViTs) and DeiT (`deit_*`, `deit3_*`). The distilled DeiTs (two heads) are not supported.

Matrices: q, k, v (row blocks of the fused `attn.qkv`), `attn.proj`, `mlp.fc1`, `mlp.fc2` (SPEC 2). SPT scores
every block parameter and the final norms; not the head, the tokens, pos_embed or patch_embed.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.deit import VisionTransformerDistilled

from spt_dist.backbones.base import BackboneSpec, register_backbone

TOKENS = ("pos_embed", "cls_token", "reg_token", "dist_token")

VIT = register_backbone(BackboneSpec(
    family="vit",
    names=("vit_*", "deit_*", "deit3_*"),
    model_class=VisionTransformer,
    block=r"blocks\.\d+",
    matrix_scope=r"blocks\..*",
    matrices={"qkv": ("q", "k", "v"), "kv": ("k", "v"), "proj": ("proj",), "fc1": ("fc1",), "fc2": ("fc2",)},
    spt_excluded=(r"head\.", "cls_token", "reg_token", "pos_embed", r"patch_embed\."),
    gps_frozen=tuple(rf"{t}(\.|$)" for t in TOKENS),
    checkpoint_filter=checkpoint_filter_fn,
    refused={VisionTransformerDistilled: "a distilled DeiT has two heads; use the plain deit_* / deit3_* names"},
))
