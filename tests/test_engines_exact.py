"""Full fine-tuning through real 2-rank DeepSpeed (ZeRO 0-3) and FSDP2 jobs equals one plain process, exactly.

The reference is plain PyTorch in this process: the same initial weights, the same per-rank micro-batches
(read through the same data pipeline for rank 0 and rank 1 of 2), the gradient of the global-batch mean loss
formed as (g0 + g1) / 2 like the all-reduce, and torch's AdamW with the same groups and schedule. On CPU in
fp32 every engine must match it bit for bit (`torch.equal`): halving is exact and a 2-term sum commutes.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from spt_dist.config import load_config
from spt_dist.data.loader import TrainStream, count_samples, expand_shards, read_classes
from spt_dist.data.transforms import build_transforms
from spt_dist.engines import VARIANTS
from spt_dist.models import create_model
from spt_dist.optim import build_optimizer, build_scheduler
from spt_dist.peft.baselines import apply_method
from spt_dist.trainer import Schedule
from tests.conftest import REPO, TRAIN, check, run_job, tiny_overrides

WORLD = 2
# Weight decay and a warm-up + cosine schedule are on, so the groups and the schedule are exercised too.
RECIPE = ["optim.max_steps=3", "optim.weight_decay=0.05", "optim.warmup_epochs=0.05"]


def reference_weights(cfg) -> dict[str, torch.Tensor]:
    shards = expand_shards(cfg.data.train_shards, "data.train_shards")
    num_classes = len(read_classes(shards))
    schedule = Schedule.plan(cfg, count_samples(shards), WORLD)
    torch.manual_seed(cfg.seed)
    model = apply_method(create_model(cfg.model.name, num_classes), cfg.method)
    transform, _ = build_transforms(model, cfg.data)
    streams = [iter(TrainStream(shards, rank=r, world=WORLD, batch_size=cfg.data.batch_size, transform=transform,
                                num_classes=num_classes, seed=cfg.seed, workers=cfg.data.workers,
                                shuffle_buffer=cfg.data.shuffle_buffer)) for r in range(WORLD)]
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule.total_steps, schedule.warmup_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(schedule.total_steps):
        per_rank = []
        for stream in streams:
            batch = next(stream)
            loss = F.cross_entropy(model(batch["images"]).float(), batch["labels"])
            per_rank.append(torch.autograd.grad(loss, params))
        for p, g0, g1 in zip(params, *per_rank):
            p.grad = (g0 + g1) / 2
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = load_config(str(REPO / "tests/configs/tiny.yaml"), tiny_overrides(synthetic_shards, out, "ref") + RECIPE)
    weights = reference_weights(cfg)
    torch.manual_seed(cfg.seed)
    initial = create_model(cfg.model.name, len(weights["head.bias"])).state_dict()
    assert all(not torch.equal(weights[name], initial[name]) for name in weights), "training must move every tensor"
    return weights


@pytest.mark.parametrize("engine", list(VARIANTS))
def test_two_ranks_match_single_process_exactly(engine, reference, synthetic_shards, tmp_path):
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, engine),
            *RECIPE, *VARIANTS[engine]]
    result = check(run_job(args, nproc=WORLD, timeout=240))
    assert "top1" in result.stdout
    weights = load_file(str(tmp_path / engine / "model.safetensors"))
    assert weights.keys() == reference.keys()
    moved = 0
    for name, value in reference.items():
        assert torch.equal(weights[name], value), f"{engine}: {name} differs by {(weights[name] - value).abs().max()}"
        moved += 1
    assert moved == len(reference)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_engine_checkpoint_restores_training_exactly(engine, tmp_path):
    """Weights, optimizer state and schedule all come back: the step after loading is bit-identical."""
    check(run_job(["tests/workers/engine_checkpoint.py", str(tmp_path), *VARIANTS[engine], "method.name=lora",
                   "optim.grad_accum=2", "optim.weight_decay=0.05"], nproc=WORLD, timeout=240))
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"result-rank{rank}.json").read_text())
        assert result["differs_before_load"], "the fresh engine must start elsewhere, or the test proves nothing"
        assert result["mismatched"] == [], result
        assert result["lr"][0] == result["lr"][1]
