#!/usr/bin/env bash
# The built-in demo, on 2 CPU ranks: installs, writes the digit shards (once), pretrains the tiny ViT on digits 0-4
# (once: PEFT needs a pretrained backbone), then fine-tunes it on digits 5-9 with SPT-LoRA (score pass ->
# allocation -> training -> artifact + merged checkpoint) and with LoRA at the same budget, and prints the table.
# Extra arguments are config overrides for both fine-tuning runs, e.g. `bash launch/demo.sh engine.kind=fsdp`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
for digits in 0-4 5-9; do
    [ -f "data/digits-$digits/sizes.json" ] || .venv/bin/python -m spt_dist.data.shards digits --digits "$digits" \
        --out "data/digits-$digits"
done
# One thread per rank: two ranks on two cores would otherwise fight over them (about 12x slower).
export OMP_NUM_THREADS=1
train() { .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml output.overwrite=true "$@"; }
if [ ! -f runs/demo/pretrain/metrics.json ]; then
    echo "== pretraining the backbone: full fine-tuning on digits 0-4"
    train method.name=full optim.epochs=40 optim.lr=1e-3 output.name=demo/pretrain \
        'data.train_shards=data/digits-0-4/train-{000000..000007}.tar' \
        'data.eval_shards=data/digits-0-4/test-{000000..000007}.tar'
fi
for method in spt_lora lora; do
    echo "== $method on digits 5-9, from the pretrained backbone"
    train method.name=$method model.checkpoint=runs/demo/pretrain/model.safetensors output.name=demo/$method "$@"
done
echo "== digits 5-9: SPT-LoRA and LoRA at the same budget"
.venv/bin/spt-report runs/demo/spt_lora runs/demo/lora --out runs/demo/report \
    --columns method,trainable_params,trainable_pct,top1,images_per_s
cat <<'TXT'
Where to look:
  runs/demo/spt_lora/allocation.png       the allocation: where SPT spent the budget (blocks x matrices)
  runs/demo/spt_lora/allocation.json      every unit's picks and decision (sparse, lora, full, frozen)
  runs/demo/spt_lora/peft/                the artifact (what trained, and where); model.safetensors: merged
  runs/demo/report/                       runs.md, summary.md, accuracy_vs_budget.png
  .venv/bin/tensorboard --logdir runs/demo
TXT
