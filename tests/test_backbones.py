"""Backbone families (spt_dist/backbones): ViT/DeiT/DINOv2, Swin and EVA-02, and the checkpoint formats.

- Each family's spec: matrices and row blocks, what SPT scores, FSDP2 units / heat-map rows (the -B sizes on
  the meta device, and the tiny test models).
- Every method (full, linear, LoRA, SPT-LoRA, SPT-Adapter, GPS) on each tiny family in one process: what
  trains moves, the rest stays bit for bit, and the merged model loads with `timm.create_model(name,
  checkpoint_path=...)` and gives the PEFT model's logits (tolerance 1e-5: folding B·A into W rounds).
- Real 2-rank runs, score -> allocate -> train -> merge, of EVA-02 and Swin under ZeRO-3 (SPT-LoRA) and FSDP2
  (GPS; the blocks are the FSDP2 units). Their allocation files are byte-identical to one process's library
  path (spt_dist.score/allocate); their trained tensors equal plain PyTorch playing both ranks
  (tests/reference.py), bit for bit.
- Checkpoint formats, each file written by the test in that format's real key layout: JAX .npz (timm's own
  names), MAE .pth, MoCo v3 .pth.tar, safetensors; each loads and gives the source model's logits exactly.
  Wrong files: one line naming the first offending key and the expected shape.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import spt_dist
from spt_dist.atomic import write_safetensors
from spt_dist.backbones import spec_for
from spt_dist.config import MethodConfig, load_config
from spt_dist.data.dataset import resolve_dataset
from spt_dist.errors import UserError
from spt_dist.models import create_model, jax_shapes
from spt_dist.peft.allocated import apply_allocation, read_allocation
from spt_dist.peft.artifact import load_pretrained
from spt_dist.selection.layout import build_layout
from spt_dist.selection.scoring import build_score_model
from tests.conftest import REPO, TRAIN, check, run_job, tiny_overrides
from tests.reference import dataset_classes, train_reference
from tests.workers.api_calibration import calibration_batches

SWIN, EVA, VIT = "swin_test_tiny_patch4_window4_32", "eva02_test_tiny_patch8_32", "vit_test_tiny_patch8_32"
DINO = "vit_test_dinov2_tiny_patch8_32"  # layer scale and register tokens
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model, images=IMAGES):
    with torch.no_grad():
        return model.eval()(images)


# ------------------------------------------------------------------------------------------------ specs


@pytest.mark.parametrize("name, family, blocks, matrices", [
    ("vit_base_patch16_224", "vit", 12, {"q", "k", "v", "proj", "fc1", "fc2"}),
    ("deit_base_patch16_224", "vit", 12, {"q", "k", "v", "proj", "fc1", "fc2"}),
    ("vit_base_patch14_reg4_dinov2", "vit", 12, {"q", "k", "v", "proj", "fc1", "fc2"}),
    ("swin_base_patch4_window7_224", "swin", 24, {"q", "k", "v", "proj", "fc1", "fc2", "reduction"}),
    ("eva02_base_patch14_224", "eva", 12, {"q", "k", "v", "proj", "fc1_g", "fc1_x", "fc2"}),
    ("eva02_small_patch14_224", "eva", 12, {"q", "k", "v", "proj", "fc1_g", "fc1_x", "fc2"}),
])
def test_family_specs_on_meta(name, family, blocks, matrices):
    model = create_model(name, 10, device="meta")
    spec = spec_for(model)
    assert spec.family == family and len(spec.block_modules(model)) == blocks
    units = build_layout(model, "spt").units
    assert {u.matrix_type for u in units if u.kind == "matrix"} == matrices
    scored = {t.name for t in build_layout(model, "spt").tensors}
    assert not any(n.startswith(("head", "patch_embed", "pos_embed", "cls_token", "reg_token")) for n in scored)
    assert not any("relative_position_bias_table" in n for n in scored)
    # Heat-map rows are the blocks in model order; the final norm (and Swin's patch merging) sit outside.
    assert {u.block for u in units if u.block is not None} == set(range(blocks))
    linear_params = {f"{path}.weight" for path, _, _ in spec.matrix_blocks(model).values()}
    assert linear_params <= scored
    if family == "swin":
        assert "layers.1.downsample.reduction.weight" in linear_params
    if name == "eva02_small_patch14_224":  # fused qkv: three row blocks of one Linear; GluMlp's fc1: x, gate
        blocks_of = spec.matrix_blocks(model)
        assert blocks_of["blocks.0.attn.k"] == ("blocks.0.attn.qkv", "k", (384, 768))
        # EVA's packed SwiGLU (GluMlp, gate_last=False) computes silu(rows 0:h) * rows h:2h: the gate first.
        assert blocks_of["blocks.0.mlp.fc1_g"] == ("blocks.0.mlp.fc1", "fc1_g", (0, 1024))
        assert blocks_of["blocks.0.mlp.fc1_x"] == ("blocks.0.mlp.fc1", "fc1_x", (1024, 2048))
        assert model.blocks[0].attn.qkv_bias_separate  # the qkv Linear is called: what sits on it takes part
        assert "blocks.0.attn.q_bias" not in scored


@pytest.mark.parametrize("backbone, params, gflops", [("swin_b", 86_743_224, 30.9)])  # EVA-02-L: README, 9 s
def test_plan_covers_swin_and_eva(backbone, params, gflops):
    """The shipped configs plan on the meta device: SPT-LoRA at 1 % trains the budget plus the head."""
    from spt_dist.plan import make_plan
    cfg = load_config([str(REPO / f"configs/backbones/{backbone}.yaml"), str(REPO / "configs/methods/spt_lora.yaml")],
                      ["selection.budget=0.01"])
    plan = make_plan(cfg, world_size=8, num_classes=100)
    assert plan.backbone_params == params and plan.trainable_params == round(0.01 * params) + 1024 * 100 + 100
    assert round(plan.forward_flops / 1e9, 1) == gflops  # timm's 15.5 GMACs, 2 FLOPs each


def test_unsupported_models_are_one_line_errors():
    with pytest.raises(UserError, match="model.name: unknown model 'resnet50'"):
        create_model("resnet50", 10)
    with pytest.raises(UserError, match="distilled DeiT has two heads"):
        create_model("deit_tiny_distilled_patch16_224", 10, device="meta")
    with pytest.raises(UserError, match=r"method.lora_targets: VisionTransformer has no 'fc1_g' matrices \(its "
                                        r"matrices: q, k, v, proj, fc1, fc2\)"):
        spt_dist.get_peft_model(create_model(VIT, 4), MethodConfig(name="lora", lora_targets=["q", "fc1_g"]))


# ------------------------------------------------------------------------------------------------ methods


def _train(peft, steps: int = 2):
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # dense_masked: no decay of frozen entries
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 4, (4,), generator=generator)
        F.cross_entropy(peft.train()(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", [SWIN, EVA, DINO])
def test_every_method_trains_and_merges_into_timm(name, tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))) for _ in range(2)]
    allocations = {
        "spt_lora": spt_dist.allocate(spt_dist.score(create_model(name, 4), batches), budget=0.03),
        "spt_adapter": spt_dist.allocate(spt_dist.score(create_model(name, 4), batches), budget=0.03,
                                         structured="adapter"),
        "gps": spt_dist.allocate(spt_dist.score(create_model(name, 4), batches, method="gps"), k=2),
    }
    decisions = {u["decision"] for u in allocations["spt_lora"].record["units"]}
    assert {"lora", "sparse", "full"} <= decisions, decisions
    for method in ("full", "linear", "lora", "spt_lora", "spt_adapter", "gps"):
        torch.manual_seed(0)
        base = create_model(name, 4)
        initial = {k: v.clone() for k, v in base.state_dict().items()}
        third = {EVA: "fc1_g", SWIN: "reduction"}.get(name, "fc2")  # a family's own matrix type
        how = allocations.get(method) or (MethodConfig(name="lora", lora_rank=4, lora_targets=["q", "v", third])
                                          if method == "lora" else method)
        peft = spt_dist.get_peft_model(base, how)
        _train(peft)
        trained = {n for n, p in peft.base_model.named_parameters() if p.requires_grad}
        state = peft.base_model.state_dict()
        for key, value in initial.items():  # the frozen base stays bit for bit
            if key not in trained:
                assert torch.equal(state[key], value), (method, key)
        assert any(not torch.equal(state[k], initial[k]) for k in trained if k in initial) or method in (
            "lora", "spt_lora", "spt_adapter"), method
        if method == "spt_adapter":
            with pytest.raises(UserError, match="cannot be merged"):
                peft.merge_and_unload()
            continue
        expected = logits(peft)
        merged = peft.merge_and_unload()
        path = str(tmp_path / f"{method}.safetensors")
        write_safetensors(path, merged.state_dict())
        plain = timm.create_model(name, pretrained=False, num_classes=4, checkpoint_path=path)
        torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_heat_map_rows_are_blocks_of_any_family():
    from spt_dist.selection.report import summary
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,)))]
    record = spt_dist.allocate(spt_dist.score(create_model(SWIN, 4), batches), budget=0.03).record
    lines = summary(record).splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("block"))
    assert lines[header].split() == ["block", "q", "k", "v", "proj", "fc1", "fc2", "vectors"]
    assert [line.split()[0] for line in lines[header + 1:]] == ["0", "1", "2", "3"]  # 2 stages x 2 blocks


@pytest.mark.parametrize("mode", ["delta", "dense_masked"])
def test_sparse_entries_of_a_layer_scale_train_and_merge(mode, tmp_path):
    """DINOv2's layer scales are vectors SPT scores: sparse entries on one train, the others stay, and the
    merged gamma loads into plain timm."""
    from spt_dist.peft.tuned import tune
    torch.manual_seed(0)
    model = create_model(DINO, 4).requires_grad_(False)
    before = model.blocks[0].ls1.gamma.detach().clone()
    tune(model, "blocks.0.ls1").add_sparse("gamma", torch.tensor([1, 5, 40]), mode)
    _train(model)
    gamma = model.blocks[0].ls1.effective("gamma").detach()
    moved = (gamma != before).nonzero().view(-1).tolist()
    assert moved == [1, 5, 40], moved
    expected = logits(model)
    merged = spt_dist.PeftModel(model, "spt").merge_and_unload()
    path = str(tmp_path / "merged.safetensors")
    write_safetensors(path, merged.state_dict())
    plain = timm.create_model(DINO, pretrained=False, num_classes=4, checkpoint_path=path)
    torch.testing.assert_close(logits(plain), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 2 ranks

SPT_LORA = ["method.name=spt_lora", "selection.budget=3000", "optim.weight_decay=0.05"]
GPS = ["method.name=gps", "selection.loss=ce", "selection.k=2"]
ZERO3, FSDP2 = ["engine.kind=deepspeed", "engine.zero_stage=3"], ["engine.kind=fsdp"]
RUNS = {  # name -> (model, method settings, engine): each family under ZeRO-3 and FSDP2, with SPT-LoRA and GPS
    "eva-zero3": (EVA, SPT_LORA, ZERO3), "eva-fsdp2": (EVA, GPS, FSDP2),
    "swin-zero3": (SWIN, SPT_LORA, ZERO3), "swin-fsdp2": (SWIN, GPS, FSDP2),
}
CALIBRATION = ["selection.batch_size=16", "selection.micro_batch_size=8", "selection.batches=3"]


@pytest.mark.parametrize("run", list(RUNS))
def test_two_rank_run_matches_one_process_and_plain_pytorch(run, synthetic_shards, tmp_path):
    model_name, settings, engine = RUNS[run]
    overrides = [*tiny_overrides(synthetic_shards, tmp_path, run), f"model.name={model_name}", *CALIBRATION,
                 *settings]
    check(run_job([TRAIN, "--config", "tests/configs/tiny.yaml", *overrides, *engine], nproc=2, timeout=400))
    out = tmp_path / run
    cfg = load_config(str(REPO / "tests/configs/tiny.yaml"), overrides)

    # The allocation: the library path in one process writes the same bytes.
    data = resolve_dataset(cfg.data)
    model = build_score_model(cfg, data.num_classes)
    sel = cfg.selection
    scores = spt_dist.score(model, calibration_batches(cfg, data, model), method=sel.method, loss="ce")
    allocation = spt_dist.allocate(scores, **(dict(budget=sel.budget) if sel.method == "spt" else dict(k=sel.k)))
    allocation.save(str(tmp_path / "one"))
    for file in ("allocation.json", "allocation.safetensors"):
        assert (tmp_path / "one" / file).read_bytes() == (out / file).read_bytes(), file

    # Training: plain PyTorch playing both ranks on the same PEFT model, bit for bit.
    torch.manual_seed(cfg.seed)
    reference = create_model(cfg.model.name, dataset_classes(cfg))
    record, indices = read_allocation(str(out))
    apply_allocation(reference, record, indices)
    initial = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    train_reference(cfg, reference, world=2)
    saved = load_file(str(out / "peft" / "peft_model.safetensors"))
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    assert {k for k in saved if not k.endswith("_delta_index")} == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), f"{run}: {key} differs by {(saved[key] - value).abs().max()}"
        if not key.rsplit(".", 1)[-1].startswith("lora_A"):
            assert not torch.equal(value, initial.get(key, torch.zeros_like(value))), f"{key} did not train"

    # The merged checkpoint in plain timm gives the PEFT model's logits.
    plain = timm.create_model(model_name, pretrained=False, num_classes=dataset_classes(cfg),
                              checkpoint_path=str(out / "model.safetensors"))
    torch.testing.assert_close(logits(plain), logits(load_pretrained(str(out / "peft"))), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ checkpoints


def _source(name: str, classes: int = 10):
    torch.manual_seed(3)
    model = create_model(name, classes)
    with torch.no_grad():  # zero-initialised tensors (cls_token, biases) get values, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _jax_npz(model) -> dict[str, np.ndarray]:
    """A ViT's weights under the original JAX (big_vision / vision_transformer) names and layouts: exactly
    what timm's `_load_weights` reads."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w = qkv_w[j * dim:(j + 1) * dim]  # [out, in] -> [in, heads, head_dim]
            out[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = w.T.reshape(dim, heads, -1)
            out[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, -1)
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, dim)
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[p + f"{ln}/scale"], out[p + f"{ln}/bias"] = sd[b + f"{norm}.weight"], sd[b + f"{norm}.bias"]
        for r, fc in ((0, "fc1"), (1, "fc2")):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.{fc}.bias"]
    return out


