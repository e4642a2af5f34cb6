"""Train data loader throughput: our TrainStream against a minimal webdataset pipeline, side by side.

    .venv/bin/python bench/loader.py                          # 224 px JPEG shards, 1 worker, batch 64
    .venv/bin/python bench/loader.py --repeats 7 --batches 30 --shards /tmp/jpeg_shards   # shards kept for reuse
    .venv/bin/python bench/loader.py --profile 10             # where our time goes: cProfile, in-process
    git show HEAD:spt_dist/data/loader.py > /tmp/loader_head.py
    .venv/bin/python bench/loader.py --baseline /tmp/loader_head.py   # also times that version, as `baseline`

Synthetic JPEG shards of `--size` px (the shard tool's `synthetic --format jpg`) are read by
  ours:       spt_dist.data.loader.TrainStream (seeded shard order and shuffle buffer, per-sample isolated RNG,
              exact position, fault counting), with the train transform of `--model` (build_transforms,
              data.augment=true: random resized crop, flip, normalise);
  plain:      wds.WebDataset(urls, shardshuffle=False).shuffle(the same buffer).decode("pil")
              .to_tuple("jpg", "cls").map_tuple(the same transform, int).batched(batch) in a DataLoader
              (batch_size=None): the same work without determinism, resume or fault accounting;
  plain_eval: the same with the eval transform (resize, centre crop): what the augmentation itself costs;
  baseline:   with --baseline FILE, the TrainStream of that version of spt_dist/data/loader.py (before/after).
Each pipeline runs in `--workers` DataLoader worker(s) (1 thread each: DataLoader sets it; OMP_NUM_THREADS=1),
takes `--warmup` batches (worker start, first shards), then `--batches` timed ones. The pipelines alternate
(order reversed every other repeat) `--repeats` times; the table gives images/s, median and min-max, and the
workers' CPU time (user + system) per image over the timed batches: what the loader costs, much less moved than
images/s by other load on the machine (the load average is printed with it).
Target: ours / plain >= 1.0 (issue 19).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
PIPELINES = ("ours", "plain", "plain_eval")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="whose input size and normalisation")
    parser.add_argument("--size", type=int, default=224, help="px of the synthetic images")
    parser.add_argument("--samples", type=int, default=2048, help="synthetic train samples (enough for one pass "
                        "of the plain pipeline: at least (warmup + batches) x batch size)")
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--shards", help="a directory to keep the shards in (written if it holds none); "
                        "default: a temporary one, removed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer's default")
    parser.add_argument("--warmup", type=int, default=2, help="batches taken before timing")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"some of {', '.join(PIPELINES)}")
    parser.add_argument("--baseline", metavar="FILE", help="another version of spt_dist/data/loader.py: its "
                        "TrainStream is timed too, as `baseline`")
    parser.add_argument("--profile", type=int, metavar="BATCHES",
                        help="instead: profile BATCHES of ours in-process (workers=0) and print the top functions")
    return parser.parse_args(argv)


def make_shards(directory: Path, args: argparse.Namespace) -> list[str]:
    if not (directory / "sizes.json").exists():
        subprocess.run([sys.executable, "-m", "spt_dist.data.shards", "synthetic", "--out", str(directory),
                        "--classes", "10", "--train", str(args.samples), "--test", "0", "--size", str(args.size),
                        "--format", "jpg", "--samples-per-shard", str(args.samples_per_shard)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return sorted(str(p) for p in directory.glob("train-*.tar"))


def transforms(model_name: str):
    from spt_dist.config import DataConfig
    from spt_dist.data.transforms import build_transforms
    from spt_dist.models import create_model
    model = create_model(model_name, 10, device="meta")  # the timm data config, no weights allocated
    return build_transforms(model, DataConfig(augment=True))


def loader_module(path: str):
    """spt_dist/data/loader.py of another version, imported from `path` beside this tree's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("baseline_loader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(shards: list[str], transform, args: argparse.Namespace, workers: int | None = None, module=None):
    if module is None:
        from spt_dist.data import loader as module
    return module.TrainStream(shards, rank=0, world=1, batch_size=args.batch_size, transform=transform, num_classes=10,
                       seed=0, workers=args.workers if workers is None else workers,
                       shuffle_buffer=args.shuffle_buffer)


def plain(shards: list[str], transform, args: argparse.Namespace):
    import webdataset as wds
    from torch.utils.data import DataLoader
    dataset = (wds.WebDataset(shards, shardshuffle=False).shuffle(args.shuffle_buffer).decode("pil")
               .to_tuple("jpg", "cls").map_tuple(transform, int).batched(args.batch_size))
    return DataLoader(dataset, batch_size=None, num_workers=args.workers)


