"""Budget-sized training, side by side in one run on the same ViT, data and engine:

    .venv/bin/python bench/training.py                      # ViT-B/16, batch 8, 1 CPU rank
    .venv/bin/python bench/training.py --model vit_large_patch16_224 --nproc 2 --engine zero3

rows: full fine-tuning; plain LoRA (rank 8 on q and v); SPT-LoRA at LoRA's budget (its trainable parameters
without the head), sparse entries as deltas; the same allocation with the GPS reference's dense masked
optimizer (whole tensors trainable, other entries' gradients zeroed); GPS (K=1) with deltas and dense masked.
Each row is a real `launch/train.py` job; the allocations come from one `--stage select` job each (short
calibration: the selection's cost is bench/selection.py's subject). Step time is training only (evaluation
excluded) and includes the first steps; peak memory is per rank (GPU: allocated; CPU: resident set, which
includes the ~0.8 GiB Python/torch runtime, so CPU ratios understate the differences).
Targets: SPT-LoRA step <= 1.15x LoRA, peak memory <= 1.05x LoRA, far below full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from spt_dist.engines import VARIANTS

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--engine", default="zero2", choices=list(VARIANTS))
    parser.add_argument("--rows", default="full,lora,spt_lora,spt_lora_dense,gps,gps_dense")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spt_bench_training_"))
    shards = work / "shards"
    subprocess.run([sys.executable, "-m", "spt_dist.data.shards", "synthetic", "--out", str(shards), "--classes", "10",
                    "--train", "256", "--test", "16", "--samples-per-shard", "32"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.nproc))))
    common = ["--config", "configs/demo.yaml", f"model.name={args.model}", f"data.batch_size={args.batch_size}",
              "data.eval_batch_size=16", "data.workers=1", f"data.train_shards={shards}/train-{{000000..000007}}.tar",
              f"data.eval_shards={shards}/test-000000.tar", f"optim.max_steps={args.steps}", "output.progress=false",
              f"output.log_every={args.steps}", "output.checkpoint_every=0", f"output.dir={work}",
              "selection.batch_size=8", "selection.batches=2", *VARIANTS[args.engine]]

    def job(name: str, *extra: str, stage: str = "train") -> Path:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "launch/train.py",
               "--stage", stage, *common, f"output.name={name}", *extra]
        log = work / f"{name}.log"
        with open(log, "w") as out:
            if subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"{name} failed; its log, {log}, ends:\n" + log.read_text()[-3000:])
        return work / name

    lora = ["method.name=lora", "method.lora_rank=8", "method.lora_targets=[q,v]"]
    rows = args.rows.split(",")
    lora_budget = None
    selections = {}
    if any(r.startswith("spt") for r in rows):
        from spt_dist.models import create_model
        from spt_dist.peft.baselines import apply_method, trainable_parameters
        from spt_dist.config import MethodConfig
        model = apply_method(create_model(args.model, 10, device="meta"),
                             MethodConfig(name="lora", lora_rank=8, lora_targets=["q", "v"]))
        lora_budget = trainable_parameters(model)[0] - sum(p.numel() for p in model.get_classifier().parameters())
        selections["spt"] = job("select-spt", "method.name=spt_lora", f"selection.budget={lora_budget}", stage="select")
    if any(r.startswith("gps") for r in rows):
        selections["gps"] = job("select-gps", "method.name=gps", "selection.loss=ce", "selection.k=1", stage="select")
    settings = {
        "full": ["method.name=full"],
        "lora": lora,
        "spt_lora": ["method.name=spt_lora", f"method.allocation={selections.get('spt')}"],
        "spt_lora_dense": ["method.name=spt_lora", f"method.allocation={selections.get('spt')}",
                           "method.sparse_update=dense_masked"],
        "gps": ["method.name=gps", f"method.allocation={selections.get('gps')}", "optim.weight_decay=0"],
        "gps_dense": ["method.name=gps", f"method.allocation={selections.get('gps')}", "optim.weight_decay=0",
                      "method.sparse_update=dense_masked"],
    }
    results = {}
    for row in rows:
        metrics = json.loads((job(row, *settings[row]) / "metrics.json").read_text())
        step_s = args.batch_size * args.nproc / metrics["images_per_s"]
        results[row] = (step_s, metrics["peak_memory_gib"], metrics["trainable_params"], metrics["optimizer_state_bytes"])

    print(f"\n{args.model} / batch {args.batch_size} per rank / {args.nproc} rank(s) / {args.engine} / {args.steps} steps"
          + (f" / SPT budget = LoRA's {lora_budget:,}" if lora_budget else ""))
    base = results.get("lora")
    print(f"{'method':16} {'step s':>8} {'x lora':>7} {'peak GiB':>9} {'x lora':>7} {'trainable':>12} {'optim state MiB':>16}")
    for row, (step_s, mem, params, state) in results.items():
        rel = (f"{step_s / base[0]:7.2f}", f"{mem / base[1]:7.2f}") if base else ("", "")
        print(f"{row:16} {step_s:8.2f} {rel[0]:>7} {mem:9.2f} {rel[1]:>7} {params:12,} {state / 2**20:16.2f}")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
