"""The PEFT artifact, PEFT-style: `save_pretrained` writes a small directory, `load_pretrained` applies it to a
freshly created timm model, `merged_state_dict` folds it into a plain timm checkpoint.

    <dir>/peft_model.safetensors   what trains: delta values and their int64 indices, LoRA / Adapter weights,
                                   fully tuned vectors, head (and cls_token for SPT)
    <dir>/peft_config.json         the model (name, classes, image size, base checkpoint, seed), the base
                                   weights' fingerprint and the structure

The frozen backbone is not in it: it is the base checkpoint (`model.checkpoint`), or for a randomly
initialised model the same seed. Merge on the command line:

    python -m spt_dist.peft.artifact merge runs/NAME/peft --out merged.safetensors   # or: spt-merge DIR --out FILE
    # then: timm.create_model(name, num_classes=N, checkpoint_path="merged.safetensors")

The artifact is tied to its base: `base_fingerprint` in peft_config.json is "sha256:<hex>", sha256 over the
frozen base tensors, i.e. every entry of the model's state dict that the artifact does not store (frozen
parameters and persistent buffers; not the head, fully tuned vectors, deltas, LoRA or Adapters, which replace
or add to the base), in sorted name order, each as a JSON line `["name", "torch.float32", [shape]]` and its raw
bytes (spt_dist.peft.fingerprint). It is computed once when the PEFT model is built (`apply_allocation`, so in
a training run before any engine shards the model; `PeftModel.save_pretrained` otherwise), and checked when the
artifact is loaded onto a base (`load_pretrained`, `PeftModel.from_pretrained`, the merge command): other base
weights, even of the same shapes, are refused unless `--allow-other-base` / `allow_other_base=True` is given.
Artifacts written without a fingerprint (older spt_dist) load onto any base of the right shapes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch
from torch import nn

from spt_dist.atomic import read_safetensors, write_json, write_safetensors
from spt_dist.cli import command
from spt_dist.data.shards import read_json
from spt_dist.errors import UserError
from spt_dist.peft import fingerprint
from spt_dist.peft.allocated import apply_description, describe, trainable_state
from spt_dist.peft.tuned import Tuned

CONFIG_FILE = "peft_config.json"
WEIGHTS_FILE = "peft_model.safetensors"


def save_pretrained(directory: str, model: nn.Module, state: dict[str, torch.Tensor], base: dict) -> None:
    """`state`: the consolidated parameters and buffers of `model` (what trains at least); `base`: model,
    num_classes, img_size, checkpoint, seed, method. The base fingerprint is the one recorded when the PEFT model
    was built, else computed from `state` if it is whole. The config is written last: its presence means the
    directory is complete."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"artifact: cannot create directory '{directory}' ({e.strerror})") from None
    tensors = {k: v.contiguous() for k, v in trainable_state(state, model).items()}
    base_fingerprint = fingerprint.recorded(model)
    if base_fingerprint is None and set(model.state_dict()) <= set(state):
        base_fingerprint = fingerprint.base_fingerprint(state, tensors)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors, {"format": "spt_dist-peft-1"})
    write_json(os.path.join(directory, CONFIG_FILE),
               dict(base, base_fingerprint=base_fingerprint, structure=describe(model), format=1))


