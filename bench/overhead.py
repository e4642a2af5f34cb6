"""What each engine costs a PEFT step over a plain PyTorch loop on the same model: time, CPU and memory, 1 rank.

    .venv/bin/python bench/overhead.py                                   # ViT-B/16, LoRA r=8 on q,v, every engine
    .venv/bin/python bench/overhead.py --model vit_test_tiny_patch8_32 --steps 20 --repeats 2
    .venv/bin/python bench/overhead.py --engines zero2,fsdp2 --repeats 5
    .venv/bin/python bench/overhead.py --profile --engines zero2          # where the time goes (cProfile)

The model is built as the trainer builds it (`create_model`, then the method's `apply_method`: LoRA on
`--lora-targets` and the head), with `pretrained=False` and the same seed everywhere. `plain` trains it in a
plain loop: forward, cross-entropy, backward, `torch.optim.AdamW` over the trainable parameters (the same groups
and hyper-parameters as the engines' optimizer, `spt_dist.optim`), `zero_grad(set_to_none=True)`. Each engine
variant (`spt_dist.engines.VARIANTS`) wraps the same model with `build_engine` (its AdamW and cosine schedule,
as the trainer does) and runs the trainer's step: forward, cross-entropy, `engine.backward`, `engine.step`.
All run on the same pre-made in-memory batches (random tensors, fixed seed; no data loading), `--warmup`
untimed steps, then `--steps` timed ones.

Every measurement is its own 1-rank job (`torch.distributed.run --standalone --nproc_per_node=1`, gloo, model
on CPU; the plain loop too), so peak memory is per variant; the variants alternate over `--repeats` rounds
(plain, zero0, ..., plain, zero0, ...), so that load changes on the machine hit all alike. Per variant:
wall time per step (median over the timed steps), CPU time per step (`time.process_time` over the timed
steps, all threads of the process), peak resident set (`ru_maxrss`: includes the runtime and imports, e.g.
DeepSpeed's), and the resident-set growth from just before the model and engine are built to the end.
The table gives the median over rounds and the min-max, and each engine's ratio to the plain loop of the same
round (median over rounds). Target (issue 19): <= 1.02x in step time and CPU time, for every engine.
OMP_NUM_THREADS defaults to 1 (set it to use more threads per process). On a busy machine rounds differ by a few
per cent: a 2 % question needs several rounds (`--repeats 5`); an engine's fixed cost per step (hooks,
bookkeeping, collectives) shows best on the tiny model with many steps (`--model vit_test_tiny_patch8_32
--steps 200`), its cost per parameter at ViT-B, and `--profile` says which functions it is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selection import run_worker  # bench/selection.py: this script's folder is first on sys.path

PLAIN = "plain"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from spt_dist.engines import VARIANTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--method", default="lora", choices=["lora", "linear", "full"],
                        help="a baseline method (spt_lora/gps need an allocation: not measured here)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", default="q,v")
    parser.add_argument("--classes", type=int, default=100, help="the head's classes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="distinct pre-made batches, used in turn")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (ZeRO-3 records its module trace in the first step and settles in "
                             "the third: fewer would time that)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--engines", default=",".join(VARIANTS),
                        help=f"comma-separated engine variants ({', '.join(VARIANTS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: one round under cProfile, the top functions of each variant")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in args.engines if e not in VARIANTS]
    if unknown:
        parser.error(f"--engines: unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return args


# ---------------------------------------------------------------------------------------------------------
# The worker: one 1-rank job per measurement.

def _proc_status() -> dict[str, float]:
    """This process's resident set now, in MiB: total and its anonymous, file-backed and shared-memory parts."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant: str, work: Path) -> None:
    opts = json.loads((work / "options.json").read_text())
    from spt_dist.distributed import init_distributed, shutdown_distributed
    info = init_distributed(600)
    try:
        result = measure(variant, opts, info)
    finally:
        shutdown_distributed()
    (work / f"{variant}.json").write_text(json.dumps(result))


