"""Model factory: timm backbones by name (the families of spt_dist/backbones: ViT/DeiT/DINOv2/CLIP ViTs, Swin,
EVA-02), weights only from a local file, head sized to the data.

Nothing is downloaded: models are built with `pretrained=False` and, when `model.checkpoint` is set, loaded
from that file without unpickling code (safetensors, a torch file read with `weights_only=True`, or an original
JAX `.npz`), mapped to timm's keys: timm/HF safetensors, a torch state dict (bare, or under `state_dict`,
`model` or `module`), MAE `.pth` (`model`, decoder dropped), MoCo v3 `.pth.tar` (`state_dict`, the
`module.base_encoder.` prefix; momentum encoder and predictor dropped), the JAX `.npz` of the original ViTs
(e.g. the IN-21k ViT-B/16 SPT uses; timm's own reader). The tiny test models are registered with timm so that
`timm.create_model("vit_test_tiny_patch8_32", checkpoint_path=...)` works like any other.
"""

from __future__ import annotations

import argparse

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.eva import Eva, _create_eva
from timm.models.swin_transformer import SwinTransformer, _create_swin_transformer
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import nn

from spt_dist.backbones import backbones, spec_for, spec_for_name
from spt_dist.errors import UserError

# timm's registry reads `default_cfgs` from the module that defines a registered model.
_TEST_CFG = {
    "url": "", "num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0,
    "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj",
    "classifier": "head",
}
default_cfgs = generate_default_cfgs({
    "vit_test_tiny_patch8_32.untrained": _TEST_CFG,
    "vit_test_small_patch8_32.untrained": _TEST_CFG,
    "vit_test_dinov2_tiny_patch8_32.untrained": _TEST_CFG,
    "swin_test_tiny_patch4_window4_32.untrained": dict(_TEST_CFG, classifier="head.fc"),
    "eva02_test_tiny_patch8_32.untrained": _TEST_CFG,
})


