"""Model factory: timm Vision Transformers by name, weights only from a local file, head sized to the data.

Nothing is downloaded: models are built with `pretrained=False` and, when `model.checkpoint` is set, loaded
from that file (safetensors, or a torch file read with `weights_only=True`). The tiny test ViTs are registered
with timm so that `timm.create_model("vit_test_tiny_patch8_32", checkpoint_path=...)` works like any other.
"""

from __future__ import annotations

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer, checkpoint_filter_fn

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


def supported_models() -> list[str]:
    """Every timm Vision Transformer (plain `VisionTransformer` family, `vit_*` names)."""
    return timm.list_models("vit_*")


def create_model(name: str, num_classes: int, *, checkpoint: str | None = None, img_size: int | None = None,
                 drop_path_rate: float = 0.0, device: str | torch.device = "cpu") -> VisionTransformer:
    """Builds a ViT with a `num_classes` head; backbone weights from `checkpoint` if given, else random init."""
    if not timm.is_model(name) or not name.startswith("vit_"):
        raise UserError(f"model.name: unknown model '{name}' (any timm vit_* name, e.g. vit_base_patch16_224)")
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise UserError(f"model.name: '{name}' is not a plain VisionTransformer ({type(model).__name__})")
    if checkpoint is not None:
        load_backbone(model, checkpoint)
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Reads a weights file without unpickling arbitrary objects."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model.checkpoint: no such file '{path}'") from None
    except Exception as e:  # corrupt file or pickled objects that weights_only refuses
        raise UserError(f"model.checkpoint: cannot read '{path}': {str(e).splitlines()[0]}") from None
    for wrapper in ("state_dict", "model", "module"):  # common training-checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.checkpoint: '{path}' holds no flat mapping of tensors")
    return state


def load_backbone(model: VisionTransformer, path: str) -> None:
    """Loads backbone weights; the head is kept from the checkpoint only if its shape matches. A file that does
    not fit (missing, unexpected or differently shaped tensors) is one line naming the first offending key."""
    where = f"model.checkpoint: '{path}' does not fit {type(model).__name__}"
    raw = read_state_dict(path)
    try:
        state = checkpoint_filter_fn(dict(raw), model)  # timm's conversions: pos_embed resize etc.
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError) as e:
        raise UserError(f"{where}: timm cannot convert it ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
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
    model.load_state_dict(state, strict=False)
