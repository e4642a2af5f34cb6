#!/usr/bin/env bash
# The built-in demo: install, make synthetic shards (once), fine-tune the tiny ViT on 2 CPU ranks.
# Extra arguments are config overrides, e.g. `bash launch/demo.sh engine.kind=fsdp`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
[ -f data/synthetic/sizes.json ] || .venv/bin/python -m spt_dist.data.shards synthetic --out data/synthetic
# One thread per rank: two ranks on two cores would otherwise fight over them (about 12x slower).
OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml "$@"
