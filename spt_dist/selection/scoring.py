"""The score pass: gradients of the task loss on calibration batches, accumulated per rank on its own shard.

The model goes through the configured engine (DeepSpeed ZeRO 0-3 or FSDP2) with only the scored tensors
trainable and an optimizer that never changes anything: the engine reduces (ZeRO-0) or reduce-scatters
(ZeRO-1/2/3, FSDP2) each global batch's gradient as in training, and each rank adds its own shard of it to
its scores, s += g² (SPT) or s += g then |s| (GPS). No full gradient is gathered, no parameter moves.

Always fp32 and without drop-path (as the SPT reference scores): the scores are then a deterministic function
of the model and the calibration batches, the same on every engine and world size.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spt_dist.config import Config, EngineConfig, OptimConfig
from spt_dist.data.dataset import Dataset
from spt_dist.data.transforms import build_contrastive_transform, build_transforms
from spt_dist.distributed import DistInfo, all_reduce_sum
from spt_dist.engines import EngineSpec, build_engine
from spt_dist.engines.base import Engine
from spt_dist.errors import Stopped, UserError
from spt_dist.models import create_model
from spt_dist.preemption import Preemption, resume_hint
from spt_dist.selection.calibration import CalibrationBatches
from spt_dist.selection.layout import Layout, build_layout
from spt_dist.selection.losses import global_batch_contrastive_loss
from spt_dist.selection.scores import LocalScores, check_coverage, load_partial_scores, save_partial_scores


class _NoStepOptimizer(torch.optim.Optimizer):
    """Holds the scored parameters so the engine reduces and partitions their gradients; never updates them."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):  # noqa: ARG002 - the engine calls it; scoring must not move any weight
        return None


@dataclass
class ScorePass:
    scores: LocalScores
    layout: Layout
    info: dict  # what was scored and how; saved as scores/scores.json


def calibration_batches(cfg: Config, data: Dataset) -> int:
    sel = cfg.selection
    if sel.batches is not None:
        return sel.batches
    batches = data.train_samples // sel.batch_size  # one pass over the train split, full batches only
    if batches == 0:
        raise UserError(f"selection.batch_size: {sel.batch_size} is larger than the {data.train_samples} "
                        "training samples")
    return batches


def build_score_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    # The contrastive loss uses the CLS feature after the final norm, so that model has no head (timm:
    # num_classes=0 gives the pre-logits features). The same seed as training: the same initial weights.
    torch.manual_seed(cfg.seed)
    contrastive = cfg.selection.score_loss == "supcon"
    return create_model(cfg.model.name, 0 if contrastive else num_classes, checkpoint=cfg.model.checkpoint,
                        img_size=cfg.model.img_size, drop_path_rate=0.0)


def scored_layout(model: torch.nn.Module, method: str) -> Layout:
    """The layout of `method` on `model`, with exactly the scored tensors made trainable (unscored tensors need
    no gradient: less memory and traffic; the scored ones' gradients do not depend on it)."""
    layout = build_layout(model, method)
    scored = {t.name for t in layout.tensors}
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)
    return layout


def score_loss_fn(sel, views: int, world: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]:
    """(model output, labels) -> (the loss to back-propagate, the global-batch loss to report)."""
    if sel.score_loss == "supcon":
        def contrastive(out, labels):
            # This rank's share times the world size (see losses.py); the global loss is that over the world.
            loss = global_batch_contrastive_loss(out, labels, views, sel.temperature)
            return loss, loss.item() / world
        return contrastive
    def cross_entropy(out, labels):
        loss = F.cross_entropy(out.float(), labels)
        return loss, loss.item()
    return cross_entropy


def global_batch_step(engine: Engine, micro_batches: list[dict], loss_fn, device, at_boundary=None) -> float:
    """Forward/backward of this rank's micro-batches of one global batch, then the engine's (no-op) step.

    `at_boundary` runs after the last backward, when the engine has reduced the global-batch gradient and
    before its step clears it. Returns the mean loss over the micro-batches."""
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss, reported = loss_fn(engine.module(images), labels)
        engine.backward(loss)
        loss_sum += reported
        if at_boundary is not None and i == len(micro_batches) - 1:
            at_boundary()
        engine.step()
    return loss_sum / len(micro_batches)


