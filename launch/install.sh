#!/usr/bin/env bash
# Creates ./.venv and installs spt_dist with its pinned torch/torchvision pair.
# torch and torchvision must be pinned together in every pip command: a mismatched torchvision
# fails `import timm` ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# DeepSpeed ships as an sdist; DS_BUILD_OPS=0 defers its C++/CUDA ops to first use (JIT).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q $TORCH_PINS -e ".[test]"
.venv/bin/python -c "import torch, timm, deepspeed, webdataset; print('installed: torch', torch.__version__, '| timm', timm.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep '^installed'
# On CPU, DeepSpeed JIT-compiles a shared-memory comm op on first use (about a minute); do it now, once, into
# this environment's own cache (.venv/torch_extensions: spt_dist/engines/op_cache.py), where every job finds it.
.venv/bin/python - <<'PY' 2>&1 | grep -E "built|error" || true
import torch
from spt_dist.engines.op_cache import use_private_op_cache
use_private_op_cache()
if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()
        print("DeepSpeed CPU comm op built")
PY
