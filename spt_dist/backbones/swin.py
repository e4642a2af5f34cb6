"""Swin Transformer (`swin_*`, timm's SwinTransformer): stages `layers.N` of blocks `layers.N.blocks.M` with
window attention, and a patch merging (`layers.N.downsample`: a LayerNorm and the Linear `reduction`) before
every stage but the first.

Matrices: q, k, v (row blocks of the fused `attn.qkv`), `attn.proj`, `mlp.fc1`, `mlp.fc2`, and the patch
merging's `reduction` (a Linear like the others: scored, LoRA-able). SPT scores every block parameter, the patch
mergings and the final norm; not the head, patch_embed (as for ViT), nor the relative position bias tables:
they are position embeddings (ViT's pos_embed is not scored either), and not a Linear's, LayerNorm's or conv's
parameter, so neither a module nor sparse entries could be placed on them. GPS keeps its reference rule by
name: a table's name contains "bias", so GPS trains it in full, as the GPS reference does on Swin.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from spt_dist.backbones.base import BackboneSpec, register_backbone

SWIN = register_backbone(BackboneSpec(
    family="swin",
    names=("swin_*",),
    model_class=SwinTransformer,
    block=r"layers\.\d+\.blocks\.\d+",
    matrix_scope=r"layers\.\d+\.(blocks\.\d+\..*|downsample)",
    matrices={"qkv": ("q", "k", "v"), "proj": ("proj",), "fc1": ("fc1",), "fc2": ("fc2",),
              "reduction": ("reduction",)},
    spt_excluded=(r"head\.", r"patch_embed\.", "absolute_pos_embed", r".*\.relative_position_bias_table$"),
    gps_frozen=(r"absolute_pos_embed(\.|$)",),
    checkpoint_filter=checkpoint_filter_fn,
))
