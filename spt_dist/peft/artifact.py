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
An artifact written without a fingerprint (`"base_fingerprint": null`: its base was not whole when it was
saved) loads onto any base of the right shapes; the fingerprint is under the config's checksum, so it cannot be
taken out afterwards.

The artifact checks itself: `sha256` in peft_config.json holds the SHA-256 of peft_model.safetensors (its bytes)
and of the config (its JSON less `sha256`, compact with sorted keys). Loading (and merging) refuses, each as one line naming
the file and the key or tensor: an artifact without checksums (an older spt_dist's: re-export it), a file that
does not match its checksum, a config field of the wrong type, a tensor that is missing, not named by the
structure, of another dtype than the model's (nothing is converted), not finite, or indices out of range.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

import torch
from torch import nn

from spt_dist.atomic import file_digest, json_digest, make_dirs, read_safetensors, write_json, write_safetensors
from spt_dist.cli import command
from spt_dist.data.shards import read_json
from spt_dist.errors import UserError
from spt_dist.peft import fingerprint
from spt_dist.peft.allocated import (
    apply_description, check_description, describe, described_tensors, trainable_state, valid_index,
)
from spt_dist.peft.tuned import Tuned

CONFIG_FILE = "peft_config.json"
WEIGHTS_FILE = "peft_model.safetensors"
CHECKSUMS = "sha256"  # peft_config.json's key for the checksums
FORMAT = 1
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def save_pretrained(directory: str, model: nn.Module, state: dict[str, torch.Tensor], base: dict) -> None:
    """`state`: the consolidated parameters and buffers of `model` (what trains at least); `base`: model,
    num_classes, img_size, checkpoint, seed, method. The base fingerprint is the one recorded when the PEFT model
    was built, else computed from `state` if it is whole. The config is written last: its presence means the
    directory is complete."""
    make_dirs(directory, "artifact")
    tensors = {k: v.contiguous() for k, v in trainable_state(state, model).items()}
    base_fingerprint = fingerprint.recorded(model)
    if base_fingerprint is None and set(model.state_dict()) <= set(state):
        base_fingerprint = fingerprint.base_fingerprint(state, tensors)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    write_safetensors(weights_path, tensors, {"format": "spt_dist-peft-1"})
    config = dict(base, base_fingerprint=base_fingerprint, structure=describe(model), format=FORMAT)
    config[CHECKSUMS] = {WEIGHTS_FILE: file_digest(weights_path), CONFIG_FILE: _config_digest(config)}
    write_json(os.path.join(directory, CONFIG_FILE), config)


def _config_digest(config: dict) -> str:
    return json_digest({k: v for k, v in config.items() if k != CHECKSUMS})


def _paths(directory: str) -> tuple[str, str]:
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise UserError(f"'{directory}' is not a PEFT artifact (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return config_path, weights_path


def _whole(x) -> bool:
    return type(x) is int


# peft_config.json's fields: what each must be (None: may be null or absent), and how that reads.
_FIELDS = {
    "model": (lambda x: x is None or (isinstance(x, str) and x != ""), "a timm model name or null"),
    "num_classes": (lambda x: x is None or (_whole(x) and x >= 0), "a whole number >= 0 or null"),
    "img_size": (lambda x: x is None or (_whole(x) and x > 0), "a whole number > 0 or null"),
    "checkpoint": (lambda x: x is None or isinstance(x, str), "a path or null"),
    "seed": (lambda x: x is None or _whole(x), "a whole number or null"),
    "method": (lambda x: x is None or isinstance(x, str), "a method name or null"),
    "base_fingerprint": (lambda x: x is None or (isinstance(x, str) and _FINGERPRINT.fullmatch(x) is not None),
                         '"sha256:" and 64 hex digits, or null'),
    "format": (lambda x: _whole(x) and x == FORMAT, f"{FORMAT} (this spt_dist's artifact format)"),
}


def read_config(directory: str) -> dict:
    """peft_config.json, checked: a JSON object with checksums, every field of its type, and the config's own
    checksum (the weights' is checked by read_pretrained). Each problem is one line naming the file and key."""
    config_path, _ = _paths(directory)
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise UserError(f"artifact: '{config_path}' is not a PEFT config (a JSON object)")
    sums = config.get(CHECKSUMS)
    if sums is None:
        raise UserError(f"artifact: '{config_path}' has no checksum: written by an older spt_dist; re-export it")
    if not isinstance(sums, dict) or not all(isinstance(sums.get(k), str) for k in (CONFIG_FILE, WEIGHTS_FILE)):
        raise UserError(f"artifact: '{config_path}': '{CHECKSUMS}' must be a table of checksums ({CONFIG_FILE}, "
                        f"{WEIGHTS_FILE}; got {sums!r})")
    for key, (ok, what) in _FIELDS.items():
        if not ok(config.get(key)):
            raise UserError(f"artifact: '{config_path}': '{key}' must be {what} (got {config.get(key)!r})")
    wrong = check_description(config.get("structure"))
    if wrong:
        raise UserError(f"artifact: '{config_path}': {wrong}")
    if _config_digest(config) != sums[CONFIG_FILE]:
        raise UserError(f"artifact: '{config_path}' does not match its checksum (damaged or edited); export it again")
    return config


def read_pretrained(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked config and the weights: they match their checksum and every floating-point value is finite."""
    config = read_config(directory)
    _, weights_path = _paths(directory)
    tensors = read_safetensors(weights_path, "artifact")
    try:
        digest = file_digest(weights_path)
    except OSError as e:
        raise UserError(f"artifact: cannot read '{weights_path}' ({e.strerror or e})") from None
    if digest != config[CHECKSUMS][WEIGHTS_FILE]:
        raise UserError(f"artifact: '{weights_path}' does not match the checksum in {CONFIG_FILE} (damaged or "
                        "edited); export it again")
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"artifact: '{weights_path}': '{name}' holds NaN or infinite values")
    return config, tensors


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
    _check_tensors(directory, config["structure"], tensors, model.state_dict())
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


def _check_tensors(directory: str, structure: dict, tensors: dict[str, torch.Tensor],
                   own: dict[str, torch.Tensor]) -> None:
    """The weights are the tensors the structure names, none missing and no other, each of the dtype this model
    (`own`: its state dict, the structure not yet applied) gives it; index buffers in range."""
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    try:
        expected = described_tensors(structure, own)
    except KeyError as e:
        raise UserError(f"artifact: '{config_path}': its structure names {e}, which this model does not have: was "
                        "it trained on another model?") from None
    except ValueError as e:
        raise UserError(f"artifact: '{config_path}': {e}: was it trained on another model?") from None
    missing = next((name for name in expected if name not in tensors), None)
    if missing:
        raise UserError(f"artifact: '{missing}' is missing from '{weights_path}' (its structure in {CONFIG_FILE} "
                        "names it)")
    extra = next((name for name in tensors if name not in expected), None)
    if extra:
        raise UserError(f"artifact: '{weights_path}' holds '{extra}', which its structure does not name")
    for name, dtype in expected.items():
        if tensors[name].dtype != dtype:
            raise UserError(f"artifact: '{weights_path}': '{name}' is {tensors[name].dtype} there, this model's is "
                            f"{dtype}: not converted silently")
        param = name.removesuffix("_delta_index").removesuffix("_mask")
        if name.endswith("_delta_index") and not valid_index(tensors[name], own[param].numel(), (torch.int64,)):
            raise UserError(f"artifact: '{weights_path}': '{name}' must hold increasing offsets in "
                            f"[0, {own[param].numel()})")
        if name.endswith("_mask") and tensors[name].shape != own[param].shape:
            raise UserError(f"artifact: '{weights_path}': '{name}' is {list(tensors[name].shape)}, '{param}' "
                            f"{list(own[param].shape)}")


def _check_shapes(directory: str, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    wrong = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"'{directory}': '{wrong[0]}' is {list(tensors[wrong[0]].shape)} there, "
                        f"{list(own[wrong[0]].shape)} in this model: the artifact was trained on another base")


def _check_base(directory: str, config: dict, own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                allow_other_base: bool) -> str | None:
    """The fingerprint of the base weights in `own` (what the artifact does not replace); another one than the
    artifact's is one line naming both, unless allowed. An artifact saved without one fits any base."""
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
    config = read_config(args.artifact)  # small; the weights were read once
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