@dataclass
class ScoreSetup:
    """Everything a score pass runs on: the scored model inside its engine, the batches and the loss."""
    engine: Engine
    layout: Layout
    stream: CalibrationBatches
    loss_fn: Callable
    batches: int


def prepare_score_pass(cfg: Config, data: Dataset, dist_info: DistInfo) -> ScoreSetup:
    sel = cfg.selection
    world, rank = dist_info.world_size, dist_info.rank
    micro = sel.micro_batch_size or sel.batch_size // world
    contrastive = sel.score_loss == "supcon"
    if contrastive and micro * world != sel.batch_size:
        raise UserError(f"selection.micro_batch_size: the contrastive loss needs the whole global batch at once "
                        f"({sel.batch_size} = {world} ranks x micro-batch), got {micro}")
    if sel.batch_size % world:
        raise UserError(f"selection.batch_size: {sel.batch_size} is not divisible by {world} ranks")

    model = build_score_model(cfg, data.num_classes)
    layout = scored_layout(model, sel.method)

    views = 2 if contrastive else 1
    transform = build_contrastive_transform(model) if sel.augmented else build_transforms(model, cfg.data)[1]
    batches = calibration_batches(cfg, data)
    stream = CalibrationBatches(
        data.train_shards, rank=rank, world=world, batch_size=sel.batch_size, micro_batch_size=micro,
        batches=batches, transform=transform, views=views, augment_seed=cfg.seed if sel.augmented else None,
        shuffle_seed=cfg.seed if sel.shuffled else None, shuffle_buffer=cfg.data.shuffle_buffer,
        num_classes=data.num_classes, max_member_mb=cfg.data.max_member_mb,
        max_image_pixels=cfg.data.max_image_pixels)

    engine = build_score_engine(model, cfg.engine, cfg.optim, micro, stream.accumulation, dist_info.device)
    return ScoreSetup(engine, layout, stream, score_loss_fn(sel, views, world), batches)


def build_score_engine(model: torch.nn.Module, engine: EngineConfig, optim: OptimConfig, micro_batch_size: int,
                       accumulation: int, device: torch.device) -> Engine:
    """`model` (its scored tensors trainable, nothing else) inside the engine, in fp32, with an optimizer that
    never steps: the engine reduces each global batch's gradient and hands each rank its own shard of it."""
    engine = build_engine(model, EngineSpec(
        engine=dataclasses.replace(engine, precision="fp32"),
        optim=dataclasses.replace(optim, grad_accum=accumulation, grad_clip=0.0), micro_batch_size=micro_batch_size,
        device=device, scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
        optimizer=lambda m: _NoStepOptimizer([p for p in m.parameters() if p.requires_grad])))
    engine.train()
    return engine


def accumulate_scores(engine: Engine, scores: LocalScores, method: str) -> None:
    """Adds this rank's shard of the current (reduced) global-batch gradient to its scores."""
    for name, offset, grad in engine.local_gradients():
        scores.add_gradient(name, offset, grad, square=method == "spt")


