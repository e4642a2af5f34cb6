"""Full fine-tuning through real 2-rank DeepSpeed (ZeRO 0-3) and FSDP2 jobs equals one plain process, exactly
(the reference: tests/reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spt_dist.checkpoint import Checkpoint
from spt_dist.config import load_config
from spt_dist.engines import VARIANTS
from spt_dist.models import create_model
from spt_dist.peft.baselines import apply_method
from tests.conftest import REPO, TRAIN, check, run_job, tiny_overrides
from tests.reference import dataset_classes, train_reference

WORLD = 2
# Weight decay and a warm-up + cosine schedule are on, so the groups and the schedule are exercised too.
RECIPE = ["optim.max_steps=3", "optim.weight_decay=0.05", "optim.warmup_epochs=0.05"]


def reference_weights(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model = apply_method(create_model(cfg.model.name, dataset_classes(cfg)), cfg.method)
    train_reference(cfg, model, WORLD)
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


def test_zero3_linear_computes_as_torch_linear():
    """ZeRO-3's memory-efficient linear (which replaces F.linear in every layer under ZeRO-3) gives F.linear's
    output and gradients bit for bit, also with a non-zero bias on a 3-D input (any pretrained ViT): DeepSpeed's
    own forward adds the bias after the product, which rounds differently at ViT-S widths (not at the tiny test
    ViT's, so the 2-rank runs above cannot see it)."""
    import importlib

    importlib.import_module("spt_dist.engines.deepspeed_engine")  # sets the forward
    from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3

    torch.manual_seed(0)
    for x in (torch.randn(4, 65, 384), torch.randn(4, 384, 65).transpose(1, 2), torch.randn(260, 384),
              torch.randn(384), torch.randn(2, 3, 5, 384)):
        x.requires_grad_(True)
        w, b = torch.randn(1152, 384, requires_grad=True), torch.randn(1152, requires_grad=True)
        want, got = torch.nn.functional.linear(x, w, b), LinearFunctionForZeroStage3.apply(x, w, b)
        assert torch.equal(got, want), tuple(x.shape)
        grad = torch.randn_like(want)
        for a, c in zip(torch.autograd.grad(want, (x, w, b), grad), torch.autograd.grad(got, (x, w, b), grad)):
            assert torch.equal(a, c), tuple(x.shape)


@pytest.mark.parametrize("engine", list(VARIANTS))
def test_two_ranks_match_single_process_exactly(engine, reference, synthetic_shards, tmp_path):
    """Also the sharded checkpoint each engine writes at the end: every rank its own part of the weights and
    AdamW state, which assemble into the same weights."""
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, engine),
            *RECIPE, *VARIANTS[engine], "output.checkpoint_format=sharded"]
    result = check(run_job(args, nproc=WORLD, timeout=240))
    assert "top1" in result.stdout
    weights = load_file(str(tmp_path / engine / "model.safetensors"))
    assert weights.keys() == reference.keys()
    moved = 0
    for name, value in reference.items():
        assert torch.equal(weights[name], value), f"{engine}: {name} differs by {(weights[name] - value).abs().max()}"
        moved += 1
    assert moved == len(reference)

    checkpoint = Checkpoint.read(str(tmp_path / engine / "checkpoints" / "step_00000003"))
    assert checkpoint.sharded and checkpoint.problem() is None
    assert not (Path(checkpoint.directory) / "trainable.safetensors").exists()
    saved = checkpoint.trainable()
    assert saved.keys() == reference.keys() and all(torch.equal(saved[n], reference[n]) for n in reference)
    optimizer = checkpoint.optimizer()
    assert optimizer.keys() == reference.keys()
    assert all(optimizer[n]["exp_avg"].shape == reference[n].shape for n in reference)
    shard_sizes = [(Path(checkpoint.directory) / f"shard_{r:05d}.safetensors").stat().st_size for r in range(WORLD)]
    assert max(shard_sizes) < 0.6 * sum(shard_sizes), shard_sizes  # each rank wrote about its half


def test_sharded_checkpoint_resumes_on_another_world_size(synthetic_shards, tmp_path):
    """Full fine-tuning saved sharded by 2 ZeRO-3 ranks, resumed by 1 FSDP2 rank: equal to plain PyTorch continuing
    from that checkpoint's assembled weights, AdamW state and schedule."""
    def args(steps, engine):
        return [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "run"),
                *RECIPE[1:], f"optim.max_steps={steps}", "output.checkpoint_every=2",
                "output.checkpoint_format=sharded", *VARIANTS[engine]]

    check(run_job(args(2, "zero3"), nproc=WORLD, timeout=240))
    checkpoint = Checkpoint.read(str(tmp_path / "run" / "checkpoints" / "step_00000002"))
    assert checkpoint.sharded and checkpoint.state["world_size"] == 2
    result = check(run_job([*args(4, "fsdp2"), "--resume", "latest"], launcher="python", timeout=240))
    assert "resumed from" in result.stdout

    cfg = load_config(str(REPO / "tests/configs/tiny.yaml"), [a for a in args(4, "fsdp2")[3:] if "engine." not in a])
    torch.manual_seed(cfg.seed)
    model = apply_method(create_model(cfg.model.name, dataset_classes(cfg)), cfg.method)
    train_reference(cfg, model, 1, resume_from=checkpoint)
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p.detach()), f"{name} differs by {(got[name] - p).abs().max()}"


@pytest.mark.parametrize("engine", ["zero0", "zero2", "zero3", "fsdp2"])
def test_engine_state_restores_training_exactly(engine, tmp_path):
    """Weights, optimizer state and schedule all come back: the step after loading is bit-identical."""
    check(run_job(["tests/workers/engine_checkpoint.py", str(tmp_path), *VARIANTS[engine], "method.name=lora",
                   "optim.grad_accum=2", "optim.weight_decay=0.05"], nproc=WORLD, timeout=240))
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"result-rank{rank}.json").read_text())
        assert result["differs_before_load"], "the fresh engine must start elsewhere, or the test proves nothing"
        assert result["mismatched"] == [], result
        assert result["lr"][0] == result["lr"][1]


def test_deepspeed_ops_are_compiled_into_this_environment(tmp_path):
    """DeepSpeed's JIT ops go to the environment's own folder (.venv/torch_extensions here), not to the
    per-user cache every environment shares; a folder the user sets is kept."""
    import os
    import subprocess
    import sys
    code = "import os, spt_dist.engines.deepspeed_engine; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    own = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert own.stdout.strip().splitlines()[-1] == os.path.join(sys.prefix, "torch_extensions"), own.stderr[-2000:]
    kept = subprocess.run([sys.executable, "-c", code], env=dict(env, TORCH_EXTENSIONS_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert kept.stdout.strip().splitlines()[-1] == str(tmp_path)
