"""Side-by-side throughput and peak memory of every engine, measured with the real trainer in one run.

    .venv/bin/python bench/engines.py --model vit_test_tiny_patch8_32 --method full --steps 40 --nproc 2

Each engine runs `launch/train.py` as an `nproc`-rank job on the same synthetic shards and recipe; the table
shows images/s (training only), peak memory per rank (GPU: allocated; CPU: resident set, which includes the
Python/torch runtime), and both relative to DeepSpeed ZeRO-0.
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
    parser.add_argument("--model", default="vit_test_tiny_patch8_32")
    parser.add_argument("--method", default="full", choices=["full", "linear", "lora"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--engines", default=",".join(VARIANTS))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spt_bench_"))
    shards = work / "shards"
    subprocess.run([sys.executable, "-m", "spt_dist.data.shards", "synthetic", "--out", str(shards), "--classes", "10",
                    "--train", "2000", "--test", "200", "--samples-per-shard", "125"], check=True, cwd=REPO)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = []
    for name in args.engines.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "launch/train.py",
               "--config", "configs/demo.yaml", f"model.name={args.model}", f"method.name={args.method}",
               f"engine.precision={args.precision}", f"data.batch_size={args.batch_size}", "data.eval_batch_size=50",
               f"data.train_shards={shards}/train-{{000000..000015}}.tar",
               f"data.eval_shards={shards}/test-{{000000..000001}}.tar",
               f"optim.max_steps={args.steps}", "output.progress=false", f"output.log_every={args.steps}",
               f"output.dir={work}", f"output.name={name}", *VARIANTS[name]]
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        metrics = json.loads((work / name / "metrics.json").read_text())
        rows.append((name, metrics["images_per_s"], metrics["peak_memory_gib"]))

    base_rate, base_mem = rows[0][1], rows[0][2]
    print(f"\n{args.model} / {args.method} / {args.precision} / {args.nproc} ranks / batch {args.batch_size} per rank "
          f"/ {args.steps} steps")
    print(f"{'engine':8} {'images/s':>10} {'x ' + rows[0][0]:>9} {'peak GiB/rank':>14} {'x ' + rows[0][0]:>9}")
    for name, rate, mem in rows:
        print(f"{name:8} {rate:10.1f} {rate / base_rate:9.2f} {mem:14.2f} {mem / base_mem:9.2f}")


if __name__ == "__main__":
    main()