@register_model
def vit_test_tiny_patch8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 2-block, 64-wide ViT on 32 px images: the model of the tests and the built-in demo."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
    return _create_vision_transformer("vit_test_tiny_patch8_32", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_test_small_patch8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 3-block, 96-wide ViT on 32 px images: the tiny ViT's bigger sibling, for backbone-size sweeps on CPU."""
    args = dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_test_small_patch8_32", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_test_dinov2_tiny_patch8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The tiny ViT built like DINOv2: layer scale, 4 register tokens, no position embedding on the tokens."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, init_values=1e-5,
                reg_tokens=4, no_embed_class=True)
    return _create_vision_transformer("vit_test_dinov2_tiny_patch8_32", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def swin_test_tiny_patch4_window4_32(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """A 2-stage Swin on 32 px images (8x8 then 4x4 tokens, 4x4 windows, shifted in the first stage; 32 then 64
    wide, one patch merging): every part of a Swin-B, tiny."""
    args = dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                mlp_ratio=2.0)
    return _create_swin_transformer("swin_test_tiny_patch4_window4_32", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def eva02_test_tiny_patch8_32(pretrained: bool = False, **kwargs) -> Eva:
    """A 2-block, 64-wide EVA-02 on 32 px images, built like EVA-02 B/L: separate q/k/v, SwiGLU MLP with its
    norm, rotary position embeddings."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_fused=False,
                mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    return _create_eva("eva02_test_tiny_patch8_32", pretrained=pretrained, **dict(args, **kwargs))


def supported_models() -> list[str]:
    """Every timm model name of a supported family (vit_*, deit_*, deit3_*, swin_*, eva02_*)."""
    return timm.list_models([p for spec in backbones().values() for p in spec.names])


def create_model(name: str, num_classes: int, *, checkpoint: str | None = None, img_size: int | None = None,
                 drop_path_rate: float = 0.0, device: str | torch.device = "cpu") -> nn.Module:
    """Builds a backbone with a `num_classes` head; weights from `checkpoint` if given, else random init."""
    spec = spec_for_name(name)
    if not timm.is_model(name) or spec is None:
        names = ", ".join(p for s in backbones().values() for p in s.names)
        raise UserError(f"model.name: unknown model '{name}' (any timm {names} name, e.g. vit_base_patch16_224)")
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, **kwargs)
    why = spec.refusal(model)
    if why is not None:
        raise UserError(f"model.name: '{name}' is not supported ({type(model).__name__}: {why})")
    spec.prepare_model(model)
    if checkpoint is not None:
        load_backbone(model, checkpoint)
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Reads a weights file without unpickling arbitrary objects."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        # Training checkpoints (MAE's) also hold their argparse Namespace: plain data, allowed; no code is run.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model.checkpoint: no such file '{path}'") from None
    except Exception as e:  # corrupt file or pickled objects that weights_only refuses
        text = str(e)
        if "Weights only load failed" not in text:
            raise UserError(f"model.checkpoint: cannot read '{path}': {_first_line(e)}") from None
        # torch's own advice (weights_only=False) would run whatever code the file holds: say what is read.
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n", 1)[0] \
            .split(" was not an allowed global", 1)[0] if "WeightsUnpickler error:" in text else ""
        raise UserError(f"model.checkpoint: cannot read '{path}': not a file of plain tensors"
                        + (f" ({detail})" if detail else "") + "; accepted: .safetensors, a torch file (.pth, .pt, "
                        ".bin) of tensors only (a state dict, bare or under 'state_dict', 'model' or 'module', with "
                        "plain metadata), or a JAX .npz; pickled Python objects are never loaded") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.checkpoint: '{path}' holds no flat mapping of tensors")
    odd = [k for k in state if not isinstance(k, str)]
    if odd:
        raise UserError(f"model.checkpoint: '{path}' has a key that is not a string ({odd[0]!r}): "
                        "not a state dict of named tensors")
    return to_timm_keys(state)


_MOCO_PREFIX = "module.base_encoder."


def to_timm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layouts of self-supervised training checkpoints, in timm's keys: MoCo v3 (`module.base_encoder.`;
    its momentum encoder and predictor dropped), DDP's `module.` prefix, MAE's decoder and mask token (dropped:
    the encoder is the backbone)."""
    if any(k.startswith(_MOCO_PREFIX) for k in state):
        state = {k[len(_MOCO_PREFIX):]: v for k, v in state.items() if k.startswith(_MOCO_PREFIX)}
    elif state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("decoder_") for k in state):  # MAE pre-training: encoder + decoder
        state = {k: v for k, v in state.items() if not k.startswith("decoder_") and k != "mask_token"}
    return state


def jax_shapes(model: VisionTransformer) -> dict[str, list[int]]:
    """The arrays of the original JAX ViT layout that `model` needs, and their shapes (the names timm's reader
    looks up first; for naming the expected shape when a file does not fit)."""
    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    heads = model.blocks[0].attn.num_heads
    out = {"embedding/kernel": [*model.patch_embed.proj.weight.shape[2:], model.patch_embed.proj.weight.shape[1], dim],
           "embedding/bias": [dim], "Transformer/encoder_norm/scale": [dim], "Transformer/encoder_norm/bias": [dim]}
    if model.cls_token is not None:
        out["cls"] = list(model.cls_token.shape)
    if model.pos_embed is not None:
        out["Transformer/posembed_input/pos_embedding"] = list(model.pos_embed.shape)
    for i in range(len(model.blocks)):
        p = f"Transformer/encoderblock_{i}/"
        for n in ("query", "key", "value"):
            out[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = [dim, heads, dim // heads]
            out[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = [heads, dim // heads]
        out[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = [heads, dim // heads, dim]
        out[f"{p}MultiHeadDotProductAttention_1/out/bias"] = [dim]
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            out[f"{p}{ln}/scale"] = out[f"{p}{ln}/bias"] = [dim]
        out[f"{p}MlpBlock_3/Dense_0/kernel"], out[f"{p}MlpBlock_3/Dense_0/bias"] = [dim, hidden], [hidden]
        out[f"{p}MlpBlock_3/Dense_1/kernel"], out[f"{p}MlpBlock_3/Dense_1/bias"] = [hidden, dim], [dim]
    return out


def _load_jax(model: nn.Module, path: str, where: str) -> None:
    """An original JAX/Flax ViT .npz (e.g. ViT-B_16.npz, IN-21k, as the SPT reference uses), by timm's own reader
    (pos_embed resampled to the model's grid; the head only where its class count matches, else kept; a
    pre-logits layer the model lacks is ignored)."""
    from timm.models import vision_transformer as vt  # noqa: PLC0415

    if not isinstance(model, VisionTransformer):
        raise UserError(f"{where}: a JAX .npz checkpoint holds a ViT (VisionTransformer), this is a "
                        f"{type(model).__name__}")
    prefix = _check_jax_arrays(model, path, where)
    try:
        vt._load_weights(model, path)
    except KeyError as e:
        key = str(e.args[0]).split(" is not a file")[0].strip("'") if e.args else "?"
        shape = jax_shapes(model).get(key.removeprefix(prefix))
        raise UserError(f"{where}: missing '{key}' ("
                        + (f"expected shape {shape}, " if shape else "") + "an array of the JAX ViT layout)") from None
    except Exception as e:  # what the up-front check did not foresee: still one line
        raise UserError(f"{where}: timm cannot load it ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


_JAX_PREFIXES = ("opt/target/", "params/img/", "params/")  # timm's reader's order of looking


def _jax_fits(key: str, shape: list[int], expected: list[int]) -> bool:
    """Whether timm's reader takes an array of `shape` where the standard layout has `expected`: the position
    embedding of another grid (resampled), a patch kernel of another patch size (resampled), and the 2-D
    (flattened heads) forms of the attention kernels and biases."""
    if shape == expected:
        return True
    if key.endswith("posembed_input/pos_embedding"):
        return len(shape) == 3 and shape[0] == 1 and shape[-1] == expected[-1]
    if key == "embedding/kernel":
        return len(shape) == 4 and shape[2:] == expected[2:]
    if "/MultiHeadDotProductAttention_1/" in key:
        if key.endswith("out/kernel"):
            return shape == [expected[0] * expected[1], expected[2]]
        if key.endswith("/kernel"):
            return shape == [expected[0], expected[1] * expected[2]]
        if key.endswith("/bias") and len(expected) == 2:
            return shape == [expected[0] * expected[1]]
    return False


def _check_jax_arrays(model: VisionTransformer, path: str, where: str) -> str:
    """Reads only the array headers of the .npz (no data) and checks each array of the standard layout against
    the model: the first that does not fit is one line naming it, its shape and the expected shape. Returns the
    file's key prefix ('opt/target/' etc., or '')."""
    import zipfile  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    headers: dict[str, tuple[list[int], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                headers[member[:-len(".npy")]] = (list(shape), dtype)
    except FileNotFoundError:
        raise UserError(f"model.checkpoint: no such file '{path}'") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        raise UserError(f"model.checkpoint: cannot read '{path}' as a JAX .npz (a zip of .npy arrays): "
                        f"{_first_line(e)}") from None
    prefix = next((p for p in _JAX_PREFIXES if f"{p}embedding/kernel" in headers), "")
    for key, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise UserError(f"{where}: '{key}' is an array of Python objects, not numbers")
    for key, expected in jax_shapes(model).items():
        found = headers.get(prefix + key)
        if found is not None and not _jax_fits(key, found[0], expected):
            raise UserError(f"{where}: '{prefix + key}' has shape {found[0]} (JAX layout), expected {expected}")
    return prefix


def load_backbone(model: nn.Module, path: str) -> None:
    """Loads backbone weights; the head is kept from the checkpoint only if its shape matches. A file that does
    not fit (missing, unexpected or differently shaped tensors) is one line naming the first offending key."""
    where = f"model.checkpoint: '{path}' does not fit {type(model).__name__}"
    if path.endswith(".npz"):
        return _load_jax(model, path, where)
    raw = read_state_dict(path)
    convert = spec_for(model).checkpoint_filter
    try:
        state = convert(dict(raw), model) if convert else dict(raw)  # timm's conversions: pos_embed resize etc.
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError, AttributeError) as e:
        modules = dict(model.named_modules())
        stray = [k for k in raw if k.rpartition(".")[0] not in modules]
        if stray:  # e.g. timm's Swin converter looks up the module of every relative_position_bias_table
            raise UserError(f"{where}: unexpected '{stray[0]}' (shape {list(raw[stray[0]].shape)}; "
                            f"{type(model).__name__} has no module '{stray[0].rpartition('.')[0]}')") from None
        own = model.state_dict()
        wrong = [k for k in raw if k in own and raw[k].shape != own[k].shape]
        if wrong:
            raise UserError(f"{where}: '{wrong[0]}' has shape {list(raw[wrong[0]].shape)}, expected "
                            f"{list(own[wrong[0]].shape)} (timm cannot convert it: {type(e).__name__})") from None
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{where}: timm cannot convert it ({type(e).__name__}"
                        + (f": {detail})" if detail else ")")) from None
    own = model.state_dict()
    for key in [k for k in state if k.startswith("head.")]:
        if key not in own or state[key].shape != own[key].shape:
            del state[key]  # a head for another label set: keep the freshly initialised one
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing:
        raise UserError(f"{where}: missing '{missing[0]}' (expected shape {list(own[missing[0]].shape)})"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise UserError(f"{where}: unexpected '{unexpected[0]}' (shape {list(state[unexpected[0]].shape)})"
                        + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    if wrong:
        found = raw[wrong[0]] if wrong[0] in raw else state[wrong[0]]  # the file's shape, not timm's conversion
        raise UserError(f"{where}: '{wrong[0]}' has shape {list(found.shape)}, expected "
                        f"{list(own[wrong[0]].shape)}" + (f" ({len(wrong) - 1} more differ)" if len(wrong) > 1 else ""))
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise UserError(f"{where}: '{meta[0]}' is a meta tensor (a shape without data), not weights")
    odd = [k for k, v in state.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if odd:  # copy_ would cast ints silently and drop a complex tensor's imaginary part
        raise UserError(f"{where}: '{odd[0]}' holds {str(state[odd[0]].dtype).removeprefix('torch.')}, expected "
                        f"floating-point weights")
    try:
        model.load_state_dict(state, strict=False)
    except Exception as e:  # e.g. a dtype torch cannot copy into the parameter
        raise UserError(f"{where}: cannot load it ({type(e).__name__}: "
                        f"{' '.join(_first_line(e).split())[:200]})") from None
