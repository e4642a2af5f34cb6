"""The run directory every stage writes into: <output.dir>/<output.name>, with the resolved config."""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from spt_dist.config import Config, save_config
from spt_dist import runfiles
from spt_dist.distributed import DistInfo, broadcast_object
from spt_dist.errors import UserError


def prepare_run_dir(cfg: Config, dist_info: DistInfo, stage: str, run_dir: str | None = None) -> str:
    """Creates the directory on rank 0 and writes `config.yaml` (`config-<stage>.yaml` for a stage run alone,
    so re-running the allocation with another budget keeps the score pass's config). Collective.
    `run_dir`: an existing run's directory (a resume), instead of output.dir/output.name."""
    name = cfg.output.name or f"{cfg.model.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = broadcast_object(run_dir or os.path.abspath(os.path.join(cfg.output.dir, name)))
    if dist_info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, runfiles.stage_config(stage)))
    dist.barrier()
    return run_dir


def open_run(cfg: Config, dist_info: DistInfo, stage: str, resume: str | None) -> tuple[str, str | None]:
    """The run directory and the checkpoint to continue from (None: start afresh). Collective.

    resume None: a new run. `latest`: this run's (output.dir/output.name) newest complete checkpoint if it has
    one, else a first start, so a requeued job can always pass it. A path: that checkpoint, or a run
    directory's newest; the run goes on in the directory that holds it."""
    from spt_dist.checkpoint import find_checkpoint, run_dir_of  # noqa: PLC0415 - torch-heavy; after the config

    if resume is None:
        return prepare_run_dir(cfg, dist_info, stage), None
    if resume == "latest" and cfg.output.name is None:
        raise UserError("--resume latest: set output.name (without it each launch makes a new, timestamped "
                        "run directory), or give --resume the run directory")

    def locate() -> tuple[str | None, str | None, str | None]:  # on rank 0; a mistake is sent as a message
        try:
            if resume == "latest":
                run_dir = os.path.abspath(os.path.join(cfg.output.dir, cfg.output.name))
                return run_dir, find_checkpoint(resume, run_dir), None
            checkpoint = find_checkpoint(resume, None)
            return run_dir_of(checkpoint), checkpoint, None
        except UserError as e:
            return None, None, str(e)

    run_dir, checkpoint, error = broadcast_object(locate() if dist_info.is_main else None)
    if error:
        raise UserError(error)
    return prepare_run_dir(cfg, dist_info, stage, run_dir), checkpoint
