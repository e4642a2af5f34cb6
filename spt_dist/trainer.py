"""The training run, top to bottom: data -> model -> method -> engine -> train/eval loop -> outputs.

Assembled from small parts: RunSettings (per-rank batch and schedule), the method registry, an Engine, a
CheckpointManager, an Evaluator, RunLogger/Throughput for metrics, and export_weights for the final files.
Every rank runs the same number of micro-steps (the train stream is infinite and the epoch length is computed
from the sample count), so no rank waits in a collective another never reaches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spt_dist import runfiles
from spt_dist.atomic import write_json
from spt_dist.checkpoint import Checkpoint, CheckpointManager, restore_rng, use_sharded
from spt_dist.config import Config, SelectionConfig, get_dotted
from spt_dist.data.dataset import resolve_dataset
from spt_dist.data.loader import FAULT_KINDS, EvalStream, TrainStream, loader_workers, require_shards
from spt_dist.data.transforms import build_transforms
from spt_dist.distributed import DistInfo, all_gather_float, all_reduce_sum
from spt_dist.engines import EngineSpec, build_engine
from spt_dist.errors import Stopped, UserError
from spt_dist.evaluator import Evaluator
from spt_dist.exporter import export_weights
from spt_dist.flops import count_flops, peak_tflops
from spt_dist.methods import get_method
from spt_dist.metrics import THROUGHPUT_KEYS, RunLogger, Throughput, peak_memory_gib, throughput_figures
from spt_dist.models import create_model
from spt_dist.optim import build_scheduler
from spt_dist.peft.allocated import apply_allocation, read_allocation
from spt_dist.peft.baselines import apply_method, format_trainable_parameters, trainable_parameters
from spt_dist.preemption import Preemption, resume_hint
from spt_dist.run_settings import RunSettings
from spt_dist.rundir import open_run
from spt_dist.sample_log import SampleLog
from spt_dist.selection.stage import run_selection

# Keys a resumed run must share with its checkpoint: they decide the frozen weights and what the trainable
# tensors mean (shapes are checked separately). Everything else may change, e.g. engine, world size, max_steps.
_SAME_ON_RESUME = ("seed", "model.name", "model.checkpoint", "model.img_size", "method.name", "method.sparse_update",
                   "method.lora_rank", "method.lora_alpha", "method.lora_targets")
# And for methods that select: what the trained allocation was selected by (the checkpoint carries the allocation
# itself; a config that says otherwise would train one thing and report another).
_SAME_SELECTION = ("method.allocation", *(f"selection.{f.name}" for f in dataclasses.fields(SelectionConfig)
                                          if f.name not in ("micro_batch_size", "checkpoint_every")))
# Keys that fix the order of the training samples: with these (and world size, workers) unchanged, a resume
# continues the data stream exactly where it was.
_SAME_DATA_ORDER = ("seed", "data.train_shards", "data.workers", "data.shuffle_buffer", "data.augment",
                    "data.crop_pct", "optim.grad_accum")
_MAX_SKIPS_IN_A_ROW = 10  # optim.nonfinite=skip: beyond this the weights are likely broken; stop


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _changed(saved: dict, now: dict, keys: tuple[str, ...]) -> list[str]:
    """The dotted config keys whose values differ between two `Config.to_dict()` trees."""
    return [key for key in keys if get_dotted(saved, key) != get_dotted(now, key)]


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo, resume: str | None = None) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.method = get_method(cfg.method.name)
        self.preemption = Preemption()  # first: a signal from here on asks for a clean stop
        # Data first: a missing shard or count is a user error to report before anything heavy is built.
        data = resolve_dataset(cfg.data)
        self.workers = loader_workers(len(data.train_shards), dist_info.world_size, cfg.data.workers)
        require_shards(data.train_shards, dist_info.world_size, self.workers)
        self._data_note = "" if self.workers == cfg.data.workers else \
            f"data.workers: {self.workers} loader worker(s) per rank, not {cfg.data.workers}: " \
            f"{len(data.train_shards)} train shards for {dist_info.world_size} rank(s), each worker reads its own"
        self.num_classes = data.num_classes
        self.settings = RunSettings.resolve(cfg, data.train_samples, dist_info.world_size)

        self.run_dir, checkpoint_dir, skipped = open_run(cfg, dist_info, "train", resume)
        self.checkpoint = Checkpoint.read(checkpoint_dir) if checkpoint_dir else None
        if self.checkpoint:
            self._check_resumable(self.checkpoint)
        elif self.method.selects and cfg.method.allocation is None \
                and not os.path.isfile(os.path.join(self.run_dir, runfiles.ALLOCATION_JSON)):
            # Select first, in this job and run directory; the score pass builds its own model from the same seed.
            run_selection(cfg, dist_info, "select", run_dir=self.run_dir, data=data, resume=resume)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = create_model(cfg.model.name, data.num_classes, checkpoint=cfg.model.checkpoint,
                             img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path_rate)
        self.backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
        self.model = self._apply_method(model)
        resumed_weights = self._load_trainable() if self.checkpoint else None
        self.trainable_report = format_trainable_parameters(self.model)
        self.trainable, self.total_params = trainable_parameters(self.model)
        dense = self.method.selects and cfg.method.sparse_update == "dense_masked"
        self.flops = count_flops(cfg.model.name, data.num_classes, "full" if dense else cfg.method.name,
                                 cfg.model.img_size)
        self.peak_tflops = cfg.output.peak_tflops or peak_tflops(dist_info.device, cfg.engine.precision)
        train_tf, eval_tf = build_transforms(self.model, cfg.data)
        torch.manual_seed(cfg.seed + dist_info.rank)  # per-rank randomness (dropout) from here on

        self.start_step = self.checkpoint.step if self.checkpoint else 0
        exact = self._continues_exactly()
        start_epoch = 0
        if self.checkpoint and not exact:  # a new sharding of the data: begin the epoch the run was in again
            start_epoch = self.checkpoint.state["samples_seen"] // data.train_samples
        common = dict(rank=dist_info.rank, world=dist_info.world_size, num_classes=data.num_classes,
                      workers=self.workers, max_member_mb=cfg.data.max_member_mb,
                      max_image_pixels=cfg.data.max_image_pixels)
        self.train_stream = TrainStream(data.train_shards, transform=train_tf, batch_size=self.settings.batch_size,
                                        seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                        start_epoch=start_epoch, **common)
        self.eval_stream = EvalStream(data.eval_shards, transform=eval_tf, batch_size=cfg.data.eval_batch_size,
                                      **common)

        spec = EngineSpec(engine=cfg.engine, optim=cfg.optim, micro_batch_size=self.settings.batch_size,
                          device=dist_info.device,
                          scheduler=lambda opt: build_scheduler(opt, cfg.optim, self.settings.schedule.total_steps,
                                                                self.settings.schedule.warmup_steps))
        self.engine = build_engine(self.model, spec)
        self.evaluate = Evaluator(self.engine, self.eval_stream, tuple(model.patch_embed.img_size), dist_info.device,
                                  stop=lambda: self.preemption.requested)
        self._eval_result, self._eval_step, self._eval_time = {}, None, 0.0
        self.checkpoints = CheckpointManager(
            self.run_dir, dist_info.rank, every=cfg.output.checkpoint_every,
            every_min=cfg.output.checkpoint_every_min, keep_last=cfg.output.keep_last, files=self.allocation_files,
            saved_step=self.start_step if self.checkpoint else None,
            sharded=use_sharded(cfg.output.checkpoint_format, self.engine, dist_info.world_size))
        self.skipped_steps, self._skips_in_a_row = 0, 0
        self._preempt = self._time_due = False  # agreed by all ranks at each step (_agree_before_update)
        self._resume_note = ""
        if self.checkpoint:
            self._restore(resumed_weights, exact)
            self._resume_note = "\n".join([*skipped, self._resume_note])
        self.log = RunLogger(os.path.join(self.run_dir, runfiles.TENSORBOARD) if dist_info.is_main else None,
                             self.settings.schedule.total_steps, cfg.output.progress,
                             purge_step=self.start_step + 1 if self.checkpoint else None,
                             initial_step=self.start_step)
        self.samples_log = self._open_samples_log()

    # ------------------------------------------------------------------ building and resuming

    def _apply_method(self, model: torch.nn.Module) -> torch.nn.Module:
        method = self.cfg.method
        self.allocation_files: dict[str, bytes] = {}
        if not self.method.selects:
            return apply_method(model, method)
        # Resumed runs train the checkpoint's allocation: it is never selected again.
        directory = self.checkpoint.directory if self.checkpoint else method.allocation or self.run_dir
        record, indices = read_allocation(directory)
        if record["method"] != self.cfg.selection.method:
            raise UserError(f"method.allocation: '{directory}' holds a {record['method']} allocation, "
                            f"method.name {method.name} needs {self.cfg.selection.method}")
        modules = {u.get("decision") for u in record.get("units", [])} & {"lora", "adapter"}
        if modules - {self.method.structured}:
            raise UserError(f"method.allocation: '{directory}' holds {', '.join(sorted(modules))} modules, method.name "
                            f"{method.name} trains {self.method.structured or 'none'} (spt_adapter trains Adapters)")
        for name in (runfiles.ALLOCATION_JSON, runfiles.ALLOCATION_INDICES):  # kept to go into every checkpoint
            with open(os.path.join(directory, name), "rb") as f:
                self.allocation_files[name] = f.read()
        return apply_allocation(model, record, indices, sparse_update=method.sparse_update,
                                dropout=method.lora_dropout, drop_path=method.module_drop_path)

    def _check_resumable(self, checkpoint: Checkpoint) -> None:
        saved, now = checkpoint.state["config"], self.cfg.to_dict()
        changed = _changed(saved, now, _SAME_ON_RESUME + (_SAME_SELECTION if self.method.selects else ()))
        if changed:
            key = changed[0]
            raise UserError(f"{key}: the checkpoint {checkpoint.directory} was written with "
                            f"{get_dotted(saved, key)!r}, this run has {get_dotted(now, key)!r}")

    def _load_trainable(self) -> dict[str, torch.Tensor]:
        """The checkpoint's trainable tensors, into the plain model before any engine wraps it."""
        tensors = self.checkpoint.trainable()
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(tensors) != set(trainable):
            diff = sorted(set(tensors) ^ set(trainable))
            raise UserError(f"--resume: {self.checkpoint.directory} trains other tensors than this run "
                            f"(e.g. '{diff[0]}')")
        with torch.no_grad():
            for name, p in trainable.items():
                if tensors[name].shape != p.shape:
                    raise UserError(f"--resume: '{name}' is {list(tensors[name].shape)} in "
                                    f"{self.checkpoint.directory}, {list(p.shape)} here")
                p.copy_(tensors[name])
        return tensors

    def _continues_exactly(self) -> bool:
        """Whether the data stream and RNG can go on exactly where the checkpoint left them."""
        if not self.checkpoint:
            return False
        state = self.checkpoint.state
        # The per-rank batch as it was resolved (older checkpoints: their config held it in data.batch_size).
        batch = state.get("batch_size", state["config"]["data"]["batch_size"])
        return state["world_size"] == self.dist.world_size and batch == self.settings.batch_size and \
            not _changed(state["config"], self.cfg.to_dict(), _SAME_DATA_ORDER)

    def _restore(self, weights: dict[str, torch.Tensor], exact: bool) -> None:
        checkpoint, engine = self.checkpoint, self.engine
        engine.restore_master_weights(weights)
        optimizer = checkpoint.optimizer()
        if optimizer:
            engine.load_optimizer_state(optimizer, checkpoint.state["optimizer_steps"])
        engine.load_scheduler_state(checkpoint.state["scheduler"])
        self.skipped_steps = checkpoint.state.get("skipped_steps", 0)
        was = checkpoint.state["world_size"]
        change = f"{was} -> {self.dist.world_size} ranks" if was != self.dist.world_size else \
            "another per-rank batch or data order setting"
        if exact:
            rng, rng_json, rank_state = checkpoint.rank_state(self.dist.rank)
            self.train_stream.load_state_dict(rank_state["data"])
            restore_rng(rng, rng_json)
            self._resume_note = f"resumed from {checkpoint.directory} (step {checkpoint.step}): data, RNG and state exactly"
        else:
            self._resume_note = (f"resumed from {checkpoint.directory} (step {checkpoint.step}, {change}): trainable "
                                 "and optimizer state and schedule; the data set is dealt out anew and read from the "
                                 "start of the epoch the run was in")

    def _open_samples_log(self) -> SampleLog | None:
        """output.log_samples: samples/rank_RRRRR.txt, one line per optimizer step (spt_dist.sample_log)."""
        if not self.cfg.output.log_samples:
            return None
        path = os.path.join(self.run_dir, runfiles.SAMPLES, f"rank_{self.dist.rank:05d}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return SampleLog(path, self.start_step if self.checkpoint else None)

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            self.log.write(line)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.preemption.close()
            if self.samples_log:
                self.samples_log.close()

    def _fit(self) -> dict:
        cfg, engine, settings = self.cfg, self.engine, self.settings
        sched = settings.schedule
        tensorboard = os.path.join(self.run_dir, runfiles.TENSORBOARD)
        self._say(f"run directory: {self.run_dir}\ntensorboard:   tensorboard --logdir {shlex.quote(tensorboard)}")
        self._say(f"{cfg.model.name} / {cfg.method.name} / {cfg.engine.kind}"
                  f"{'-zero' + str(cfg.engine.zero_stage) if cfg.engine.kind == 'deepspeed' else ''}"
                  f" / {cfg.engine.precision} / {self.dist.world_size} rank(s): {self.trainable_report}")
        self._say(f"{sched.total_steps} steps ({sched.epochs} epochs of {sched.steps_per_epoch}), "
                  f"global batch {settings.global_batch}")
        if self._data_note:
            self._say(self._data_note)
        if self._resume_note:
            self._say(self._resume_note)
        self.log.text("trainable_parameters", self.trainable_report)
        self.log.scalars({"params/trainable": self.trainable, "params/trainable_pct": 100 * self.trainable / self.total_params}, 0)

        batches = iter(self.train_stream)
        throughput, window_loss, window_count = Throughput(), 0.0, 0
        train_start = time.perf_counter()
        step = self.start_step
        if self.checkpoint and self.checkpoint.state.get("eval_pending") and not self._evaluate(step):
            self._stop(step)  # stopped again, in the evaluation the checkpoint still owes: it stays owed
        engine.train()
        while step < sched.total_steps:
            nonfinite, keys = 0, []
            for micro in range(settings.grad_accum):
                waiting = time.perf_counter()
                batch = next(batches)
                throughput.waited(time.perf_counter() - waiting)
                images = batch["images"].to(self.dist.device, engine.input_dtype, non_blocking=True)
                labels = batch["labels"].to(self.dist.device, non_blocking=True)
                loss = F.cross_entropy(engine.module(images).float(), labels)
                engine.backward(loss)
                value = loss.item()
                if math.isfinite(value):
                    window_loss, window_count = window_loss + value, window_count + 1
                else:
                    nonfinite += 1
                if micro == settings.grad_accum - 1:
                    self._agree_before_update(step + 1, nonfinite)
                engine.step()
                throughput.add(len(labels) * self.dist.world_size)
                keys += batch["keys"]
            step += 1
            if self.samples_log:
                self.samples_log.write(step, keys)
            self.log.progress(1)
            if step % cfg.output.log_every == 0 or step == sched.total_steps:
                # Collective at the same steps on every rank: the loss averaged over ranks and the window.
                loss_sum, count = all_reduce_sum([window_loss, float(window_count)])
                mean_loss = loss_sum / max(count, 1.0)
                rate, data_share = throughput.window()  # rank 0's view: ranks run in lockstep
                self.log.scalars({"train/loss": mean_loss, "train/lr": engine.lr(), "train/skipped_steps": self.skipped_steps,
                                  "perf/peak_memory_gib": peak_memory_gib(self.dist.device),
                                  **self._throughput(rate, data_share, prefix="perf/")}, step)
                self.log.progress(0, {"loss": f"{mean_loss:.4f}", "lr": f"{engine.lr():.2e}", "img/s": f"{rate:.0f}"})
                window_loss, window_count = 0.0, 0
            epoch_end = step % sched.steps_per_epoch == 0
            eval_pending = False
            if step == sched.total_steps or (epoch_end and (step // sched.steps_per_epoch) % cfg.output.eval_every == 0):
                eval_pending = not self._evaluate(step)  # a stop signal came during it: a resume does it again
                self._preempt = self._preempt or eval_pending
            if self.checkpoints.step_due(step) or self._time_due or self._preempt:
                self.save_checkpoint(step, eval_pending)
            if self._preempt:
                self._stop(step)
        train_time = time.perf_counter() - train_start - self._eval_time
        self.train_stream.close()  # stop its loader workers now, not at interpreter exit

        if self.checkpoints.saved_step != step:  # else the loop has just saved this step (or the run resumed at its end)
            self.save_checkpoint(step)
        if self._eval_step != step and not self._evaluate(step):  # resumed at the last step: nothing trained,
            self._stop(step)                                      # but the summary needs an evaluation
        eval_result = self._eval_result
        faults = self._data_faults()
        images = settings.samples_after(step - self.start_step)
        summary = {"steps": step, "epochs": sched.epochs, "world_size": self.dist.world_size,
                   "batch_size_per_rank": settings.batch_size, "global_batch": settings.global_batch,
                   "device": _device_name(self.dist.device), "precision": cfg.engine.precision,
                   "top1": eval_result.get("top1"), "eval_samples": eval_result.get("samples"),
                   "train_time_s": train_time, "eval_time_s": self._eval_time,
                   **(self._throughput(images / train_time, throughput.total_data_wait / train_time) if images else dict.fromkeys(THROUGHPUT_KEYS)),
                   "forward_flops_per_image": self.flops.forward, "train_flops_per_image": self.flops.train,
                   "peak_memory_gib": max(all_gather_float(peak_memory_gib(self.dist.device))),
                   "trainable_params": self.trainable, "total_params": self.total_params,
                   "backbone_params": self.backbone_params,
                   "optimizer_state_bytes": int(all_reduce_sum([float(engine.optimizer_state_bytes())])[0]),
                   "skipped_samples": faults, "skipped_steps": self.skipped_steps,
                   "resumed_from_step": self.start_step if self.checkpoint else None}
        export_weights(engine, self.model, self.run_dir, cfg, self.num_classes, is_main=self.dist.is_main,
                       say=self._say)
        if self.dist.is_main:
            write_json(os.path.join(self.run_dir, runfiles.METRICS), summary)
        self.log.scalars({f"data/skipped_{k}": v for k, v in faults.items()}, step)
        self.log.close()
        rate = "no steps left to train"
        if images:
            rate = (f"{summary['images_per_s']:.1f} images/s ({summary['tflops_per_device']:.3g} TFLOP/s per device"
                    f"{', MFU ' + format(summary['mfu'], '.1%') if summary['mfu'] is not None else ''}, "
                    f"{summary['data_wait_share']:.0%} waiting for data)")
        self._say(f"done: top1 {summary['top1']:.2f}% | {rate} | "
                  f"peak memory {summary['peak_memory_gib']:.2f} GiB/rank | skipped samples {faults or 'none'}\n"
                  f"run directory: {self.run_dir}\ntensorboard:   tensorboard --logdir {shlex.quote(tensorboard)}")
        return summary

    def _evaluate(self, step: int) -> bool:
        """Evaluates and logs the result; False if a stop signal cut the evaluation short (nothing logged)."""
        start = time.perf_counter()
        result = self.evaluate()
        self._eval_time += time.perf_counter() - start
        if result is None:
            return False
        self._eval_result, self._eval_step = result, step
        sched = self.settings.schedule
        self.log.scalars({f"eval/{k}": v for k, v in result.items()}, step)
        self._say(f"epoch {math.ceil(step / sched.steps_per_epoch)}/{sched.epochs} step {step}: top1 "
                  f"{result['top1']:.2f}% ({int(result['samples'])} samples)")
        return True

    def _stop(self, step: int) -> None:
        """Ends a stopped run: its checkpoint at `step` is saved; says how to resume."""
        self.train_stream.close()
        self.log.close()
        checkpoint = self.checkpoints.last or (self.checkpoint.directory if self.checkpoint else None)
        raise Stopped(f"stopped by {self.preemption.received or 'a signal to another rank'} at step {step}: "
                      f"checkpoint {checkpoint}\n{resume_hint(self.run_dir)}")

    def _throughput(self, images_per_s: float, data_share: float, prefix: str = "") -> dict[str, float | None]:
        return throughput_figures(images_per_s, data_share, self.dist.world_size, self.flops.train,
                                  self.peak_tflops, prefix)

    def _agree_before_update(self, step: int, nonfinite: int) -> None:
        """Collective, once per optimizer step, after the last backward and before the update: did any rank
        see a non-finite loss, receive a stop signal, or (rank 0's clock) is a timed checkpoint due."""
        bad, signalled, due = all_reduce_sum([float(nonfinite), float(self.preemption.requested),
                                              float(self.checkpoints.clock_due())])
        self._preempt, self._time_due = signalled > 0, due > 0
        if not bad:
            self._skips_in_a_row = 0
            return
        last = self.checkpoints.last or "none was written"
        if self.cfg.optim.nonfinite == "stop":
            raise UserError(f"optim: the loss became non-finite at step {step} (learning rate too high, bad data "
                            f"or a bad checkpoint?); stopped before its update, nothing saved; last checkpoint: "
                            f"{last} (optim.nonfinite=skip leaves such steps out instead)")
        self.engine.optimizer().skip_next_step = True
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        self._say(f"step {step}: non-finite loss on {int(bad)} micro-batch(es); the update is skipped")
        if self._skips_in_a_row >= _MAX_SKIPS_IN_A_ROW:
            raise UserError(f"optim: the loss was non-finite in {_MAX_SKIPS_IN_A_ROW} steps in a row (up to step "
                            f"{step}): the weights are likely broken; stopped; last checkpoint: {last}")

    def save_checkpoint(self, step: int, eval_pending: bool = False) -> None:
        """`eval_pending`: the evaluation due at this step was cut short by a stop signal; a resume does it first."""
        state = {"world_size": self.dist.world_size, "batch_size": self.settings.batch_size, "eval_pending": eval_pending,
                 "samples_seen": self.settings.samples_after(step),
                 "scheduler": self.engine.scheduler().state_dict(), "skipped_steps": self.skipped_steps,
                 "config": self.cfg.to_dict()}
        self.checkpoints.save(step, self.engine, state, {"data": self.train_stream.state_dict()})

    def _data_faults(self) -> dict[str, int]:
        """Distinct skipped samples per kind: train faults as the union over ranks (a bad sample may be read by
        another rank in another epoch), plus this evaluation's (ranks read disjoint eval shards)."""
        seen = [None] * self.dist.world_size
        dist.all_gather_object(seen, self.train_stream.state_dict()["faults"])
        train = {k: len(set().union(*(rank_faults[k] for rank_faults in seen))) for k in FAULT_KINDS}
        evaluation = all_reduce_sum([float(self.eval_stream.faults()[k]) for k in FAULT_KINDS])
        totals = {k: train[k] + int(e) for k, e in zip(FAULT_KINDS, evaluation)}
        return {k: v for k, v in totals.items() if v}