def workers_cpu_s() -> float:
    """CPU time (user + system) of this process's children: the DataLoader workers."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed_run(source, args: argparse.Namespace) -> tuple[float, float]:
    """Images per second over `args.batches` batches after `args.warmup`, and the workers' CPU ms per image
    (what the loader costs whatever else runs on the machine)."""
    it = iter(source)
    try:
        for _ in range(args.warmup):
            next(it)
        images = 0
        cpu, start = workers_cpu_s(), time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
            images += len(batch["labels"] if isinstance(batch, dict) else batch[1])
        elapsed, cpu = time.perf_counter() - start, workers_cpu_s() - cpu
        return images / elapsed, cpu / images * 1e3
    finally:
        if hasattr(it, "close"):
            it.close()  # TrainStream: stops its workers
        del it  # a DataLoader iterator shuts its workers down


def profile(shards: list[str], train_tf, args: argparse.Namespace) -> None:
    import cProfile
    import pstats
    stream = ours(shards, train_tf, args, workers=0)
    next(stream)  # warm-up: first shards, imports
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(lambda: [next(stream) for _ in range(args.profile)])
    elapsed = time.perf_counter() - start
    stream.close()
    n = args.profile * args.batch_size
    print(f"\nours in-process: {args.profile} batches of {args.batch_size}, {elapsed / n * 1e6:.0f} us per sample "
          "under the profiler; top functions by own time (us per sample):")
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]
    print(f"  {'own':>8} {'cumulative':>10} {'calls':>8}  function")
    for (file, line, name), (_, calls, own, cum, _) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"  {own / n * 1e6:8.1f} {cum / n * 1e6:10.1f} {calls:8d}  {name} ({where})")


def main() -> None:
    args = parse_args(sys.argv[1:])
    import torch
    torch.set_num_threads(1)
    chosen = [p.strip() for p in args.pipelines.split(",") if p.strip()] + (["baseline"] if args.baseline else [])
    if unknown := set(chosen) - set(PIPELINES) - {"baseline"}:
        sys.exit(f"--pipelines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PIPELINES)}")
    if any(p.startswith("plain") for p in chosen) and args.samples < (args.warmup + args.batches) * args.batch_size:
        sys.exit("--samples: fewer than the plain pipeline takes in one pass, (warmup + batches) x batch size")
    temp = None if args.shards else tempfile.mkdtemp(prefix="spt_bench_loader_")
    directory = Path(args.shards or temp)
    shards = make_shards(directory, args)
    train_tf, eval_tf = transforms(args.model)
    if args.profile:
        profile(shards, train_tf, args)
    else:
        make = {"ours": lambda: ours(shards, train_tf, args), "plain": lambda: plain(shards, train_tf, args),
                "plain_eval": lambda: plain(shards, eval_tf, args)}
        if args.baseline:
            baseline = loader_module(args.baseline)
            make["baseline"] = lambda: ours(shards, train_tf, args, module=baseline)
        load_before = os.getloadavg()
        rates: dict[str, list[float]] = {p: [] for p in chosen}
        cpu: dict[str, list[float]] = {p: [] for p in chosen}
        for r in range(args.repeats):
            for p in chosen if r % 2 == 0 else chosen[::-1]:
                rate, ms = timed_run(make[p](), args)
                rates[p].append(rate)
                cpu[p].append(ms)
        load_after = os.getloadavg()
        print(f"\nloader: {len(shards)} shards of {args.size} px JPEG / {args.model} transforms / {args.workers} "
              f"worker(s) / batch {args.batch_size} / shuffle buffer {args.shuffle_buffer} / {args.batches} batches "
              f"after {args.warmup} / {args.repeats} repeats")
        base = statistics.median(rates["plain"]) if "plain" in rates else None
        print(f"  {'pipeline':11} {'images/s':>9} {'min-max':>15} {'x plain':>8} {'worker CPU ms/image':>20}  "
              "images/s of each run")
        for p in chosen:
            median = statistics.median(rates[p])
            vs = f"{median / base:8.3f}" if base else " " * 8
            print(f"  {p:11} {median:9.1f} {min(rates[p]):7.1f}-{max(rates[p]):<7.1f} {vs} "
                  f"{statistics.median(cpu[p]):6.2f} ({min(cpu[p]):.2f}-{max(cpu[p]):.2f})  "
                  f"{' '.join(f'{x:.0f}' for x in rates[p])}")
        for other in ("plain", "baseline"):
            if "ours" in rates and other in rates:
                pairs = [o / q for o, q in zip(rates["ours"], rates[other])]
                print(f"  ratio ours/{other} {statistics.median(rates['ours']) / statistics.median(rates[other]):.3f}"
                      f" (per repeat {min(pairs):.3f}-{max(pairs):.3f}, median {statistics.median(pairs):.3f}; "
                      f"worker CPU per image {other}/ours "
                      f"{statistics.median(cpu[other]) / statistics.median(cpu['ours']):.3f})"
                      + ("; target >= 1.0" if other == "plain" else ""))
        print(f"  load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
              f"{' '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} CPUs)")
    if temp:
        subprocess.run(["rm", "-rf", temp], check=False)


if __name__ == "__main__":
    main()
