"""Where DeepSpeed's JIT-compiled ops (on CPU: its shared-memory comm op) are kept: inside the Python environment
spt_dist runs in, unless TORCH_EXTENSIONS_DIR says otherwise.

torch's default is one folder per user shared by every environment of the same Python and torch: two
environments whose build files differ invalidate each other's op, and every process compiles it again (minutes
on a busy machine, during which its rank's peers wait in their first collective). Torch-free.
"""

from __future__ import annotations

import os
import sys


def private_op_cache() -> str | None:
    """The environment's own cache folder (a venv, or a conda environment), or None for a system Python."""
    in_venv = sys.prefix != sys.base_prefix
    in_conda = os.environ.get("CONDA_PREFIX") == sys.prefix
    return os.path.join(sys.prefix, "torch_extensions") if in_venv or in_conda else None


def use_private_op_cache() -> None:
    """Sets TORCH_EXTENSIONS_DIR to `private_op_cache()` unless it is set already; before DeepSpeed loads an op."""
    folder = private_op_cache()
    if folder and "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = folder
