"""Atomic file writes: a temp file beside the target, synced, then renamed onto it.

Readers never see a half-written file, and a failed write leaves the old file as it was. Torch-free (the
safetensors writer imports it lazily) so the shard tool can use it without paying for torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from spt_dist.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temp path in the target's directory; on success it replaces `path`, on error it is removed."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_safetensors(path: str, what: str) -> dict:
    """A safetensors file's tensors (plain tensors, nothing executed); a missing or corrupt file is one line that
    names `what` asked for it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{what}: cannot read '{path}' ({e})") from None


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata)
