"""The fingerprint of the base weights a PEFT artifact belongs to (see spt_dist.peft.artifact).

sha256 over the frozen base tensors: every entry of the model's state dict that the artifact does not store,
in sorted name order, each as a JSON header line `["name", "torch.float32", [shape...]]` followed by its raw
bytes (CPU, contiguous, native byte order). What the artifact stores (the head, fully tuned vectors, deltas and
their indices, LoRA / Adapter weights) replaces the base's values, so it is left out: the fingerprint does not
depend on the head's size or on what training did, only on the weights the artifact is merged onto.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn

PREFIX = "sha256:"
_ATTR = "_spt_base_fingerprint"  # a plain attribute: no parameter or buffer, state dicts and engines unchanged


def base_fingerprint(state: Mapping[str, torch.Tensor], stored: Iterable[str]) -> str | None:
    """The fingerprint of `state`'s entries not in `stored`; None when one of them has no data here (meta)."""
    stored = set(stored)
    digest = hashlib.sha256()
    for name in sorted(k for k in state if k not in stored):
        tensor = state[name]
        if tensor.is_meta:
            return None
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]) + "\n"
        digest.update(header.encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy())
    return PREFIX + digest.hexdigest()


def short(fingerprint: str) -> str:
    """The form a message shows: sha256: and 12 hex digits."""
    return fingerprint[: len(PREFIX) + 12]


def record(model: nn.Module, fingerprint: str | None) -> None:
    """Keeps `fingerprint` with the model (computed while it is whole, before an engine shards it)."""
    object.__setattr__(model, _ATTR, fingerprint)


def recorded(model: nn.Module) -> str | None:
    return model.__dict__.get(_ATTR)
