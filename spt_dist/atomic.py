"""Atomic file writes: a temp file beside the target, synced, then renamed onto it.

Readers never see a half-written file, and a failed write leaves the old file as it was. Torch-free (the
safetensors writer imports it lazily) so the shard tool can use it without paying for torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from spt_dist.errors import UserError


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread may be creating
    files); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: str, e: OSError) -> UserError:
    why = "no space left on the device (or quota exceeded)" if e.errno in _NO_SPACE else e.strerror or str(e)
    return UserError(f"cannot write '{path}': {why}; nothing was changed there")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temp path in the target's directory; on success it replaces `path`, on error it is removed.

    The result has the mode an ordinary open() would give it (0666 less the umask: 0644 under umask 022),
    whatever the writer did to the temp file (mkstemp makes it 0600; safetensors recreates it). A full disk
    or quota (ENOSPC, EDQUOT) while writing, or any OSError creating, syncing or renaming the file, is a
    UserError naming the file; the old file is left as it was."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-",
                                   suffix="-" + os.path.basename(path))
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise _write_error(path, e) from None
            raise  # something else the writer did (e.g. reading its input): not about this file
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def require_directory(path: str, what: str) -> None:
    """A user's mistake as one line naming `what`: `path`, or the nearest existing path above it, is not a
    directory (os.makedirs would end in FileExistsError or NotADirectoryError)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        shown = path if probe == os.path.abspath(path) else probe
        raise UserError(f"{what}: '{shown}' is a file, not a directory")


def make_dirs(path: str, what: str) -> None:
    """os.makedirs(path, exist_ok=True), with a file in the way or any OSError as one line naming `what`."""
    require_directory(path, what)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}: cannot create directory '{path}' ({e.strerror or e})") from None


def make_temp_dir(parent: str, name: str, what: str) -> str:
    """A new hidden directory `parent`/.`name`.tmp-XXXXXXXX (`parent` made if need be): output is built there
    and renamed into place once complete, so a failed run leaves nothing half-written where readers look. It has
    the mode an ordinary os.mkdir would give it (mkdtemp makes it 0700), as it may become the output itself."""
    make_dirs(parent, what)
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    except OSError as e:
        raise UserError(f"{what}: cannot create a directory in '{parent}' ({e.strerror or e})") from None
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def open_regular(path: str, mode: str = "rb") -> IO:
    """open(path, mode) for reading, refused (OSError EINVAL "not a regular file") unless it is a regular file: a
    FIFO put where a file is expected would block the open for ever, and /dev/zero would never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO's open returns at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes, in hex (what checkpoints, artifacts and allocations record); OSError for a
    path that is not a regular file (open_regular)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(obj: Any) -> str:
    """The SHA-256 of a JSON value, in hex: of its compact form with sorted keys, so the same value written with
    any indentation (or read back) has the same digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata)
        except SafetensorError as e:  # its I/O errors end "(os error N)": about this file
            code = re.search(r"\(os error (\d+)\)", str(e))
            if not code:
                raise
            raise _write_error(path, OSError(int(code.group(1)), os.strerror(int(code.group(1))))) from None
