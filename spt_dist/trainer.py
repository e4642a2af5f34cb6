"""The training run, top to bottom: data -> model -> method -> engine -> train/eval loop -> outputs.

Every rank runs the same number of micro-steps (the train stream is infinite and the epoch length is
computed from the sample count), so no rank waits in a collective another never reaches.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spt_dist.atomic import write_json, write_safetensors
from spt_dist.config import Config
from spt_dist.data.dataset import resolve_dataset
from spt_dist.data.loader import FAULT_KINDS, EvalStream, TrainStream
from spt_dist.data.transforms import build_transforms
from spt_dist.distributed import DistInfo, all_gather_float, all_reduce_sum
from spt_dist.engines import EngineSpec, build_engine
from spt_dist.errors import UserError
from spt_dist.metrics import RunLogger, Throughput, peak_memory_gib
from spt_dist.models import create_model
from spt_dist.optim import build_scheduler
from spt_dist.peft.allocated import apply_allocation, read_allocation
from spt_dist.peft.artifact import load_pretrained, merged_state_dict, save_pretrained
from spt_dist.peft.baselines import apply_method, format_trainable_parameters, trainable_parameters
from spt_dist.rundir import prepare_run_dir
from spt_dist.selection.report import ALLOCATION_JSON
from spt_dist.selection.stage import run_selection

PEFT_METHODS = ("spt_lora", "spt_adapter", "gps")


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    epochs: int

    @classmethod
    def plan(cls, cfg: Config, train_samples: int, world_size: int) -> "Schedule":
        global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world_size
        steps_per_epoch = train_samples // global_batch
        if steps_per_epoch == 0:
            raise UserError(f"data.batch_size: a global batch of {global_batch} (batch_size x grad_accum x "
                            f"{world_size} ranks) is larger than the {train_samples} training samples")
        total = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
        warmup = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total - 1)
        return cls(steps_per_epoch, total, warmup, math.ceil(total / steps_per_epoch))


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        # Data first: a missing shard or count is a user error to report before anything heavy is built.
        data = resolve_dataset(cfg.data)
        self.train_shards, self.eval_shards, num_classes = data.train_shards, data.eval_shards, data.num_classes
        self.num_classes = num_classes
        self.schedule = Schedule.plan(cfg, data.train_samples, dist_info.world_size)

        self.run_dir = prepare_run_dir(cfg, dist_info, "train")

        if cfg.method.name in PEFT_METHODS and cfg.method.allocation is None \
                and not os.path.isfile(os.path.join(self.run_dir, ALLOCATION_JSON)):
            # Select first, in this job and run directory; the score pass builds its own model from the same seed.
            run_selection(cfg, dist_info, "select", run_dir=self.run_dir, data=data)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = create_model(cfg.model.name, num_classes, checkpoint=cfg.model.checkpoint,
                             img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path_rate)
        self.model = self._apply_method(model)
        self.input_size = tuple(model.patch_embed.img_size)
        self.trainable_report = format_trainable_parameters(self.model)
        self.trainable, self.total_params = trainable_parameters(self.model)
        train_tf, eval_tf = build_transforms(self.model, cfg.data)
        torch.manual_seed(cfg.seed + dist_info.rank)  # per-rank randomness (dropout) from here on

        common = dict(rank=dist_info.rank, world=dist_info.world_size, num_classes=num_classes, workers=cfg.data.workers)
        self.train_stream = TrainStream(self.train_shards, transform=train_tf, batch_size=cfg.data.batch_size,
                                        seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, **common)
        self.eval_stream = EvalStream(self.eval_shards, transform=eval_tf, batch_size=cfg.data.eval_batch_size, **common)

        spec = EngineSpec(engine=cfg.engine, optim=cfg.optim, micro_batch_size=cfg.data.batch_size,
                          device=dist_info.device,
                          scheduler=lambda opt: build_scheduler(opt, cfg.optim, self.schedule.total_steps,
                                                                self.schedule.warmup_steps))
        self.engine = build_engine(self.model, spec)
        self.log = RunLogger(os.path.join(self.run_dir, "tb") if dist_info.is_main else None,
                             self.schedule.total_steps, cfg.output.progress)

    def _apply_method(self, model: torch.nn.Module) -> torch.nn.Module:
        method = self.cfg.method
        if method.name not in PEFT_METHODS:
            return apply_method(model, method)
        directory = method.allocation or self.run_dir
        record, indices = read_allocation(directory)
        if record["method"] != self.cfg.selection.method:
            raise UserError(f"method.allocation: '{directory}' holds a {record['method']} allocation, "
                            f"method.name {method.name} needs {self.cfg.selection.method}")
        return apply_allocation(model, record, indices, sparse_update=method.sparse_update,
                                dropout=method.lora_dropout)

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            self.log.write(line)

    def fit(self) -> dict:
        cfg, sched, engine = self.cfg, self.schedule, self.engine
        self._say(f"run directory: {self.run_dir}\ntensorboard:   tensorboard --logdir {os.path.join(self.run_dir, 'tb')}")
        self._say(f"{cfg.model.name} / {cfg.method.name} / {cfg.engine.kind}"
                  f"{'-zero' + str(cfg.engine.zero_stage) if cfg.engine.kind == 'deepspeed' else ''}"
                  f" / {cfg.engine.precision} / {self.dist.world_size} rank(s): {self.trainable_report}")
        self._say(f"{sched.total_steps} steps ({sched.epochs} epochs of {sched.steps_per_epoch}), "
                  f"global batch {cfg.data.batch_size * cfg.optim.grad_accum * self.dist.world_size}")
        self.log.text("trainable_parameters", self.trainable_report)
        self.log.scalars({"params/trainable": self.trainable, "params/trainable_pct": 100 * self.trainable / self.total_params}, 0)

        batches = iter(self.train_stream)
        throughput, window_loss, window_steps = Throughput(), 0.0, 0
        train_start, eval_time, eval_result, step = time.perf_counter(), 0.0, {}, 0
        engine.train()
        for epoch in range(sched.epochs):
            for _ in range(min(sched.steps_per_epoch, sched.total_steps - step)):
                for _ in range(cfg.optim.grad_accum):
                    batch = next(batches)
                    images = batch["images"].to(self.dist.device, engine.input_dtype, non_blocking=True)
                    labels = batch["labels"].to(self.dist.device, non_blocking=True)
                    loss = F.cross_entropy(engine.module(images).float(), labels)
                    engine.backward(loss)
                    engine.step()
                    window_loss += loss.item() / cfg.optim.grad_accum
                    throughput.add(len(labels) * self.dist.world_size)
                step += 1
                window_steps += 1
                self.log.progress(1)
                if step % cfg.output.log_every == 0 or step == sched.total_steps:
                    # Collective at the same steps on every rank: the loss averaged over ranks and the window.
                    loss_sum, = all_reduce_sum([window_loss])
                    mean_loss = loss_sum / (window_steps * self.dist.world_size)
                    rate = throughput.rate()
                    self.log.scalars({"train/loss": mean_loss, "train/lr": engine.lr(), "perf/images_per_s": rate,
                                      "perf/images_per_s_per_rank": rate / self.dist.world_size,
                                      "perf/peak_memory_gib": peak_memory_gib(self.dist.device)}, step)
                    self.log.progress(0, {"loss": f"{mean_loss:.4f}", "lr": f"{engine.lr():.2e}", "img/s": f"{rate:.0f}"})
                    window_loss, window_steps = 0.0, 0
                if self._checkpoint_due(step):
                    self.save_checkpoint(step)
            last = step >= sched.total_steps
            if last or (epoch + 1) % cfg.output.eval_every == 0:
                eval_start = time.perf_counter()
                eval_result = self.evaluate()
                eval_time += time.perf_counter() - eval_start
                self.log.scalars({f"eval/{k}": v for k, v in eval_result.items()}, step)
                self._say(f"epoch {epoch + 1}/{sched.epochs} step {step}: top1 {eval_result['top1']:.2f}% "
                          f"({int(eval_result['samples'])} samples)")
                engine.train()
            if last:
                break
        train_time = time.perf_counter() - train_start - eval_time
        self.train_stream.close()  # stop its loader workers now, not at interpreter exit

        if not self._checkpoint_due(step):  # else the loop has just saved this step
            self.save_checkpoint(step)
        faults = self._data_faults()
        summary = {"steps": step, "epochs": sched.epochs, "world_size": self.dist.world_size,
                   "top1": eval_result.get("top1"), "eval_samples": eval_result.get("samples"),
                   "train_time_s": train_time, "eval_time_s": eval_time,
                   "images_per_s": step * cfg.data.batch_size * cfg.optim.grad_accum * self.dist.world_size / train_time,
                   "peak_memory_gib": max(all_gather_float(peak_memory_gib(self.dist.device))),
                   "trainable_params": self.trainable, "total_params": self.total_params,
                   "optimizer_state_bytes": int(all_reduce_sum([float(engine.optimizer_state_bytes())])[0]),
                   "skipped_samples": faults}
        self._save_weights()
        if self.dist.is_main:
            write_json(os.path.join(self.run_dir, "metrics.json"), summary)
        self.log.scalars({f"data/skipped_{k}": v for k, v in faults.items()}, step)
        self.log.close()
        self._say(f"done: top1 {summary['top1']:.2f}% | {summary['images_per_s']:.1f} images/s | "
                  f"peak memory {summary['peak_memory_gib']:.2f} GiB/rank | skipped samples {faults or 'none'}\n"
                  f"run directory: {self.run_dir}\ntensorboard:   tensorboard --logdir {os.path.join(self.run_dir, 'tb')}")
        return summary

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 over the whole eval split: each rank its own shards, counts summed over ranks.

        Ranks step in lockstep: one whose shards are exhausted runs a throwaway forward while others still
        have batches, because under ZeRO-3/FSDP every forward is a collective (parameter all-gathers).
        """
        self.engine.eval()
        correct = seen = 0.0
        batches = iter(self.eval_stream)
        placeholder = torch.zeros(1, 3, *self.input_size)
        while True:
            batch = next(batches, None)
            anyone_has_batch, = all_reduce_sum([float(batch is not None)])
            if not anyone_has_batch:
                break
            images = placeholder if batch is None else batch["images"]
            logits = self.engine.module(images.to(self.dist.device, self.engine.input_dtype))
            if batch is not None:
                labels = batch["labels"].to(self.dist.device)
                correct += (logits.argmax(-1) == labels).sum().item()
                seen += len(labels)
        correct, seen = all_reduce_sum([correct, seen])
        return {"top1": 100.0 * correct / max(seen, 1.0), "samples": seen}

    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.output.checkpoint_every
        return every > 0 and step % every == 0

    def save_checkpoint(self, step: int) -> None:
        directory = os.path.join(self.run_dir, "checkpoints", f"step_{step:08d}")
        self.engine.save_checkpoint(directory)
        if self.dist.is_main:
            write_json(os.path.join(directory, "trainer_state.json"), {"step": step})
        dist.barrier()

    def _save_weights(self) -> None:
        """The final weights. Baselines: every parameter, consolidated, in one fp32 safetensors file. PEFT
        methods: the artifact (`peft/`) and, unless Adapters make that impossible, the merged plain timm
        checkpoint `model.safetensors`, made from the artifact as a user would."""
        cfg = self.cfg
        peft = cfg.method.name in PEFT_METHODS
        state = self.engine.full_state_dict(trainable_only=peft)  # collective; the frozen backbone is known
        if not self.dist.is_main:
            return
        meta = {"model": cfg.model.name, "method": cfg.method.name}
        if not peft:
            write_safetensors(os.path.join(self.run_dir, "model.safetensors"), state, meta)
            return
        state.update({k: v.detach().cpu() for k, v in self.model.named_buffers()})
        artifact = os.path.join(self.run_dir, "peft")
        save_pretrained(artifact, self.model, state, dict(
            model=cfg.model.name, num_classes=self.num_classes, img_size=cfg.model.img_size,
            checkpoint=cfg.model.checkpoint, seed=cfg.seed, method=cfg.method.name))
        if cfg.method.name == "spt_adapter":
            self._say(f"PEFT artifact: {artifact} (Adapters are not mergeable into plain timm weights)")
            return
        merged = merged_state_dict(load_pretrained(artifact))
        write_safetensors(os.path.join(self.run_dir, "model.safetensors"), merged, meta)
        self._say(f"PEFT artifact: {artifact}; merged timm checkpoint: {os.path.join(self.run_dir, 'model.safetensors')}")

    def _data_faults(self) -> dict[str, int]:
        """Skipped samples per kind, summed over ranks and over train and eval reading."""
        train, evaluation = self.train_stream.faults(), self.eval_stream.faults()
        totals = all_reduce_sum([float(train.get(k, 0) + evaluation.get(k, 0)) for k in FAULT_KINDS])
        return {k: int(v) for k, v in zip(FAULT_KINDS, totals) if v}

