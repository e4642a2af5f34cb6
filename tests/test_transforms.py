"""Transforms follow the model's real input size (model.img_size), not the size timm's pretrained_cfg records."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from spt_dist.config import DataConfig
from spt_dist.data.transforms import build_contrastive_transform, build_transforms, model_input_size
from spt_dist.errors import UserError
from spt_dist.models import create_model
from tests.conftest import TRAIN, check, run_job, tiny_overrides


@pytest.mark.parametrize("name, img_size", [("vit_test_tiny_patch8_32", 64), ("vit_giant_patch14_224", 28)])
def test_every_transform_gives_the_models_input_size(name, img_size):
    model = create_model(name, 4, img_size=img_size, device="meta")
    assert model_input_size(model) == (img_size, img_size)
    image = Image.new("RGB", (50, 40))
    train, evaluate = build_transforms(model, DataConfig(augment=True))
    for transform in (train, evaluate, build_contrastive_transform(model)):
        assert tuple(transform(image).shape) == (3, img_size, img_size)


def test_building_the_transforms_draws_no_random_numbers():
    """The exactness of every run rests on the RNG streams: checking the transforms must not shift them."""
    model = create_model("vit_test_tiny_patch8_32", 4)
    torch.manual_seed(0)
    build_transforms(model, DataConfig(augment=True))
    build_contrastive_transform(model)
    assert torch.equal(torch.rand(4), torch.manual_seed(0) and torch.rand(4))


def test_a_transform_the_model_cannot_take_is_refused_in_one_line(monkeypatch):
    import spt_dist.data.transforms as transforms
    model = create_model("vit_test_tiny_patch8_32", 4)
    monkeypatch.setattr(transforms, "_data_config", lambda m, args: transforms.resolve_data_config(
        dict(args, input_size=(3, 48, 48)), model=m))  # a size that would reach the model unnoticed
    with pytest.raises(UserError, match=r"the evaluation transform gives 48x48 images but the model takes 32x32"):
        build_transforms(model, DataConfig())


def test_a_model_at_another_img_size_trains_on_2_ranks(synthetic_shards, tmp_path):
    """The attack of issue 26: model.img_size=64 on 32 px shards failed in the first step on every rank."""
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "img64"),
            "model.img_size=64", "data.workers=1", "optim.max_steps=2"]
    check(run_job(args, nproc=2, timeout=300))
    assert (tmp_path / "img64" / "metrics.json").exists()