def read_pretrained(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise UserError(f"'{directory}' is not a PEFT artifact (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return read_json(config_path), read_safetensors(weights_path, "artifact")


def load_pretrained(directory: str, model: nn.Module | None = None, *, allow_other_base: bool = False) -> nn.Module:
    """The PEFT model: `model` (a fresh timm model with the base weights), or one created from the config. Base
    weights other than the artifact's (its fingerprint) are refused unless `allow_other_base`; nothing of
    `model` is changed before that check."""
    config, tensors = read_pretrained(directory)
    if model is None:
        if config.get("seed") is None or not config.get("model"):
            raise UserError(f"'{directory}' was saved by PeftModel.save_pretrained, without its base: load it onto "
                            "the base model with PeftModel.from_pretrained(base_model, directory)")
        from spt_dist.models import create_model
        torch.manual_seed(config["seed"])  # the same base weights as the run when there is no checkpoint
        model = create_model(config["model"], config["num_classes"], checkpoint=config.get("checkpoint"),
                             img_size=config.get("img_size"))
    _check_shapes(directory, tensors, model.state_dict())
    found = _check_base(directory, config, model.state_dict(), tensors, allow_other_base)
    try:
        apply_description(model, config["structure"], tensors)
    except (KeyError, AttributeError, TypeError, RuntimeError) as e:
        raise UserError(f"'{directory}': its structure does not fit this model ({type(e).__name__}: {e})") from None
    _check_shapes(directory, tensors, model.state_dict())
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise UserError(f"'{directory}': tensors the model does not have: {', '.join(result.unexpected_keys[:3])}")
    fingerprint.record(model, found)  # a later save_pretrained names the base it really is on
    return model


def _check_shapes(directory: str, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    wrong = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"'{directory}': '{wrong[0]}' is {list(tensors[wrong[0]].shape)} there, "
                        f"{list(own[wrong[0]].shape)} in this model: the artifact was trained on another base")


def _check_base(directory: str, config: dict, own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                allow_other_base: bool) -> str | None:
    """The fingerprint of the base weights in `own` (what the artifact does not replace); another one than the
    artifact's is one line naming both, unless allowed. An artifact without one (older) fits any base."""
    found = fingerprint.base_fingerprint(own, tensors)
    expected = config.get("base_fingerprint")
    if isinstance(expected, str) and found is not None and found != expected and not allow_other_base:
        raise UserError(f"'{directory}' was trained on base weights {fingerprint.short(expected)}, these are "
                        f"{fingerprint.short(found)}: merged onto another base it is a model nobody trained (to use "
                        "it anyway: --allow-other-base, or allow_other_base=True)")
    return found


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain timm state dict: every tuned layer's deltas and LoRA products folded into its weights."""
    tuned = {path: m for path, m in model.named_modules() if isinstance(m, Tuned)}
    out = {}
    for name, value in model.state_dict().items():
        path, _, leaf = name.rpartition(".")
        if path in tuned:
            if leaf not in tuned[path].param_names:
                continue  # deltas, indices, masks, LoRA: folded in below
            try:
                value = tuned[path].merged()[leaf]
            except ValueError as e:
                raise UserError(f"merge: '{path}': {e}; load the artifact with load_pretrained instead") from None
        out[name] = value.detach().float().clone()
    return out


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spt_dist.peft.artifact", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", required=True)
    merge = sub.add_parser("merge", help="write a plain timm checkpoint with the artifact folded in")
    merge.add_argument("artifact")
    merge.add_argument("--out", required=True, help="the merged file; missing directories are created")
    merge.add_argument("--allow-other-base", action="store_true",
                       help="merge even if the base weights are not the ones the artifact was trained on")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out):
        raise UserError(f"--out: '{args.out}' is a directory; give a file, e.g. "
                        f"{shlex.quote(os.path.join(args.out, 'merged.safetensors'))}")
    state = merged_state_dict(load_pretrained(args.artifact, allow_other_base=args.allow_other_base))
    config = read_json(os.path.join(args.artifact, CONFIG_FILE))  # small; the weights were read once
    parent = os.path.dirname(args.out)
    try:
        os.makedirs(parent or ".", exist_ok=True)  # as spt-report and spt-shards do with their --out
    except OSError as e:
        raise UserError(f"--out: cannot create directory '{parent}' ({e.strerror})") from None
    write_safetensors(args.out, {k: v.contiguous() for k, v in state.items()},
                      {"model": config["model"], "num_classes": str(config["num_classes"])})
    print(f"merged {config['model']} ({config['num_classes']} classes) -> {args.out}")
    return 0


def merge(argv: list[str] | None = None) -> int:
    """`spt-merge DIR --out FILE [--allow-other-base]`: the same as `python -m spt_dist.peft.artifact merge ...`."""
    return main(["merge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
