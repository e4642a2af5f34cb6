#!/usr/bin/env bash
# The whole product on one GPU in at most ~8 minutes (H100/H200): ViT-L/16 bf16 training steps under ZeRO-2,
# ZeRO-3 and FSDP2 for full, LoRA, SPT-LoRA and GPS; the score pass and the allocation against their references;
# a checkpoint save + resume checked for exact continuation; one table. Without CUDA (or with --smoke) the same
# steps on the tiny ViT on CPU (CI runs that: tests/test_gpu_check.py). Options: bench/gpu_check.py --help.
#   bash bench/gpu_check.sh [--smoke] [--model NAME] [--peak-tflops 989] [--json out.json] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" bench/gpu_check.py "$@"