def test_jax_npz_loads_and_gives_the_same_logits(tmp_path):
    source = _source(VIT)
    arrays = _jax_npz(source)
    assert {k: list(v.shape) for k, v in arrays.items() if not k.startswith("head/")} == jax_shapes(source)
    path = str(tmp_path / "ViT-tiny.npz")
    np.savez(path, **arrays)
    torch.testing.assert_close(logits(create_model(VIT, 10, checkpoint=path)), logits(source), rtol=0, atol=1e-6)
    assert torch.equal(logits(create_model(VIT, 10, checkpoint=path)), logits(source))
    # A head for another label set stays the fresh one; the backbone is the file's.
    other = create_model(VIT, 3, checkpoint=path)
    assert torch.equal(other.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    # Wrong files: one line naming the first offending array.
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=r"missing 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias' \(expected "
                                        r"shape \[128\], "):
        create_model(VIT, 10, checkpoint=path)
    with pytest.raises(UserError, match=r"'embedding/kernel' has shape \[8, 8, 3, 64\] \(JAX layout\), expected "
                                        r"\[8, 8, 3, 96\]$") as err:
        create_model("vit_test_small_patch8_32", 10, checkpoint=path)
    assert "\n" not in str(err.value)


def test_mae_moco_and_safetensors_checkpoints_load(tmp_path):
    source = _source(VIT)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.manual_seed(7)
    target = create_model(VIT, 4)  # a 4-class head, freshly initialised, on the source's encoder
    target.load_state_dict(encoder, strict=False)
    expected = logits(target)

    def loaded(path: str):
        torch.manual_seed(7)  # the same fresh head as the source's
        return logits(create_model(VIT, 4, checkpoint=path))

    # MAE pre-training checkpoint: {'model': encoder + decoder + mask_token} (and its argparse Namespace).
    import argparse
    mae = dict(encoder, mask_token=torch.zeros(1, 1, 64), **{
        "decoder_embed.weight": torch.zeros(32, 64), "decoder_pos_embed": torch.zeros(1, 17, 32),
        "decoder_blocks.0.attn.qkv.weight": torch.zeros(96, 32), "decoder_norm.weight": torch.ones(32),
        "decoder_pred.weight": torch.zeros(192, 32)})
    torch.save({"model": mae, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16")},
               tmp_path / "mae_pretrain.pth")
    assert torch.equal(loaded(str(tmp_path / "mae_pretrain.pth")), expected)
    # MoCo v3: {'state_dict': module.base_encoder.* (head: the projection MLP), module.momentum_encoder.*,
    # module.predictor.*} beside the optimizer state.
    moco = {f"module.base_encoder.{k}": v for k, v in encoder.items()}
    moco |= {f"module.momentum_encoder.{k}": v + 1 for k, v in encoder.items()}
    moco |= {"module.base_encoder.head.0.weight": torch.zeros(256, 64), "module.predictor.0.weight": torch.zeros(8, 8)}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": moco, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "moco_v3.pth.tar")
    assert torch.equal(loaded(str(tmp_path / "moco_v3.pth.tar")), expected)
    # timm / HF hub safetensors, for every family.
    for name in (VIT, SWIN, EVA):
        model = _source(name, 4)
        write_safetensors(str(tmp_path / f"{name}.safetensors"), model.state_dict())
        assert torch.equal(logits(create_model(name, 4, checkpoint=str(tmp_path / f"{name}.safetensors"))),
                           logits(model))
    # Another family's or a wrong-sized file: one line, the first offending key and the expected shape.
    with pytest.raises(UserError, match=r"does not fit SwinTransformer: missing 'patch_embed.norm.weight' "
                                        r"\(expected shape \[32\]\) and \d+ more$"):
        create_model(SWIN, 4, checkpoint=str(tmp_path / f"{EVA}.safetensors"))
    state = load_file(str(tmp_path / f"{EVA}.safetensors"))
    state["blocks.1.mlp.fc1_g.weight"] = torch.zeros(170, 32)
    write_safetensors(str(tmp_path / "bad.safetensors"), state)
    with pytest.raises(UserError, match=r"'blocks.1.mlp.fc1_g.weight' has shape \[170, 32\], expected \[170, 64\]"):
        create_model(EVA, 4, checkpoint=str(tmp_path / "bad.safetensors"))


def test_merged_state_dict_keeps_trained_layer_scale_gamma():
    """A wrapped LayerScale (DINOv2/DeiT-III) keeps its merged gamma: the timm model gives the PEFT logits."""
    from spt_dist.peft.artifact import merged_state_dict
    from spt_dist.peft.tuned import tune
    name = "vit_test_dinov2_tiny_patch8_32"
    model = create_model(name, 10)
    tuned = tune(model, "blocks.0.ls1")
    tuned.add_sparse("gamma", torch.tensor([0, 3]), "delta")
    with torch.no_grad():
        tuned.gamma_delta.fill_(0.5)
    state = merged_state_dict(model)
    assert "blocks.0.ls1.gamma" in state
    base = timm.create_model(name, num_classes=10)
    assert base.load_state_dict(state, strict=False).missing_keys == []
    x = torch.randn(2, 3, 32, 32)
    model.eval(), base.eval()
    assert torch.equal(model(x), base(x))


def test_apply_description_prepares_a_fresh_fused_qkv_eva():
    """A trained fused-qkv EVA-02 described onto the user's fresh (unprepared) timm model keeps its qkv deltas."""
    from spt_dist.peft.allocated import apply_description, describe
    from spt_dist.peft.tuned import tune
    torch.manual_seed(0)
    kwargs = dict(num_classes=3, qkv_fused=True, qkv_bias=True)
    trained = timm.create_model(EVA, **kwargs)
    spec_for(trained).prepare_model(trained)
    fresh = timm.create_model(EVA, **kwargs)
    fresh.load_state_dict(trained.state_dict())
    trained.requires_grad_(False)
    tuned = tune(trained, "blocks.0.attn.qkv")
    tuned.add_sparse("weight", torch.arange(0, 4000, 7), "delta")
    with torch.no_grad():
        tuned.weight_delta.fill_(0.3)
    state = trained.state_dict()
    apply_description(fresh, describe(trained), state)
    fresh.load_state_dict(state, strict=False)
    trained.eval(), fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(trained.forward_features(x), fresh.forward_features(x))
    with torch.no_grad():
        tuned.weight_delta.zero_()
    assert not torch.equal(trained.forward_features(x), fresh.forward_features(x))


def _one_line(path: str, match: str, name: str = VIT) -> None:
    with pytest.raises(UserError, match=match) as err:
        create_model(name, 10, checkpoint=path)
    assert "\n" not in str(err.value), str(err.value)


def test_hostile_jax_npz_files_are_one_line_naming_the_array(tmp_path):
    source = _source(VIT)
    path = str(tmp_path / "edited.npz")
    block = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
    # Broadcastable wrong shapes are refused (timm's copy_ would take them), each naming its own array.
    for key, value, expected in [("Transformer/encoder_norm/scale", np.ones(1, np.float32), "[64]"),
                                 ("cls", np.ones(1, np.float32), "[1, 1, 64]"),
                                 (f"{block}query/kernel", np.zeros((64, 2, 31), np.float32), "[64, 2, 32]"),
                                 (f"{block}query/bias", np.zeros((2, 31), np.float32), "[2, 32]"),
                                 (f"{block}query/kernel", np.zeros((64, 128), np.float32), "[64, 2, 32]")]:
        arrays = _jax_npz(source)
        arrays[key] = value
        np.savez(path, **arrays)
        _one_line(path, f"'{re.escape(key)}' has shape {re.escape(str(list(value.shape)))} \\(JAX layout\\), "
                        f"expected {re.escape(expected)}$")
    # The 2-D (flattened heads) forms timm takes still load, to the same logits.
    arrays = _jax_npz(source)
    for n in ("query", "key", "value"):
        arrays[f"{block}{n}/kernel"] = arrays[f"{block}{n}/kernel"].reshape(64, 64)
        arrays[f"{block}{n}/bias"] = arrays[f"{block}{n}/bias"].reshape(64)
    arrays[f"{block}out/kernel"] = arrays[f"{block}out/kernel"].reshape(64, 64)
    np.savez(path, **arrays)
    assert torch.equal(logits(create_model(VIT, 10, checkpoint=path)), logits(source))
    # opt/target/: a missing array keeps its expected shape; a wrong one is named with the prefix.
    arrays = {f"opt/target/{k}": v for k, v in _jax_npz(source).items()}
    del arrays["opt/target/Transformer/encoder_norm/bias"]
    np.savez(path, **arrays)
    _one_line(path, r"missing 'opt/target/Transformer/encoder_norm/bias' \(expected shape \[64\], ")
    arrays["opt/target/Transformer/encoder_norm/bias"] = np.ones(3, np.float32)
    np.savez(path, **arrays)
    _one_line(path, r"'opt/target/Transformer/encoder_norm/bias' has shape \[3\] \(JAX layout\), expected \[64\]$")
    # An object array; not a zip at all.
    arrays = _jax_npz(source)
    arrays["embedding/bias"] = np.array([object()] * 64, dtype=object)
    np.savez(path, **arrays)
    _one_line(path, "'embedding/bias' is an array of Python objects")
    with open(path, "wb") as f:
        f.write(b"not a zip file at all")
    _one_line(path, f"model.checkpoint: cannot read '{re.escape(path)}' as a JAX .npz")


def test_hostile_torch_checkpoints_are_one_line(tmp_path):
    state = _source(VIT).state_dict()
    path = str(tmp_path / "odd.pth")
    for odd in (0, ("a",)):
        torch.save({odd: torch.zeros(1), **state}, path)
        _one_line(path, f"has a key that is not a string \\({re.escape(repr(odd))}\\)")
    torch.save({k: (torch.empty(v.shape, device="meta") if k == "cls_token" else v) for k, v in state.items()}, path)
    _one_line(path, "'cls_token' is a meta tensor")
    torch.save({k: (v.to(torch.complex64) if k == "cls_token" else v) for k, v in state.items()}, path)
    _one_line(path, "'cls_token' holds complex64, expected floating-point weights")
    # Swin: timm's converter looks up the module of each relative_position_bias_table.
    swin = {k: v.contiguous() for k, v in _source(SWIN).state_dict().items()}
    path = str(tmp_path / "swin.safetensors")
    write_safetensors(path, dict(swin, **{"extra.relative_position_bias_table": torch.zeros(49, 2)}))
    _one_line(path, r"unexpected 'extra.relative_position_bias_table' \(shape \[49, 2\]", SWIN)
    table = next(k for k in swin if k.endswith("relative_position_bias_table"))
    write_safetensors(path, dict(swin, **{table: torch.zeros(7)}))
    _one_line(path, f"'{re.escape(table)}' has shape \\[7\\], expected \\[49, 2\\]", SWIN)


def test_error_without_a_message_is_still_one_line(tmp_path, monkeypatch):
    import spt_dist.models as models

    def fail(*args, **kwargs):
        raise RuntimeError("")
    monkeypatch.setattr(torch, "load", fail)
    path = str(tmp_path / "x.pth")
    open(path, "wb").close()
    with pytest.raises(UserError, match=f"model.checkpoint: cannot read '{re.escape(path)}': RuntimeError$"):
        models.read_state_dict(path)


def test_heat_map_columns_blocks_and_lora_targets_come_from_the_specs():
    """A family's matrix types and block paths are its spec's: the heat map's columns (the order unchanged) and
    block rows, and the names method.lora_targets knows, are derived from the registered specs."""
    from spt_dist.backbones import backbones
    from spt_dist.backbones.base import all_matrix_types, block_pattern
    from spt_dist.selection.report import _families
    from spt_dist.config import MATRIX_TYPES
    types = all_matrix_types()
    assert types == MATRIX_TYPES  # what config validation knows without importing the specs (and timm)
    for spec in backbones().values():
        assert [t for t in types if t in spec.matrix_types()] == list(spec.matrix_types())
    columns, block = _families()
    assert columns == list(types)
    assert block.match("layers.1.blocks.0.attn.qkv.weight").group(1) == "layers.1.blocks.0"
    assert block.match("blocks.11.mlp.fc1.weight").group(1) == "blocks.11"
    assert re.fullmatch(block_pattern(), "blocks.3")
    MethodConfig(name="lora", lora_targets=list(types)).validate()
    with pytest.raises(UserError, match="method.lora_targets: .*unknown matrix"):
        MethodConfig(name="lora", lora_targets=["x"]).validate()