def _file_identity(path: str | None) -> list | None:
    """A weights file as it is now (size and modification time: a file replaced under the same name differs)."""
    if path is None:
        return None
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def run_score_pass(cfg: Config, data: Dataset, dist_info: DistInfo, say=print, run_dir: str | None = None,
                   resume: bool = False) -> ScorePass:
    """`run_dir`: where partial scores are saved (every selection.checkpoint_every batches, and when a stop
    signal arrives); `resume`: continue from them if they are of this same pass (setting, world size, engine)."""
    sel = cfg.selection
    run = prepare_score_pass(cfg, data, dist_info)
    engine, layout, stream, batches, world = run.engine, run.layout, run.stream, run.batches, dist_info.world_size
    say(f"score pass: {sel.method.upper()} ({'sum of squared' if sel.method == 'spt' else '|sum of|'} "
        f"{sel.score_loss} gradients), {batches} batches of {sel.batch_size} "
        f"({stream.accumulation} x {stream.micro_batch_size} per rank), {len(layout.tensors)} tensors / "
        f"{layout.scored_params:,} entries scored")
    scores, done, loss_sum = LocalScores(), 0, 0.0
    # What partial scores must share to be continued: the same batches, the same shards of the same tensors.
    # Everything that decides a gradient: the model and its weights, the images (shards, order, transforms,
    # resolution) and the loss; and what decides which rank holds which shard of which tensor.
    identity = {"method": sel.method, "loss": sel.score_loss, "temperature": sel.temperature,
                "model": dataclasses.asdict(cfg.model), "num_classes": data.num_classes,
                "shards": [os.path.abspath(s) for s in data.train_shards], "shuffle": sel.shuffled,
                "augment": sel.augmented, "shuffle_buffer": cfg.data.shuffle_buffer, "crop_pct": cfg.data.crop_pct,
                "max_member_mb": cfg.data.max_member_mb,
                "max_image_pixels": cfg.data.max_image_pixels, "weights": _file_identity(cfg.model.checkpoint),
                "batches": batches, "batch_size": sel.batch_size, "micro_batch_size": stream.micro_batch_size,
                "seed": cfg.seed, "engine": cfg.engine.kind, "zero_stage": cfg.engine.zero_stage}
    if resume and run_dir:
        partial = load_partial_scores(run_dir, dist_info.rank, world, dist_info.device)
        usable = partial is not None and partial[1]["identity"] == identity
        if all_reduce_sum([float(usable)])[0] == world:
            scores, progress = partial
            done, loss_sum = progress["done"], progress["loss_sum"]
            say(f"score pass: continuing from the partial scores after batch {done}/{batches}")
        elif all_reduce_sum([float(partial is not None)])[0]:
            say("score pass: the partial scores are of another pass (model, data, setting, world size or engine): "
                "starting over")
    start, every = time.perf_counter(), sel.checkpoint_every
    preemption = Preemption()
    try:
        for micro_batches in stream.iterate(done):
            loss_sum += global_batch_step(engine, micro_batches, run.loss_fn, dist_info.device,
                                          lambda: accumulate_scores(engine, scores, sel.method))
            done += 1
            stop = all_reduce_sum([float(preemption.requested)])[0] > 0  # every rank stops after the same batch
            if run_dir and (stop or (every and done % every == 0 and done < batches)):
                save_partial_scores(scores, run_dir, dist_info.rank, world,
                                    {"identity": identity, "done": done, "loss_sum": loss_sum})
            if stop:
                raise Stopped(f"score pass stopped by a signal after batch {done}/{batches}; partial scores saved in "
                              f"{run_dir}/scores/partial\n{resume_hint(run_dir)}" if run_dir else
                              f"score pass stopped by a signal after batch {done}/{batches}")
    finally:
        preemption.close()
    scores.finish(absolute=sel.method == "gps")
    elapsed = time.perf_counter() - start
    check_coverage(scores, layout)
    mean_loss, = all_reduce_sum([loss_sum / batches])
    skipped, = all_reduce_sum([float(sum(stream.faults.snapshot().values()))])
    info = {"method": sel.method, "loss": sel.score_loss, "batches": batches, "batch_size": sel.batch_size,
            "samples": batches * sel.batch_size, "augment": sel.augmented, "shuffle": sel.shuffled,
            "model": cfg.model.name, "scored_tensors": len(layout.tensors), "scored_params": layout.scored_params,
            "mean_loss": mean_loss / world, "skipped_samples": int(skipped) // world,  # every rank read all
            "time_s": elapsed}
    say(f"score pass: {elapsed:.1f} s, mean loss {info['mean_loss']:.4f}")
    return ScorePass(scores, layout, info)
