"""The run directory every stage writes into: <output.dir>/<output.name>, with the resolved config."""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from spt_dist.config import Config, save_config
from spt_dist.distributed import DistInfo, broadcast_object


def prepare_run_dir(cfg: Config, dist_info: DistInfo, stage: str) -> str:
    """Creates the directory on rank 0 and writes `config.yaml` (`config-<stage>.yaml` for a stage run alone,
    so re-running the allocation with another budget keeps the score pass's config). Collective."""
    name = cfg.output.name or f"{cfg.model.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.abspath(os.path.join(cfg.output.dir, broadcast_object(name)))
    if dist_info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml" if stage == "train" else f"config-{stage}.yaml"))
    dist.barrier()
    return run_dir
