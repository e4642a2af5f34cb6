"""EVA-02 (`eva02_*`, timm's Eva): blocks `blocks.N` with separate q/k/v projections (`attn.q_proj`, `k_proj`,
`v_proj`; B and L) or a fused `attn.qkv` with separate `q_bias`/`v_bias` parameters (tiny, small), a SwiGLU
MLP (`mlp.fc1_g`, `mlp.fc1_x`, its own `mlp.norm`, `mlp.fc2`; or GluMlp's fused `mlp.fc1`, row blocks x and
gate) and rotary position embeddings (buffers, nothing to train).

Matrices: q, k, v (separate Linears or row blocks of qkv), `attn.proj`, `fc1_g`, `fc1_x` (row blocks of a fused
fc1 too), `fc2`. SPT scores every block parameter and the final norms except `attn.q_bias`/`attn.v_bias` of
the fused variants and the block layer scales `gamma_1`/`gamma_2` (bare parameters of the attention or block
module, not of a Linear or LayerNorm: sparse entries cannot be placed on them); not the head, the tokens,
pos_embed or patch_embed.
"""

from __future__ import annotations

from timm.layers import GluMlp
from timm.models.eva import Eva, EvaAttention, checkpoint_filter_fn
from torch import nn

from spt_dist.backbones.base import BackboneSpec, register_backbone
from spt_dist.backbones.vit import TOKENS


def _glu_fc1(path: str, module: nn.Module, parent: nn.Module) -> tuple[str, ...] | None:
    """GluMlp's fc1 computes the value and the gate at once (chunked in two): two matrices."""
    if isinstance(parent, GluMlp) and path.endswith(".fc1"):
        return ("fc1_x", "fc1_g") if parent.gate_last else ("fc1_g", "fc1_x")
    return None


def _prepare(model: nn.Module) -> None:
    """A fused qkv with q/v bias parameters is applied as F.linear(x, qkv.weight, bias) unless told to call the
    qkv Linear and add the bias after: that way what is placed on the Linear (deltas, LoRA) takes part."""
    for module in model.modules():
        if isinstance(module, EvaAttention) and module.qkv is not None and module.q_bias is not None:
            module.qkv_bias_separate = True


EVA = register_backbone(BackboneSpec(
    family="eva",
    names=("eva02_*",),
    model_class=Eva,
    block=r"blocks\.\d+",
    matrix_scope=r"blocks\..*",
    matrices={"qkv": ("q", "k", "v"), "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "proj": ("proj",),
              "fc1": ("fc1",), "fc1_g": ("fc1_g",), "fc1_x": ("fc1_x",), "fc2": ("fc2",)},
    spt_excluded=(r"head\.", "cls_token", "reg_token", "pos_embed", r"patch_embed\.",
                  r"blocks\.\d+\.attn\.[qv]_bias$", r"blocks\.\d+\.gamma_[12]$"),
    gps_frozen=tuple(rf"{t}(\.|$)" for t in TOKENS),
    checkpoint_filter=checkpoint_filter_fn,
    matrix_override=_glu_fc1,
    prepare=_prepare,
))
