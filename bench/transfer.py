"""Transfer on CPU: does sensitivity-aware PEFT beat LoRA at equal budget once the backbone is pretrained?

    .venv/bin/python bench/transfer.py                 # 3 budgets x 3 seeds, 2 CPU ranks: about 30 min on 2 cores
    .venv/bin/python bench/transfer.py --seeds 0 --budgets 4096

The tiny ViT (vit_test_tiny_patch8_32, 81k parameters) is pretrained on handwritten digits 0-4 (full fine-tuning;
scikit-learn's bundled 8x8 digits upscaled to 32 px, as the demo does), then fine-tuned on digits 5-9 from that
backbone with full fine-tuning, linear probing, LoRA (rank r on q and v: 512 r backbone parameters), SPT-LoRA and
SPT-Adapter (selection.budget = the LoRA budgets) and GPS (top-k per row, k = 1, 2, 4: its own budgets). Every run is a real 2-rank job of `spt-sweep` (DeepSpeed ZeRO-2, configs/demo.yaml's recipe); the
table and accuracy_vs_budget.png come from spt_dist.report, as for any sweep. Results go to OUT (default
runs/bench-transfer): pretrain/, sweep/<run>/, sweep/report/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")
# GPS trains k inputs of every output row of every weight, and every bias: on this model about 1.9k, 2.9k and 4.8k
# parameters for k = 1, 2, 4 (it cannot go as low as LoRA-1's 512).
GPS_K = [1, 2, 4]


def shards(directory: Path, digits: str) -> dict[str, str]:
    if not (directory / "sizes.json").exists():
        subprocess.run([sys.executable, "-m", "spt_dist.data.shards", "digits", "--digits", digits, "--out",
                        str(directory)], check=True)
    return {"data.train_shards": f"{directory}/train-{{000000..000007}}.tar",
            "data.eval_shards": f"{directory}/test-{{000000..000007}}.tar"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-transfer"))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 8], help="LoRA ranks: budgets of 512 r")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (671 images each)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    source, target = shards(REPO / "data" / "digits-0-4", "0-4"), shards(REPO / "data" / "digits-5-9", "5-9")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    backbone = out / "pretrain" / "model.safetensors"
    if not backbone.exists():
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "spt_dist.train", "--config", DEMO, "method.name=full", "optim.epochs=40", "optim.lr=1e-3",
                        f"output.dir={out}", "output.name=pretrain", "output.overwrite=true",
                        *(f"{k}={v}" for k, v in source.items())], check=True, env=env)
    pretrain = json.loads((out / "pretrain" / "metrics.json").read_text())
    print(f"backbone: pretrained on digits 0-4, top-1 {pretrain['top1']:.2f}%", flush=True)

    budgets = [512 * r for r in args.ranks]
    def common():  # a fresh copy per grid entry: a shared list would be written as a YAML alias, which is refused
        return {"seed": list(args.seeds), "world_size": [2]}

    sweep = {
        "name": "sweep",
        "config": [DEMO],
        "overrides": {"model.checkpoint": str(backbone), "optim.epochs": args.epochs, **target},
        "grid": [
            {"method.name": ["full", "linear"], **common()},
            {"method.name": ["lora"], "method.lora_rank": args.ranks, **common()},
            {"method.name": ["spt_lora", "spt_adapter"], "selection.budget": budgets, **common()},
            {"method.name": ["gps"], "selection.k": GPS_K, **common()},
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "transfer.yaml"
    spec.write_text(yaml.safe_dump(sweep, sort_keys=False))
    subprocess.run([sys.executable, "-m", "spt_dist.sweep", str(spec), "--output-dir", str(out)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "spt_dist.report", str(out / "sweep"), "--out", str(out / "sweep" / "report"),
                    "--columns", "method,budget,seed,trainable_params,trainable_pct,top1"], check=True)
    print((out / "sweep" / "report" / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
