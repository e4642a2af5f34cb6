"""The PEFT artifact, PEFT-style: `save_pretrained` writes a small directory, `load_pretrained` applies it to a
freshly created timm model, `merged_state_dict` folds it into a plain timm checkpoint.

    <dir>/peft_model.safetensors   what trains: delta values and their int64 indices, LoRA / Adapter weights,
                                   fully tuned vectors, head (and cls_token for SPT)
    <dir>/peft_config.json         the model (name, classes, image size, base checkpoint, seed) and the structure

The frozen backbone is not in it: it is the base checkpoint (`model.checkpoint`), or for a randomly
initialised model the same seed. Merge on the command line:

    python -m spt_dist.peft.artifact merge runs/NAME/peft --out merged.safetensors
    # then: timm.create_model(name, num_classes=N, checkpoint_path="merged.safetensors")
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from spt_dist.atomic import read_safetensors, write_json, write_safetensors
from spt_dist.cli import command
from spt_dist.data.shards import read_json
from spt_dist.errors import UserError
from spt_dist.peft.allocated import apply_description, describe, trainable_state
from spt_dist.peft.tuned import Tuned

CONFIG_FILE = "peft_config.json"
WEIGHTS_FILE = "peft_model.safetensors"


def save_pretrained(directory: str, model: nn.Module, state: dict[str, torch.Tensor], base: dict) -> None:
    """`state`: the consolidated parameters and buffers of `model`; `base`: model, num_classes, img_size,
    checkpoint, seed, method. The config is written last: its presence means the directory is complete."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in trainable_state(state, model).items()}
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors, {"format": "spt_dist-peft-1"})
    write_json(os.path.join(directory, CONFIG_FILE), dict(base, structure=describe(model), format=1))


def read_pretrained(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise UserError(f"'{directory}' is not a PEFT artifact (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return read_json(config_path), read_safetensors(weights_path, "artifact")


def load_pretrained(directory: str, model: nn.Module | None = None) -> nn.Module:
    """The PEFT model: `model` (a fresh timm model with the base weights), or one created from the config."""
    config, tensors = read_pretrained(directory)
    if model is None:
        if config.get("seed") is None or not config.get("model"):
            raise UserError(f"'{directory}' was saved by PeftModel.save_pretrained, without its base: load it onto "
                            "the base model with PeftModel.from_pretrained(base_model, directory)")
        from spt_dist.models import create_model
        torch.manual_seed(config["seed"])  # the same base weights as the run when there is no checkpoint
        model = create_model(config["model"], config["num_classes"], checkpoint=config.get("checkpoint"),
                             img_size=config.get("img_size"))
    try:
        apply_description(model, config["structure"], tensors)
    except (KeyError, AttributeError, TypeError, RuntimeError) as e:
        raise UserError(f"'{directory}': its structure does not fit this model ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    wrong = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"'{directory}': '{wrong[0]}' is {list(tensors[wrong[0]].shape)} there, "
                        f"{list(own[wrong[0]].shape)} in this model: the artifact was trained on another base")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise UserError(f"'{directory}': tensors the model does not have: {', '.join(result.unexpected_keys[:3])}")
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain timm state dict: every tuned layer's deltas and LoRA products folded into its weights."""
    tuned = {path: m for path, m in model.named_modules() if isinstance(m, Tuned)}
    out = {}
    for name, value in model.state_dict().items():
        path, _, leaf = name.rpartition(".")
        if path in tuned:
            if leaf not in ("weight", "bias"):
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
    merge.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    state = merged_state_dict(load_pretrained(args.artifact))
    config = read_json(os.path.join(args.artifact, CONFIG_FILE))  # small; the weights were read once
    write_safetensors(args.out, {k: v.contiguous() for k, v in state.items()},
                      {"model": config["model"], "num_classes": str(config["num_classes"])})
    print(f"merged {config['model']} ({config['num_classes']} classes) -> {args.out}")
    return 0


def merge(argv: list[str] | None = None) -> int:
    """`spt-merge DIR --out FILE`: the same as `python -m spt_dist.peft.artifact merge DIR --out FILE`."""
    return main(["merge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
