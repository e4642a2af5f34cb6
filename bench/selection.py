"""The two costs of selection, each measured side by side with its reference in one multi-rank job.

    .venv/bin/python bench/selection.py                      # both parts, 2 CPU ranks
    .venv/bin/python bench/selection.py --part score --model vit_base_patch16_224 --engine fsdp2
    .venv/bin/python bench/selection.py --part allocation \
        --alloc-model vit_base_patch16_224,vit_large_patch16_224,vit_huge_patch14_224,vit_giant_patch14_224

score:      the score pass against the same number of plain forward+backward steps: the same engine, model,
            micro-batches (decoded once, held in memory, so data loading is in neither) and no-op optimizer
            step; the score pass adds only taking each rank's gradient shard and adding it to the scores.
            The two loops alternate `--repeats` times after a warm-up. Target: ≤ 1.02× (issue 19).
allocation: SPT allocation at ViT-H scale (`--alloc-model`, a list: one job each, scores on every entry the SPT rule scores) over
            the ranks, each holding the ZeRO-3 shard of every tensor: synthetic heavy-tailed scores saved in
            the score pass's own format, then timed: one read of the local scores (`load_scores` of this
            rank's file, page cache warm) and `allocate_spt` at `--budget`. Target: ≤ 3× one read (issue 19), and
            linear: the same time per million scores at every size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="both", choices=["score", "allocation", "both"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="vit_base_patch16_224", help="score part: the scored ViT")
    parser.add_argument("--engine", default="zero3", help="score part: an engine variant (spt_dist.engines.VARIANTS)")
    parser.add_argument("--method", default="spt", choices=["spt", "gps"])
    parser.add_argument("--batch-size", type=int, default=8, help="score part: global calibration batch")
    parser.add_argument("--batches", type=int, default=3, help="score part: global batches per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alloc-model", default="vit_huge_patch14_224")
    parser.add_argument("--budget", type=float, default=0.005,
                        help="allocation part; at ViT-H's size LoRA rank 8 on every matrix is 0.94 %% of the "
                             "parameters, so a budget of 1 %% or more would take everything without a search")
    parser.add_argument("--worker", choices=["score", "allocation"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# The workers: one per rank, started by torch.distributed.run.

def timed(fn) -> float:
    import torch.distributed as dist
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def score_worker(args: argparse.Namespace, info) -> dict:
    from spt_dist.config import load_config
    from spt_dist.data.dataset import resolve_dataset
    from spt_dist.engines import VARIANTS
    from spt_dist.selection.scores import LocalScores
    from spt_dist.selection.scoring import accumulate_scores, global_batch_step, prepare_score_pass

    shards = Path(args.work) / "shards"
    cfg = load_config(str(REPO / "configs/demo.yaml"), [
        f"model.name={args.model}", f"data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"data.eval_shards={shards}/test-000000.tar", f"selection.method={args.method}",
        f"selection.batch_size={args.batch_size}", f"selection.batches={args.batches}",
        *VARIANTS[args.engine]])
    setup = prepare_score_pass(cfg, resolve_dataset(cfg.data), info)
    decode_s = time.perf_counter()
    batches = list(setup.stream)  # decoded once: both loops run on the same tensors
    decode_s = time.perf_counter() - decode_s
    engine, device = setup.engine, info.device

    def plain() -> None:
        for micro_batches in batches:
            global_batch_step(engine, micro_batches, setup.loss_fn, device)

    def score() -> None:
        scores = LocalScores()
        for micro_batches in batches:
            global_batch_step(engine, micro_batches, setup.loss_fn, device,
                              lambda: accumulate_scores(engine, scores, args.method))
        scores.finish(absolute=args.method == "gps")

    global_batch_step(engine, batches[0], setup.loss_fn, device)  # warm-up: allocator, engine buffers
    plain_s, score_s = [], []
    for _ in range(args.repeats):
        plain_s.append(timed(plain))
        score_s.append(timed(score))
    return {"model": args.model, "engine": args.engine, "method": args.method, "batches": args.batches,
            "batch_size": args.batch_size, "scored": setup.layout.scored_params, "plain_s": plain_s,
            "score_s": score_s, "decode_s": decode_s}


def zero3_shard_scores(layout, rank: int, world: int):
    """This rank's ZeRO-3 partition of every scored tensor (ceil(n / world) entries from rank · that), filled
    with seeded heavy-tailed scores like real squared gradients: log-normal, with a per-tensor scale."""
    import torch

    from spt_dist.selection.scores import Chunk, LocalScores
    scores = LocalScores()
    for i, t in enumerate(layout.tensors):
        size = math.ceil(t.numel / world)
        start, stop = min(rank * size, t.numel), min((rank + 1) * size, t.numel)
        if stop > start:
            g = torch.Generator().manual_seed(1000 * i + rank)
            values = torch.randn(stop - start, generator=g).mul_(2.0).exp_().mul_(10.0 ** (-(i % 7)))
            scores.chunks.append(Chunk(t.name, start, values))
    return scores


def allocation_worker(args: argparse.Namespace, info) -> dict:
    import torch

    from spt_dist.config import SelectionConfig
    from spt_dist.models import create_model
    from spt_dist.selection.allocation import allocate_spt
    from spt_dist.selection.layout import build_layout
    from spt_dist.selection.scores import load_scores, save_scores

    layout = build_layout(create_model(args.alloc_model, 1000, device="meta"), "spt")
    run_dir = str(Path(args.work) / "alloc")
    save_scores(zero3_shard_scores(layout, info.rank, info.world_size), run_dir, info.rank, info.world_size,
                {"method": "spt", "model": args.alloc_model, "num_classes": 1000})
    # One read: load_scores maps the file (safetensors), so the read happens when the values are first touched;
    # one pass over them completes it. The page cache is warmed first: this is not a disk benchmark.
    held: dict = {}

    def read() -> None:
        held["scores"] = load_scores(run_dir, info.rank, info.world_size)[0]
        for chunk in held["scores"].chunks:
            chunk.values.sum()

    def evict() -> None:  # drops this rank's score file from the page cache (clean pages; no privileges needed)
        for name in os.listdir(os.path.join(run_dir, "scores")):
            if name.startswith(f"rank-{info.rank:05d}-"):
                fd = os.open(os.path.join(run_dir, "scores", name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    evict()
    cold_s = timed(read)  # as `--stage allocate` reads them in a new job
    read_s = min(timed(read) for _ in range(args.repeats))
    scores = held["scores"]
    sum_s = min(timed(lambda: [c.values.sum() for c in scores.chunks]) for _ in range(args.repeats))
    sel = SelectionConfig(method="spt", budget=args.budget)
    result = {}
    alloc_all_s = [timed(lambda: result.update(allocation=allocate_spt(scores, layout, sel)))
                   for _ in range(args.repeats)]
    record = result["allocation"].record
    return {"model": args.alloc_model, "scored": layout.scored_params, "local": scores.numel,
            "local_bytes": scores.numel * 4, "read_s": read_s, "cold_s": cold_s, "sum_s": sum_s,
            "alloc_s": min(alloc_all_s), "alloc_all_s": alloc_all_s,
            "budget": record["target"], "cost": record["cost"], "threads": torch.get_num_threads()}


def worker(args: argparse.Namespace) -> None:
    from spt_dist.distributed import init_distributed, shutdown_distributed
    info = init_distributed(1800)
    result = score_worker(args, info) if args.worker == "score" else allocation_worker(args, info)
    if info.is_main:
        Path(args.work, f"{args.worker}.json").write_text(json.dumps(result))
    shutdown_distributed()


# ---------------------------------------------------------------------------------------------------------
# The driver: makes the data, starts each part's job, prints the figures.

def make_score_shards(work: Path, samples: int, size: int = 32) -> None:
    """Synthetic shards for the score part: 4 shards holding at least `samples` images of `size` px."""
    subprocess.run([sys.executable, "-m", "spt_dist.data.shards", "synthetic", "--out", str(work / "shards"),
                    "--classes", "10", "--train", str(4 * math.ceil(samples / 4)), "--test", "10", "--size", str(size),
                    "--samples-per-shard", str(math.ceil(samples / 4))], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def run_part(part: str, args: argparse.Namespace, work: Path, options: list[str] | None = None) -> dict:
    """Runs one part's `args.nproc`-rank job; `options`: the workers' options (default: the driver's own)."""
    # The workers get the driver's options but --nproc: torch.distributed.run would take that for its own
    # --nproc-per-node (argparse accepts abbreviations), even after the script's name.
    if options is None:
        options = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--nproc")
                   and not (i and sys.argv[i] == "--nproc")]
    return run_worker(__file__, part, args.nproc, work, options)


