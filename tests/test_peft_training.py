"""Training from an allocation through real DeepSpeed ZeRO-2/3 and FSDP2 jobs, on 1 and 2 ranks.

- Exact: each run's trainable state (sparse deltas, LoRA / Adapter, full vectors, head, cls_token) equals,
  bit for bit, plain PyTorch playing the same ranks (tests/reference.py) on the same PEFT model.
- Against the dense reference (the GPS reference's way: whole tensors trainable, every other entry's gradient
  zeroed, same AdamW groups): unselected entries are bit-unchanged; selected entries agree to fp32 rounding.
  Not bit for bit, and why: the delta form computes W + (δ1 + δ2 + ...) where the dense one computes
  ((W + δ1) + δ2) + ..., and from the second step on the forward sees weights that differ in the last bits.
- The optimizer's state is sized by the trainable entries (from the real optimizer, all ranks).
- The merged checkpoint loads into plain timm and gives the PEFT model's logits.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from spt_dist.config import load_config
from spt_dist.engines import VARIANTS
from spt_dist.models import create_model
from spt_dist.peft.allocated import apply_allocation, read_allocation
from spt_dist.peft.artifact import load_pretrained
from spt_dist.peft.tuned import Tuned
from tests.conftest import REPO, TRAIN, check, run_job, tiny_overrides
from tests.reference import dataset_classes, train_reference

RECIPE = ["optim.max_steps=3", "optim.weight_decay=0.05", "optim.warmup_epochs=0.05"]
METHODS = {  # on the tiny ViT each gives a mix: LoRA or Adapter modules, sparse entries and full vectors
    "spt_lora": ["method.name=spt_lora", "selection.budget=3000"],
    "spt_adapter": ["method.name=spt_adapter", "selection.budget=4000"],
    "gps": ["method.name=gps", "selection.loss=ce", "selection.k=2", "optim.weight_decay=0.0"],
}
ADAM_BYTES_PER_ENTRY = 8  # exp_avg + exp_avg_sq, fp32


@pytest.fixture(scope="module")
def allocations(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("allocations")
    for method, settings in METHODS.items():
        check(run_job([TRAIN, "--config", "tests/configs/tiny.yaml", "--stage", "select",
                       *tiny_overrides(synthetic_shards, out, method), *settings], timeout=180))
        record = json.loads((out / method / "allocation.json").read_text())
        decisions = {u["decision"] for u in record["units"]}
        assert "sparse" in decisions and (method == "gps" or {"full", method[4:]} <= decisions), decisions
    return out


def config(method: str, shards, out, name: str, extra=()):
    return load_config(str(REPO / "tests/configs/tiny.yaml"),
                       [*tiny_overrides(shards, out, name), *RECIPE, *METHODS[method], *extra])


def reference_model(cfg, allocation_dir, world: int, sparse_update: str):
    torch.manual_seed(cfg.seed)  # as the trainer: the model, then the allocation's modules, from one seed
    model = create_model(cfg.model.name, dataset_classes(cfg))
    record, indices = read_allocation(str(allocation_dir))
    apply_allocation(model, record, indices, sparse_update=sparse_update)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return train_reference(cfg, model, world), initial


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,engine,world", [
    ("spt_lora", "zero2", 1), ("spt_lora", "zero2", 2), ("spt_lora", "zero3", 2), ("spt_lora", "fsdp2", 2),
    ("gps", "zero3", 2), ("spt_adapter", "zero2", 2)])
def test_sparse_training_equals_plain_pytorch_exactly(method, engine, world, allocations, synthetic_shards, tmp_path):
    name = f"{method}-{engine}-{world}"
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, name),
            *RECIPE, *METHODS[method], f"method.allocation={allocations / method}", *VARIANTS[engine]]
    result = check(run_job(args, nproc=world, timeout=240))
    assert "trainable params:" in result.stdout

    cfg = config(method, synthetic_shards, tmp_path, "ref")
    reference, initial = reference_model(cfg, allocations / method, world, "delta")
    saved = load_file(str(tmp_path / name / "peft" / "peft_model.safetensors"))
    expected = trainable(reference)
    assert {k for k in saved if not k.endswith("_delta_index")} == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), f"{name}: {key} differs by {(saved[key] - value).abs().max()}"
        if not key.rsplit(".", 1)[-1].startswith("lora_A"):  # B, deltas, vectors, head start at zero or base
            assert not torch.equal(value, initial[key]), f"{key} did not train"

    metrics = json.loads((tmp_path / name / "metrics.json").read_text())
    entries = metrics["trainable_params"]
    assert entries == sum(v.numel() for v in expected.values())
    needed = ADAM_BYTES_PER_ENTRY * entries
    assert needed <= metrics["optimizer_state_bytes"] <= 1.05 * needed, (metrics["optimizer_state_bytes"], needed)

    if method == "spt_adapter":
        assert not (tmp_path / name / "model.safetensors").exists()  # Adapters cannot be merged
        merge = run_job(["-m", "spt_dist.peft.artifact", "merge", str(tmp_path / name / "peft"), "--out",
                         str(tmp_path / "merged.safetensors")], launcher="python", timeout=300)
        assert merge.returncode == 2 and merge.stderr.startswith("spt_dist: error: merge: ")
        assert len(merge.stderr.strip().splitlines()) == 1 and not (tmp_path / "merged.safetensors").exists()
        return
    # In the merged checkpoint every unselected entry of a tensor with sparse entries is its base value, bit for bit.
    merged = load_file(str(tmp_path / name / "model.safetensors"))
    for path, module in reference.named_modules():
        if isinstance(module, Tuned) and not module.lora:
            for param in module.sparse:
                unselected = torch.ones(getattr(module, param).numel(), dtype=torch.bool)
                unselected[getattr(module, f"{param}_delta_index")] = False
                key = f"{path}.{param}"
                assert torch.equal(merged[key].reshape(-1)[unselected], initial[key].reshape(-1)[unselected]), key
                assert not torch.equal(merged[key], initial[key]), key
    # The command-line merge of the artifact writes the same checkpoint as the run.
    check(run_job(["-m", "spt_dist.peft.artifact", "merge", str(tmp_path / name / "peft"), "--out",
                   str(tmp_path / "cli.safetensors")], launcher="python", timeout=300))
    cli = load_file(str(tmp_path / "cli.safetensors"))
    assert cli.keys() == merged.keys() and all(torch.equal(cli[k], merged[k]) for k in cli)
    # The merged checkpoint in plain timm gives the PEFT model's logits. Tolerance: folding B·A into W rounds.
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = timm.create_model(cfg.model.name, pretrained=False, num_classes=dataset_classes(cfg),
                              checkpoint_path=str(tmp_path / name / "model.safetensors")).eval()
    peft = load_pretrained(str(tmp_path / name / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), peft(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,world", [("spt_lora", 1), ("spt_lora", 2), ("gps", 2)])
def test_delta_training_matches_the_dense_masked_reference(method, world, allocations, synthetic_shards, tmp_path):
    cfg = config(method, synthetic_shards, tmp_path, "ref")
    sparse, initial = reference_model(cfg, allocations / method, world, "delta")
    dense, _ = reference_model(cfg, allocations / method, world, "dense_masked")
    checked = 0
    for path, module in sparse.named_modules():
        if not isinstance(module, Tuned):
            continue
        dense_module = dense.get_submodule(path)
        for name in module.sparse:
            index = getattr(module, f"{name}_delta_index")
            chosen = torch.zeros(getattr(module, name).numel(), dtype=torch.bool)
            chosen[index] = True
            base = initial[f"{path}.{name}"].reshape(-1)
            after_dense = getattr(dense_module, name).detach().reshape(-1)
            after_sparse = module.effective(name).detach().reshape(-1)
            assert torch.equal(after_dense[~chosen], base[~chosen]), f"{path}.{name}: an unselected entry moved"
            assert torch.equal(after_sparse[~chosen], base[~chosen])
            assert not torch.equal(after_dense[chosen], base[chosen]), f"{path}.{name}: nothing trained"
            torch.testing.assert_close(after_sparse[chosen], after_dense[chosen], rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 0
    # Everything else that trains (LoRA, vectors, head) agrees closely, but looser: Adam divides by the root of
    # the second moment, so where a gradient is near zero an ulp-level difference in it moves the update by up to
    # lr per step (lr = 1e-3 here); we see ~1e-5.
    dense_params = trainable(dense)
    for key, value in trainable(sparse).items():
        if key in dense_params:
            torch.testing.assert_close(value, dense_params[key], rtol=1e-4, atol=1e-4)


def test_gps_trainable_set_name_by_name(allocations):
    """GPS (SPEC 3): the per-row picks of every weight (as deltas), the biases of the Linear/conv layers and the
    head train; every norm, weight and bias, and pos_embed and cls_token stay frozen. The allocation's cost
    counts exactly the picks and those biases."""
    record, indices = read_allocation(str(allocations / "gps"))
    model = apply_allocation(create_model("vit_test_tiny_patch8_32", 4), record, indices)
    layers = ["patch_embed.proj"] + [f"blocks.{b}.{m}" for b in (0, 1)
                                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == {*(f"{layer}.bias" for layer in layers), *(f"{layer}.weight_delta" for layer in layers),
                               "head.weight", "head.bias"}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    norms = {f"blocks.{b}.norm{i}.{w}" for b in (0, 1) for i in (1, 2) for w in ("weight", "bias")}
    assert norms | {"norm.weight", "norm.bias", "cls_token", "pos_embed"} <= frozen
    params = dict(model.named_parameters())
    picks = sum(params[f"{layer}.weight_delta"].numel() for layer in layers)
    biases = sum(params[f"{layer}.bias"].numel() for layer in layers)
    assert picks == 2 * sum(params[f"{layer}.weight"].shape[0] for layer in layers)  # k = 2 per output row
    assert record["cost"] == picks + biases and record["totals"]["full_vector_params"] == biases


def test_lora_on_a_row_block_beside_sparse_deltas_of_the_same_weight():
    """A fused qkv with sparse deltas (a custom autograd Function, whose output on a 3-D input is a view) and LoRA
    on its q rows, as SPT allocates them: forward and backward work, and the output is the two added up."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 48)
    layer = Tuned(torch.nn.Linear(16, 48))
    layer.load_state_dict(plain.state_dict(), strict=False)
    layer.add_sparse("weight", torch.tensor([3, 40, 500]))
    layer.add_lora("q", (0, 16), rank=2)
    with torch.no_grad():
        layer.weight_delta.fill_(0.5)
        layer.lora_B_q.normal_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None and layer.weight_delta.grad is not None and layer.lora_B_q.grad is not None
    effective = plain.weight.detach().reshape(-1).clone()
    effective[[3, 40, 500]] += 0.5
    expected = torch.nn.functional.linear(x, effective.view(48, 16), plain.bias)
    expected[..., :16] += layer.lora_scale * (x @ layer.lora_A_q.t() @ layer.lora_B_q.t())
    assert torch.allclose(y, expected, atol=1e-5)
