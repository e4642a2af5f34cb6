"""The names of what a run directory (<output.dir>/<output.name>) holds, in one place. Torch-free: the Slurm
launcher, sweeps and reports read run directories too."""

from __future__ import annotations

LOCK = ".lock"  # held by the job working in the run directory (rundir.lock_run_dir); names it
CONFIG = "config.yaml"  # the training run's resolved config; a stage run alone writes config-<stage>.yaml
METRICS = "metrics.json"  # written last by a finished training run: its presence means finished
MODEL = "model.safetensors"  # the final weights: every parameter (baselines) or the merged PEFT model
PEFT = "peft"  # the PEFT artifact (spt_dist.peft.artifact)
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"  # step_NNNNNNNN/ each, with STATE_JSON written last
STATE_JSON = "state.json"
SAMPLES = "samples"  # output.log_samples: rank_RRRRR.txt
SCORES = "scores"  # the score pass's per-rank files and scores.json
PARTIAL_SCORES = "partial"  # scores/partial/: a stopped score pass's scores so far (resumable)
ALLOCATION_JSON = "allocation.json"
ALLOCATION_INDICES = "allocation.safetensors"
HEATMAP = "allocation.png"
SLURM = "slurm"  # slurm/job-<id>/: per-node logs of each Slurm job
SWEEP_LOGS = "logs"  # in a sweep directory (beside its runs): one log per run
# What only a training run writes: where one is, a fresh start is refused (output.overwrite removes them, and the
# TensorBoard events); the selection (scores, allocation) stays.
TRAINING_OUTPUTS = (CHECKPOINTS, SAMPLES, PEFT, METRICS, MODEL)
# Directories inside a run (or a sweep) that hold no runs: a search for run directories skips them.
NOT_RUNS = (CHECKPOINTS, TENSORBOARD, SCORES, PEFT, SAMPLES, SLURM, SWEEP_LOGS)


def stage_config(stage: str) -> str:
    return CONFIG if stage == "train" else f"config-{stage}.yaml"


def selection_timings(stage: str) -> str:
    return f"selection-{stage}.json"