def measure(variant: str, opts: dict, info) -> dict:
    import torch
    import torch.nn.functional as F

    from spt_dist.config import EngineConfig, MethodConfig, OptimConfig
    from spt_dist.engines import ENGINE_SETTINGS, EngineSpec, build_engine
    from spt_dist.models import create_model
    from spt_dist.optim import build_scheduler, param_groups
    from spt_dist.peft.baselines import apply_method
    if variant != PLAIN:  # imported before the baseline: the import shows in the peak, not in the growth
        kind = "deepspeed" if ENGINE_SETTINGS[variant]["kind"] == "deepspeed" else "fsdp"
        importlib.import_module(f"spt_dist.engines.{kind}_engine")
    rss_imported = _proc_status()["VmRSS"]

    # The same batches in every job: seeded random images of the model's size, labels over the classes.
    img_size = create_model(opts["model"], opts["classes"], device="meta").patch_embed.img_size
    g = torch.Generator().manual_seed(opts["seed"])
    batch = opts["batch_size"]
    batches = [(torch.randn(batch, 3, *img_size, generator=g), torch.randint(0, opts["classes"], (batch,), generator=g))
               for _ in range(opts["batches"])]

    method = MethodConfig(name=opts["method"], lora_rank=opts["lora_rank"], lora_targets=opts["lora_targets"])
    optim = OptimConfig(max_steps=opts["warmup"] + opts["steps"])
    rss_base = _proc_status()["VmRSS"]
    torch.manual_seed(opts["seed"])
    model = apply_method(create_model(opts["model"], opts["classes"]), method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if variant == PLAIN:
        model.to(info.device).train()
        batches = [(x.to(info.device), y.to(info.device)) for x, y in batches]
        optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                                      eps=optim.eps, foreach=False)  # as spt_dist.optim.build_optimizer

        def step(images, labels) -> None:
            loss = F.cross_entropy(model(images).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        spec = EngineSpec(engine=EngineConfig(**ENGINE_SETTINGS[variant]), optim=optim, micro_batch_size=batch,
                          device=info.device,
                          scheduler=lambda opt: build_scheduler(opt, optim, optim.max_steps, 1))
        engine = build_engine(model, spec)
        engine.train()
        batches = [(x.to(info.device, engine.input_dtype), y.to(info.device)) for x, y in batches]

        def step(images, labels) -> None:  # the trainer's step, without its bookkeeping
            loss = F.cross_entropy(engine.module(images).float(), labels)
            engine.backward(loss)
            engine.step()
    rss_built = _proc_status()["VmRSS"]

    for i in range(opts["warmup"]):
        step(*batches[i % len(batches)])
    profiler = None
    if opts["profile"]:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    times = []
    sync()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for i in range(opts["steps"]):
        start = time.perf_counter()
        step(*batches[(opts["warmup"] + i) % len(batches)])
        sync()
        times.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu_start
    wall = time.perf_counter() - wall_start
    if profiler:
        profiler.disable()
    status = _proc_status()
    result = {"variant": variant, "step_s": statistics.median(times), "step_all_s": times, "cpu_s": cpu / opts["steps"],
              "wall_s": wall / opts["steps"], "peak_mib": _peak_rss_mib(), "rss_imported_mib": rss_imported,
              "rss_base_mib": rss_base, "rss_built_mib": rss_built, "rss_end_mib": status["VmRSS"],
              "growth_mib": status["VmRSS"] - rss_base, "status": status, "trainable": trainable, "total": total,
              "threads": torch.get_num_threads()}
    if profiler:
        import io
        import pstats
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(opts["profile_top"])
        stats.sort_stats("cumtime").print_stats(opts["profile_top"])
        result["profile"] = text.getvalue()
    return result


# ---------------------------------------------------------------------------------------------------------
# The driver: one job per variant and round, then the table.

def run_variant(variant: str, work: Path) -> dict:
    # Only --worker and --work go through torch.distributed.run's command line (options it could mistake for
    # abbreviations of its own, like --nproc, stay out of it); the rest is in options.json.
    return run_worker(__file__, variant, 1, work, [])


def _span(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def print_table(args: argparse.Namespace, rounds: list[dict[str, dict]], loads: list[float]) -> None:
    variants = list(rounds[0])
    first = rounds[0][PLAIN]
    print(f"\n{args.model} / {args.method}"
          f"{f' r={args.lora_rank} on {args.lora_targets}' if args.method == 'lora' else ''} / "
          f"{first['trainable']:,} of {first['total']:,} parameters train / batch {args.batch_size} / 1 rank, "
          f"{first['threads']} thread(s) / {args.steps} timed steps after {args.warmup} / {len(rounds)} round(s)")
    print("step: median wall time per step; cpu: process CPU time per step; x plain: the ratio to the same round's "
          "plain loop (median over rounds; target <= 1.02)\npeak: peak resident set; growth: resident set from before "
          "the model and engine are built to the end; MiB")
    header = (f"{'variant':8} {'step s [min-max]':>22} {'x plain':>8} {'cpu s [min-max]':>22} {'x plain':>8} "
              f"{'peak':>7} {'+plain':>7} {'growth':>7} {'+plain':>7}")
    print(header)
    plain_peak = statistics.median(r[PLAIN]["peak_mib"] for r in rounds)
    plain_growth = statistics.median(r[PLAIN]["growth_mib"] for r in rounds)
    for v in variants:
        step = [r[v]["step_s"] for r in rounds]
        cpu = [r[v]["cpu_s"] for r in rounds]
        step_ratio = statistics.median(r[v]["step_s"] / r[PLAIN]["step_s"] for r in rounds)
        cpu_ratio = statistics.median(r[v]["cpu_s"] / r[PLAIN]["cpu_s"] for r in rounds)
        peak = statistics.median(r[v]["peak_mib"] for r in rounds)
        growth = statistics.median(r[v]["growth_mib"] for r in rounds)
        print(f"{v:8} {_span(step, '.4f'):>22} {step_ratio:8.3f} {_span(cpu, '.4f'):>22} {cpu_ratio:8.3f} "
              f"{peak:7.0f} {peak - plain_peak:+7.0f} {growth:7.0f} {growth - plain_growth:+7.0f}")
    print(f"load average (1 min) at each round's end: {', '.join(f'{x:.2f}' for x in loads)} on {os.cpu_count()} CPUs")


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.worker:
        return worker(args.worker, Path(args.work))
    work = Path(tempfile.mkdtemp(prefix="spt_bench_overhead_"))
    options = {k: getattr(args, k) for k in ("model", "method", "lora_rank", "classes", "batch_size", "batches",
                                             "warmup", "steps", "seed", "profile", "profile_top")}
    options["lora_targets"] = args.lora_targets.split(",")
    (work / "options.json").write_text(json.dumps(options))
    variants = [PLAIN, *args.engines]
    rounds, loads = [], []
    for i in range(1 if args.profile else args.repeats):
        rounds.append({})
        for v in variants:
            rounds[-1][v] = r = run_variant(v, work)
            print(f"round {i + 1}: {v:6} step {r['step_s']:.4f} s, cpu {r['cpu_s']:.4f} s, "
                  f"peak {r['peak_mib']:.0f} MiB, growth {r['growth_mib']:.0f} MiB", flush=True)
        loads.append(os.getloadavg()[0])
    if args.profile:
        for v in variants:
            print(f"\n===== {v}: cProfile over {args.steps} steps =====\n{rounds[0][v]['profile']}")
    print_table(args, rounds, loads)
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