def run_worker(script: str, name: str, nproc: int, work: Path, options: list[str]) -> dict:
    """`script --worker name --work work *options` as an `nproc`-rank torch.distributed.run job on this machine
    (OMP_NUM_THREADS=1 unless set); returns the WORK/NAME.json its rank 0 wrote, or exits with its log's end."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script, "--worker", name, "--work", str(work), *options]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = work / f"{name}.log"
    with open(log, "w") as out:
        if subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"the {name} job failed; its log, {log}, ends:\n" + log.read_text()[-3000:])
    return json.loads((work / f"{name}.json").read_text())


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.worker:
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="spt_bench_selection_"))
    if args.part in ("score", "both"):
        make_score_shards(work, args.batch_size * args.batches)
        r = run_part("score", args, work)
        plain, score = min(r["plain_s"]), min(r["score_s"])
        print(f"\nscore pass: {r['model']} / {r['method'].upper()} / {r['engine']} / {args.nproc} ranks / "
              f"{r['batches']} global batches of {r['batch_size']} / {r['scored']:,} entries scored "
              f"(best of {args.repeats})")
        print(f"  plain forward+backward steps {plain:8.2f} s   {[round(s, 2) for s in r['plain_s']]}")
        print(f"  score pass                   {score:8.2f} s   {[round(s, 2) for s in r['score_s']]}")
        print(f"  ratio                        {score / plain:8.3f} x   (target <= 1.02; decoding the "
              f"batches, in neither: {r['decode_s']:.2f} s)")
    if args.part in ("allocation", "both"):
        rows = []
        for model in args.alloc_model.split(","):
            r = run_part("allocation", args, work, ["--alloc-model", model, "--budget", str(args.budget),
                                                    "--repeats", str(args.repeats)])
            rows.append(r)
            print(f"\nallocation: {r['model']} / SPT / {args.nproc} ranks / {r['scored']:,} scores, "
                  f"{r['local']:,} per rank ({r['local_bytes'] / 2**30:.2f} GiB) / budget {r['budget']:,} "
                  f"-> cost {r['cost']:,} / {r['threads']} thread(s) per rank")
            print(f"  one read of the local scores {r['read_s']:8.2f} s   (load_scores and a first pass over the "
                  "values, page cache warm)")
            print(f"  ... from storage             {r['cold_s']:8.2f} s   (the same after evicting the file from the "
                  "page cache, as a new `--stage allocate` job)")
            print(f"  one pass over them in memory {r['sum_s']:8.2f} s   (a sum, for context)")
            print(f"  allocate_spt                 {r['alloc_s']:8.2f} s   {[round(t, 2) for t in r['alloc_all_s']]}")
            print(f"  ratio to one read            {r['alloc_s'] / r['read_s']:8.2f} x   (target <= 3; "
                  f"{r['alloc_s'] / r['cold_s']:.2f} x the read from storage, {r['alloc_s'] / r['sum_s']:.0f} x the sum)")
        if len(rows) > 1:
            print(f"\nallocation by size (best of {args.repeats}; load average {os.getloadavg()[0]:.2f}):")
            print(f"  {'model':24s} {'scores/rank':>12s} {'read s':>7s} {'alloc s':>8s} {'x read':>7s} "
                  f"{'ms per M scores':>16s}")
            for r in rows:
                print(f"  {r['model']:24s} {r['local']:12,d} {r['read_s']:7.2f} {r['alloc_s']:8.2f} "
                      f"{r['alloc_s'] / r['read_s']:7.2f} {r['alloc_s'] / r['local'] * 1e9:16.2f}")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
