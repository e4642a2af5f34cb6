"""One check of the whole product on one GPU, in at most ~8 minutes on an H100/H200 (`bench/gpu_check.sh`).

    bash bench/gpu_check.sh                 # GPU: ViT-L/16, bf16, 1 GPU
    bash bench/gpu_check.sh --smoke         # CPU (the default without CUDA): the tiny ViT, the same steps

What runs, each as a real job of the product on one device (`launch/train.py` or bench/selection.py's workers):
- the SPT and GPS selections (`--stage select`: score pass + allocation), then training steps under ZeRO-2,
  ZeRO-3 and FSDP2 for full fine-tuning, LoRA (rank 8 on q, v), SPT-LoRA (at LoRA's budget) and GPS (K = 1);
- the score pass against the same number of plain forward+backward steps (ZeRO-3 and FSDP2, fp32 as the
  reference scores), and the SPT allocation against one read of the local scores (bench/selection.py);
- a checkpoint save and resume: SPT-LoRA under ZeRO-2, 2N steps with a checkpoint at N, then the run copied
  and resumed from step N; the resumed run must read the same samples and end with the same weights
  (bit for bit on CPU; on CUDA the largest difference is printed and must stay within bf16 rounding).
The table gives images/s (training only, first steps included), MFU (train FLOPs per image from
spt_dist.flops x images/s / `--peak-tflops`), peak allocated memory (CPU: resident set) and the ratios the CPU
benches print. Every job has a timeout and a failure makes its row FAILED; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This checkout's spt_dist, here and in every job (an installed copy elsewhere must not answer for it).
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
_spec = importlib.util.spec_from_file_location("bench_selection", REPO / "bench" / "selection.py")
selection_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection_bench)

METHODS = ("full", "lora", "spt_lora", "gps")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the CPU version: tiny ViT, few steps (default without CUDA)")
    parser.add_argument("--model", help="default: vit_large_patch16_224 (smoke: vit_test_tiny_patch8_32)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, help="per device; default 32 (smoke: 8)")
    parser.add_argument("--steps", type=int, help="training steps per row; default 30 (smoke: 3)")
    parser.add_argument("--resume-steps", type=int, help="N of the resume check; default 4 (smoke: 2)")
    parser.add_argument("--workers", type=int, help="loader workers; default 8 (smoke: 1)")
    parser.add_argument("--engines", default="zero2,zero3,fsdp2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense peak TFLOP/s at --precision (default: H100/H200 SXM bf16)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="wall-clock budget: parts not started by then are skipped (and say so)")
    parser.add_argument("--job-timeout-s", type=float, default=240.0)
    parser.add_argument("--work", help="working directory (default: a new temporary one, removed at the end)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--in-process", action="store_true",
                        help="run every job in this process, one after the other (CPU smoke only: the quick CI "
                             "version; peak memory is then the process's)")
    args = parser.parse_args(argv)
    import torch
    args.cuda = torch.cuda.is_available() and not args.smoke
    args.smoke = not args.cuda
    if args.in_process and args.cuda:
        parser.error("--in-process is for the CPU smoke version: on a GPU every job runs in its own process")
    big = not args.smoke
    args.model = args.model or ("vit_large_patch16_224" if big else "vit_test_tiny_patch8_32")
    args.batch_size = args.batch_size or (32 if big else 8)
    args.steps = args.steps or (30 if big else 3)
    args.resume_steps = args.resume_steps or (4 if big else 2)
    args.workers = args.workers if args.workers is not None else (8 if big else 0 if args.in_process else 1)
    if args.in_process and args.workers:
        parser.error("--in-process runs without loader workers (--workers 0): each job's would outlive it")
    return args


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="spt_gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.failures: list[str] = []
        self.results: dict = {"model": args.model, "precision": args.precision, "batch_size": args.batch_size,
                              "device": "cuda" if args.cuda else "cpu", "train": {}, "ratios": {}}
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)  # each job forms its own one-process world
        if not args.cuda:
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def time_left(self) -> bool:
        return time.monotonic() - self.start < self.args.budget_s

    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {line}", flush=True)

    def fail(self, what: str, why: str) -> None:
        self.failures.append(f"{what}: {why}")
        self.say(f"FAILED {what}: {why}")

    # ----------------------------------------------------------------------------------------- jobs

    def shards(self) -> None:
        a = self.args
        samples = a.batch_size * (max(a.steps, 2 * a.resume_steps) + 2)  # within one epoch: no mid-run evaluation
        workers = max(a.workers, 1)
        per_shard = math.ceil(samples / (2 * workers))  # 2 train shards per loader worker, 1 eval shard
        out = self.work / "shards"
        subprocess.run([sys.executable, "-m", "spt_dist.data.shards", "synthetic", "--out", str(out),
                        "--classes", "10", "--train", str(2 * workers * per_shard), "--test", str(workers * per_shard),
                        "--size", "224" if a.cuda else "32", "--samples-per-shard", str(per_shard)],
                       check=True, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL)

        def pattern(split: str) -> str:
            count = len(list(out.glob(f"{split}-*.tar")))
            return f"{out}/{split}-{{000000..{count - 1:06d}}}.tar"
        self.train_pattern, self.eval_pattern = pattern("train"), pattern("test")

    def common(self, steps: int) -> list[str]:
        a = self.args
        return ["--config", "configs/demo.yaml", f"model.name={a.model}", f"engine.precision={a.precision}",
                f"data.batch_size={a.batch_size}", f"data.eval_batch_size={a.batch_size}", f"data.workers={a.workers}",
                "data.augment=true", f"data.train_shards={self.train_pattern}", f"data.eval_shards={self.eval_pattern}",
                f"optim.max_steps={steps}", "optim.warmup_epochs=0", "optim.grad_clip=1.0", "output.progress=false",
                f"output.log_every={steps}", "output.checkpoint_every=0", "output.eval_every=1000",
                f"output.dir={self.work}/runs", f"selection.batch_size={a.batch_size}", "selection.batches=2"]

    def job(self, name: str, overrides: list[str], stage: str = "train", resume: str | None = None) -> Path | None:
        argv = ["--stage", stage, *overrides, f"output.name={name}", *(["--resume", resume] if resume else [])]
        log = self.work / f"{name}.log"
        self.say(f"{name} ...")
        started = time.monotonic()
        code = self._in_process(argv, log) if self.args.in_process else self._subprocess(argv, log)
        if code != 0:
            self.fail(name, f"exit {code}; {log} ends:\n" + log.read_text()[-2000:])
            return None
        self.say(f"{name}: {time.monotonic() - started:.1f} s")
        return self.work / "runs" / name

    def _subprocess(self, argv: list[str], log: Path) -> int | str:
        try:
            with open(log, "w") as out:
                return subprocess.run([sys.executable, "launch/train.py", *argv], cwd=REPO, env=self.env, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=self.args.job_timeout_s).returncode
        except subprocess.TimeoutExpired:
            return "timeout"

    @staticmethod
    def _in_process(argv: list[str], log: Path) -> int | str:
        from spt_dist import distributed, preemption
        from spt_dist.train import main as train_main
        cwd, shutdown = os.getcwd(), distributed.shutdown_distributed
        try:
            os.chdir(REPO)
            # One process group for every job: DeepSpeed keeps its groups in module globals, which a destroyed
            # and re-created process group would leave dangling. `main` ends the group at the end.
            distributed.shutdown_distributed = lambda wait=True: None
            # Its output goes to this process's (redirecting it would leave DeepSpeed's log handlers on closed files).
            return train_main(argv)
        except Exception as e:  # noqa: BLE001 - a failed job is a FAILED row, the others still run
            with open(log, "w") as out:
                out.write("".join(traceback.format_exception(e)))
            return f"{type(e).__name__}: {e}"
        finally:
            os.chdir(cwd)
            distributed.shutdown_distributed = shutdown
            preemption.uninstall()

    def selections(self) -> dict[str, Path | None]:
        from spt_dist.config import MethodConfig
        from spt_dist.models import create_model
        from spt_dist.peft.baselines import apply_method, trainable_parameters
        a = self.args
        model = apply_method(create_model(a.model, 10, device="meta"),
                             MethodConfig(name="lora", lora_rank=8, lora_targets=["q", "v"]))
        self.lora_budget = trainable_parameters(model)[0] - sum(p.numel() for p in model.get_classifier().parameters())
        base = [*self.common(1), "engine.kind=deepspeed", "engine.zero_stage=3"]
        out = {}
        # Always: the resume check trains SPT-LoRA.
        out["spt"] = self.job("select-spt", [*base, "method.name=spt_lora", f"selection.budget={self.lora_budget}"],
                              stage="select")
        if "gps" in a.methods.split(","):
            out["gps"] = self.job("select-gps", [*base, "method.name=gps", "selection.loss=ce", "selection.k=1"],
                                  stage="select")
        return out

    def method_overrides(self, method: str, selections: dict) -> list[str] | None:
        if method == "full":
            return ["method.name=full"]
        if method == "lora":
            return ["method.name=lora", "method.lora_rank=8", "method.lora_targets=[q,v]"]
        key = "gps" if method == "gps" else "spt"
        if selections.get(key) is None:
            return None
        extra = ["optim.weight_decay=0"] if method == "gps" else []
        return [f"method.name={method}", f"method.allocation={selections[key]}", *extra]

    def training(self, selections: dict) -> None:
        from spt_dist.engines import VARIANTS
        a = self.args
        for engine in a.engines.split(","):
            for method in a.methods.split(","):
                name = f"train-{engine}-{method}"
                overrides = self.method_overrides(method, selections)
                if overrides is None:
                    self.fail(name, "its selection failed")
                    continue
                if not self.time_left():
                    self.fail(name, "skipped: out of --budget-s")
                    continue
                run = self.job(name, [*self.common(a.steps), *VARIANTS[engine], *overrides])
                if run is None:
                    continue
                m = json.loads((run / "metrics.json").read_text())
                mfu = m["images_per_s"] * m["train_flops_per_image"] / (a.peak_tflops * 1e12) if a.cuda else None
                self.results["train"][(engine, method)] = {
                    "images_per_s": m["images_per_s"], "mfu": mfu, "peak_gib": m["peak_memory_gib"],
                    "data_wait": m["data_wait_share"], "trainable": m["trainable_params"]}

    def selection_part(self, part: str, engine: str = "zero3") -> dict | None:
        """bench/selection.py's score or allocation part as a one-rank job on this device."""
        a = self.args
        work = self.work / f"selection-{part}-{engine}"
        work.mkdir(exist_ok=True)
        batches = 2 if a.smoke else 3
        options = ["--model", a.model, "--engine", engine, "--batch-size", str(a.batch_size), "--batches", str(batches),
                   "--repeats", "2" if a.smoke else "3", "--alloc-model", a.model, "--budget", "0.005"]
        bench_args = selection_bench.parse_args(options)
        bench_args.nproc = 1
        try:
            if part == "score":
                selection_bench.make_score_shards(work, a.batch_size * batches, 224 if a.cuda else 32)
            started = time.monotonic()
            if a.in_process:
                result = self._selection_in_process(part, bench_args, work)
            else:
                result = selection_bench.run_part(part, bench_args, work, options)
            self.say(f"{part} ({engine}): {time.monotonic() - started:.1f} s")
            return result
        except (SystemExit, subprocess.CalledProcessError) as e:
            self.fail(f"{part} pass ({engine})", str(e)[-2000:])
            return None

    def _selection_in_process(self, part: str, bench_args: argparse.Namespace, work: Path) -> dict | None:
        from spt_dist.distributed import init_distributed
        bench_args.work = str(work)
        cwd = os.getcwd()
        try:
            os.chdir(REPO)
            info = init_distributed(600)
            worker = selection_bench.score_worker if part == "score" else selection_bench.allocation_worker
            return worker(bench_args, info)
        except Exception as e:  # noqa: BLE001 - a failed part is a FAILED row
            self.fail(f"{part} pass", "".join(traceback.format_exception(e))[-2000:])
            return None
        finally:
            os.chdir(cwd)

    def ratios(self) -> None:
        r = self.results["ratios"]
        for engine in self.args.engines.split(","):
            if not self.time_left():
                self.fail(f"score pass ({engine})", "skipped: out of --budget-s")
                continue
            if engine in ("zero3", "fsdp2"):
                s = self.selection_part("score", engine)
                if s:
                    r[f"score pass / plain steps ({engine}, fp32)"] = (min(s["score_s"]) / min(s["plain_s"]),
                                                                        "target <= 1.02")
        if self.time_left():
            s = self.selection_part("allocation")
            if s:
                r[f"allocation / one read ({s['local']:,} scores, budget 0.5 %)"] = (s["alloc_s"] / s["read_s"],
                                                                                   "target <= 3")
        train = self.results["train"]
        for engine in self.args.engines.split(","):
            if (engine, "lora") in train and (engine, "spt_lora") in train:
                r[f"SPT-LoRA step / LoRA step ({engine})"] = (
                    train[(engine, "lora")]["images_per_s"] / train[(engine, "spt_lora")]["images_per_s"], "target <= 1.15")

    def resume_check(self, selections: dict) -> None:
        import torch
        from safetensors.torch import load_file
        a = self.args
        n = a.resume_steps
        if selections.get("spt") is None or not self.time_left():
            self.fail("resume", "no SPT selection" if selections.get("spt") is None else "skipped: out of --budget-s")
            return
        overrides = [*self.common(2 * n), "engine.kind=deepspeed", "engine.zero_stage=2", "method.name=spt_lora",
                     f"method.allocation={selections['spt']}", f"output.checkpoint_every={n}", "output.keep_last=0",
                     "output.log_samples=true"]
        whole = self.job("resume-whole", overrides)
        if whole is None:
            return
        # The resumed run: a copy of the whole run as it stood at step N (its checkpoint, its first N sample lines).
        resumed = self.work / "runs" / "resume-cut"
        shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns(f"step_{2 * n:08d}", "metrics.json",
                                                                       "model.safetensors", ".lock"))
        self.job("resume-cut", overrides, resume=str(resumed / "checkpoints" / f"step_{n:08d}"))
        if not (resumed / "model.safetensors").is_file():
            return
        expected, got = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
        diff = max(((expected[k].float() - got[k].float()).abs().max().item() for k in expected), default=0.0)
        scale = max((v.float().abs().max().item() for v in expected.values()), default=1.0)
        same_keys = expected.keys() == got.keys()
        samples = sorted((whole / "samples").glob("rank_*.txt"))
        same_samples = bool(samples) and all(
            (resumed / "samples" / f.name).read_text() == f.read_text() for f in samples)
        bitwise = same_keys and all(torch.equal(expected[k], got[k]) for k in expected)
        ok = same_keys and same_samples and (bitwise or (a.cuda and diff <= 1e-2 * scale))
        text = (f"{'exact' if bitwise else f'max |diff| {diff:.3g} (weights up to {scale:.3g})'}, "
                f"samples {'identical' if same_samples else 'DIFFER'}")
        self.results["resume"] = {"ok": ok, "bitwise": bitwise, "max_diff": diff, "same_samples": same_samples}
        self.say(f"resume at step {n} of {2 * n}: {text}")
        if not ok:
            self.fail("resume", text)

    # ----------------------------------------------------------------------------------------- table

    def table(self) -> str:
        a = self.args
        lines = [f"\n{a.model} / {a.precision} / 1 {'GPU' if a.cuda else 'CPU process (smoke)'} / batch {a.batch_size}"
                 f" / {a.steps} steps per row / MFU against {a.peak_tflops:g} TFLOP/s"
                 + (f" / SPT budget = LoRA's {self.lora_budget:,}" if hasattr(self, "lora_budget") else ""),
                 f"{'engine':7} {'method':9} {'images/s':>9} {'MFU':>6} {'peak GiB':>9} {'step/lora':>9} "
                 f"{'data wait':>9} {'trainable':>12}"]
        train = self.results["train"]
        for engine in a.engines.split(","):
            for method in a.methods.split(","):
                t = train.get((engine, method))
                if t is None:
                    lines.append(f"{engine:7} {method:9} {'FAILED':>9}")
                    continue
                lora = train.get((engine, "lora"))
                rel = f"{lora['images_per_s'] / t['images_per_s']:9.2f}" if lora else f"{'-':>9}"
                mfu = f"{t['mfu']:6.1%}" if t["mfu"] is not None else f"{'-':>6}"
                lines.append(f"{engine:7} {method:9} {t['images_per_s']:9.1f} {mfu} {t['peak_gib']:9.2f} {rel} "
                             f"{t['data_wait']:9.0%} {t['trainable']:12,}")
        lines.append("ratios (side by side in one job each):")
        for what, (value, target) in self.results["ratios"].items():
            lines.append(f"  {what:58} {value:7.3f} x   ({target})")
        res = self.results.get("resume")
        lines.append("checkpoint save + resume (SPT-LoRA, ZeRO-2): " + (
            "FAILED" if res is None else f"{'exact' if res['bitwise'] else 'max |diff| %.3g' % res['max_diff']}, samples "
            f"{'identical' if res['same_samples'] else 'DIFFER'} -> {'ok' if res['ok'] else 'FAILED'}"))
        lines.append(f"total {time.monotonic() - self.start:.0f} s; "
                     f"{'all checks passed' if not self.failures else f'{len(self.failures)} FAILED'}; "
                     f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check = Check(args)
    check.say(f"{'GPU' if args.cuda else 'CPU smoke'} check in {check.work}")
    check.shards()
    selections = check.selections()
    check.training(selections)
    check.ratios()
    check.resume_check(selections)
    print(check.table(), flush=True)
    if args.json:
        out = dict(check.results, train={f"{e}/{m}": v for (e, m), v in check.results["train"].items()},
                   ratios={k: v[0] for k, v in check.results["ratios"].items()}, failures=check.failures)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.work:
        shutil.rmtree(check.work, ignore_errors=True)
    if args.in_process:
        from spt_dist.distributed import shutdown_distributed
        shutdown_distributed()
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
