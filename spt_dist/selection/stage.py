"""The selection stages of `launch/train.py`: `score` (score pass, scores saved), `allocate` (allocation from
saved scores, e.g. again with another budget) and `select` (both)."""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from spt_dist import runfiles
from spt_dist.atomic import write_json
from spt_dist.config import Config
from spt_dist.data.dataset import Dataset, resolve_dataset
from spt_dist.distributed import DistInfo
from spt_dist.errors import UserError
from spt_dist.metrics import RunLogger
from spt_dist.models import create_model
from spt_dist.rundir import prepare_run_dir
from spt_dist.selection.allocation import allocate, check_selection
from spt_dist.selection.layout import Layout, build_layout
from spt_dist.selection.report import save_heatmap, summary
from spt_dist.selection.scores import check_coverage, load_scores, remove_partial_scores, save_scores
from spt_dist.selection.scoring import run_score_pass

def _structure(cfg: Config, num_classes: int) -> Layout:
    """The selection's layout of the configured model. Only the structure is needed: the meta device builds even
    a ViT-g in no time and no memory."""
    model = create_model(cfg.model.name, num_classes, img_size=cfg.model.img_size, device="meta")
    return build_layout(model, cfg.selection.method)


def run_selection(cfg: Config, dist_info: DistInfo, stage: str, run_dir: str | None = None,
                  data: Dataset | None = None, resume: str | None = None) -> dict:
    """`run_dir` and `data`: those of a training run that selects first; otherwise prepared here. `resume`
    (`latest` or a run directory): continue a score pass from its partial scores, if it saved some."""
    sel = cfg.selection
    if data is None and stage != "allocate":
        data = resolve_dataset(cfg.data)
    if run_dir is None:  # a stage run alone
        if resume == "latest" and cfg.output.name is None:
            raise UserError("--resume latest: set output.name (without it each launch makes a new, timestamped "
                            "run directory), or give --resume the run directory")
        existing = None if resume in (None, "latest") else os.path.abspath(resume)
        run_dir = prepare_run_dir(cfg, dist_info, stage, existing)
    log = RunLogger(os.path.join(run_dir, runfiles.TENSORBOARD) if dist_info.is_main else None, 0, False)
    say = log.write
    say(f"run directory: {run_dir}")
    timings: dict[str, float] = {}

    if stage == "allocate":
        scores, info = load_scores(run_dir, dist_info.rank, dist_info.world_size)
        if info["method"] != sel.method or info["model"] != cfg.model.name:
            raise UserError(f"selection.method: the saved scores are {info['method']} scores of {info['model']}; "
                            f"run `--stage score` for {sel.method} on {cfg.model.name}")
        layout = _structure(cfg, info["num_classes"])
        check_coverage(scores, layout)
    else:
        check_selection(_structure(cfg, data.num_classes), sel)  # a budget or k that cannot work: before the pass
        result = run_score_pass(cfg, data, dist_info, say, run_dir=run_dir, resume=resume is not None)
        scores, layout, info = result.scores, result.layout, dict(result.info, num_classes=data.num_classes)
        save_scores(scores, run_dir, dist_info.rank, dist_info.world_size, info)
        if dist_info.is_main:
            remove_partial_scores(run_dir)
        timings["score_pass_s"] = info["time_s"]
        log.scalars({"selection/score_pass_s": info["time_s"], "selection/score_loss": info["mean_loss"]}, 0)
        if stage == "score":
            say(f"scores saved to {os.path.join(run_dir, runfiles.SCORES)}")
            log.close()
            return timings

    dist.barrier()
    start = time.perf_counter()
    allocation = allocate(scores, layout, sel)
    timings["allocation_s"] = time.perf_counter() - start
    if dist_info.is_main:
        allocation.save(run_dir)
        text = summary(allocation.record)
        say(text)
        log.text("selection/allocation", f"```\n{text}\n```")
        log.figure("selection/allocation", save_heatmap(allocation.record, os.path.join(run_dir, runfiles.HEATMAP)))
        log.scalars({"selection/allocation_s": timings["allocation_s"],
                     "selection/cost": allocation.record["cost"],
                     "selection/cost_pct": 100 * allocation.record["cost"] / layout.backbone_params}, 0)
        write_json(os.path.join(run_dir, runfiles.selection_timings(stage)),
                   dict(timings, world_size=dist_info.world_size, engine=cfg.engine.kind,
                        zero_stage=cfg.engine.zero_stage))
        say(f"allocation: {timings['allocation_s']:.2f} s -> {os.path.join(run_dir, runfiles.ALLOCATION_JSON)}, "
            f"allocation.safetensors, {runfiles.HEATMAP}")
    log.close()
    dist.barrier()
    return timings
