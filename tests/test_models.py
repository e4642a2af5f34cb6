"""Model factory, local checkpoints, LoRA layers and the baseline methods (in-process, fast)."""

import pytest
import timm
import torch

from spt_dist.atomic import write_safetensors
from spt_dist.config import MethodConfig
from spt_dist.errors import UserError
from spt_dist.models import create_model
from spt_dist.peft.baselines import apply_method, format_trainable_parameters, trainable_parameters
from spt_dist.peft.lora import matrix_blocks
from spt_dist.peft.tuned import Tuned

TINY = "vit_test_tiny_patch8_32"


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="model.name: unknown model 'vit_nope'"):
        create_model("vit_nope", 10)
    with pytest.raises(UserError, match="model.name: unknown model 'resnet50'"):
        create_model("resnet50", 10)


@pytest.mark.parametrize("name, backbone, width", [("vit_base_patch16_224", 85_798_656, 768),
                                                   ("vit_huge_patch14_224", 630_764_800, 1280)])
def test_big_vits_build_on_meta_device(name, backbone, width):
    model = create_model(name, 10, device="meta")
    assert sum(p.numel() for p in model.parameters()) == backbone + width * 10 + 10


def test_local_checkpoint_loads_backbone_and_resizes_head(tmp_path):
    torch.manual_seed(1)
    source = create_model(TINY, 10)
    path = str(tmp_path / "weights.safetensors")
    write_safetensors(path, source.state_dict())
    model = create_model(TINY, 3, checkpoint=path)
    for name, value in model.state_dict().items():
        if name.startswith("head."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, source.state_dict()[name]), name
    # timm's own loader reads the same file for the registered test model.
    same = timm.create_model(TINY, num_classes=10, checkpoint_path=path)
    assert torch.equal(same.head.weight, source.head.weight)
    pth = str(tmp_path / "weights.pth")
    torch.save({"state_dict": source.state_dict()}, pth)
    assert torch.equal(create_model(TINY, 10, checkpoint=pth).head.weight, source.head.weight)


def test_bad_checkpoints_are_user_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="model.checkpoint: cannot read"):
        create_model(TINY, 10, checkpoint=str(garbage))
    other = str(tmp_path / "other.safetensors")
    write_safetensors(other, {"something.else": torch.zeros(2)})
    with pytest.raises(UserError, match="does not fit"):
        create_model(TINY, 10, checkpoint=other)


def test_checkpoints_of_other_shapes_name_the_first_offending_key(tmp_path):
    state = create_model(TINY, 10).state_dict()
    cases = [
        ("blocks.0.attn.qkv.weight", torch.zeros(5, 5), "'blocks.0.attn.qkv.weight' has shape [5, 5], expected [192, 64]"),
        ("pos_embed", torch.zeros(1, 7, 64), "'pos_embed' has shape [1, 7, 64], expected [1, 17, 64]"),
        ("cls_token", torch.zeros(1, 1, 32), "'cls_token' has shape [1, 1, 32], expected [1, 1, 64]"),
        ("pos_embed", torch.zeros(7, 64), "timm cannot convert it"),
        ("blocks.0.norm1.weight", None, "missing 'blocks.0.norm1.weight' (expected shape [64])"),
        ("extra.weight", torch.zeros(1), "unexpected 'extra.weight' (shape [1])"),
    ]
    for i, (key, value, message) in enumerate(cases):
        edited = {k: v for k, v in state.items() if k != key}
        if value is not None:
            edited[key] = value
        path = str(tmp_path / f"edited{i}.safetensors")
        write_safetensors(path, edited)
        with pytest.raises(UserError) as err:
            create_model(TINY, 10, checkpoint=path)
        assert str(err.value).startswith(f"model.checkpoint: '{path}' does not fit VisionTransformer: ")
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_tuned_layer_starts_at_base_and_merges():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    x = torch.randn(5, 16)
    expected = base(x).detach()
    layer = Tuned(base)
    layer.add_lora("q", (0, 16), rank=4)
    layer.add_adapter("v", (32, 48), rank=2)
    layer.add_sparse("weight", torch.tensor([3, 200, 700]))
    layer.add_sparse("bias", torch.tensor([20]))
    assert torch.equal(layer(x), expected)  # B, the adapter's up and the deltas start at zero
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith(("lora_B", "weight_delta", "bias_delta")):
                p.normal_()
    assert torch.equal(layer(x)[:, 16:20], expected[:, 16:20])  # rows with no module and no delta
    assert torch.equal(layer.effective("weight").reshape(-1)[[0, 1, 2, 4]], base.weight.reshape(-1)[[0, 1, 2, 4]])
    with pytest.raises(ValueError, match="adapters"):
        layer.merged()
    del layer.adapters["v"]  # without the adapter, the merged layer computes the same
    merged = layer.merged()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, merged["weight"], merged["bias"]),
                               rtol=1e-5, atol=1e-5)


def test_module_drop_path_drops_whole_samples_of_the_module_output_in_training_only():
    """SPEC 2: drop-path on the LoRA/Adapter output, per sample; the base layer's output is never dropped."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    x = torch.randn(64, 3, 16)
    plain = base(x).detach()
    layer = Tuned(base)
    layer.add_lora("q", (0, 16), rank=4)
    layer.add_adapter("v", (32, 48), rank=2)
    layer.set_dropout(0.0, drop_path=0.5)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith(("lora_B", "adapter_up")):
                p.normal_()
    with torch.no_grad():
        full = layer.eval()(x)  # eval: nothing dropped
        trained = layer.train()(x)
    for rows in ((0, 16), (32, 48)):
        base_part, module_part = plain[..., rows[0]:rows[1]], (full - plain)[..., rows[0]:rows[1]]
        got = trained[..., rows[0]:rows[1]]
        dropped = torch.isclose(got, base_part, atol=1e-6).flatten(1).all(1)
        kept = torch.isclose(got, base_part + 2 * module_part, atol=1e-5).flatten(1).all(1)
        assert bool((dropped ^ kept).all()) and 10 < int(dropped.sum()) < 54  # each sample one or the other
    assert torch.equal(trained[..., 16:32], plain[..., 16:32])


def test_matrix_blocks_split_fused_qkv():
    blocks = matrix_blocks(create_model(TINY, 10))
    assert blocks["blocks.0.attn.q"] == ("blocks.0.attn.qkv", "q", (0, 64))
    assert blocks["blocks.1.attn.v"] == ("blocks.1.attn.qkv", "v", (128, 192))
    assert blocks["blocks.1.mlp.fc1"] == ("blocks.1.mlp.fc1", "fc1", (0, 128))
    assert len(blocks) == 2 * 6


def test_methods_choose_what_trains():
    full = apply_method(create_model(TINY, 10), MethodConfig(name="full"))
    assert trainable_parameters(full)[0] == trainable_parameters(full)[1]
    linear = apply_method(create_model(TINY, 10), MethodConfig(name="linear"))
    assert {n for n, p in linear.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    lora = apply_method(create_model(TINY, 10), MethodConfig(name="lora", lora_rank=4, lora_targets=["q", "v", "fc2"]))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.lora_A_q" in names and "blocks.0.attn.qkv.lora_B_v" in names
    assert "blocks.0.mlp.fc2.lora_A_fc2" in names and not any("_k" in n for n in names)
    # 2 blocks x (q, v: A 4x64 + B 64x4; fc2: A 4x128 + B 64x4) + head 64x10+10
    assert trainable_parameters(lora)[0] == 2 * (2 * (256 + 256) + 512 + 256) + 650
    assert format_trainable_parameters(lora).startswith("trainable params: 4,234 || all params: ")
