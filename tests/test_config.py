"""Config loading: YAML + dotted overrides, typed and validated, one-line errors naming the key."""

import pytest

from spt_dist.config import Config, load_config, save_config
from spt_dist.errors import UserError
from tests.conftest import REPO


def test_demo_config_loads_with_overrides():
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["optim.lr=3e-4", "engine.zero_stage=3", "method.name=lora",
                                                        "method.lora_targets=[q,k,v,fc1]", "model.img_size=64"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 3e-4 and cfg.engine.zero_stage == 3 and cfg.model.img_size == 64
    assert cfg.method.lora_targets == ["q", "k", "v", "fc1"]
    assert cfg.data.batch_size == 32  # from the file


def test_yaml11_exponent_floats_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 0\n")
    cfg = load_config(str(path))
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.weight_decay, float)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["optim.max_steps=7"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("foo=1", "foo: unknown key"),
    ("data.batch_size=abc", "data.batch_size: expected an integer"),
    ("data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("data.batch_size=0", "data.batch_size: must be > 0"),
    ("engine.zero_stage=4", "engine.zero_stage: must be 0, 1, 2 or 3"),
    ("engine.kind=megatron", "engine.kind: must be one of deepspeed, fsdp"),
    ("method.lora_targets=[q,x]", "method.lora_targets: unknown matrix"),
    ("data.augment=maybe", "data.augment: expected true or false"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("optim=3", "optim: expected a section"),
    ("model.checkpoint=/no/such/file.pth", "model.checkpoint: no such file"),
    ("nonsense", "expected key=value"),
    ("method.allocation=runs/x", "method.allocation: method.name full trains no allocation"),
    # Malformed or hostile values: one line naming the key, never a traceback.
    ("optim.lr=[1", "optim.lr: cannot read the value '[1'"),
    ("optim.lr={a: 1", "optim.lr: cannot read the value"),
    ("optim.lr=!!python/object:os.system", "optim.lr: cannot read the value '!!python/object:os.system'"),
    ("optim.lr=!!python/object/apply:os.system [echo hi]", "optim.lr: cannot read the value"),
    ("optim.max_steps=99999999999999999999999", "optim.max_steps: 99999999999999999999999 is too large"),
    ("seed=99999999999999999999999", "seed: 99999999999999999999999 is too large"),
    ("optim.lr=1" + "0" * 400, "optim.lr: 1000"),
    ("optim.lr=1e999", "optim.lr: expected a finite number"),
    ("optim.lr=.inf", "optim.lr: expected a finite number"),
    ("engine.timeout_s=9999999999999", "engine.timeout_s: must be > 0 and at most a year"),
    # The run directory stays inside output.dir.
    ("output.name=../../x", "output.name: must be a relative path that stays inside output.dir"),
    ("output.name=a/../../x", "output.name: must be a relative path that stays inside output.dir"),
    ("output.name=/tmp/x", "output.name: must be a relative path that stays inside output.dir"),
    ("output.name=..", "output.name: must be a relative path that stays inside output.dir"),
    ("output.name=.", "output.name: must be a relative path that stays inside output.dir"),
    ("output.name=''", "output.name: must be a relative path that stays inside output.dir"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config(str(REPO / "tests/configs/tiny.yaml"), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="--config: no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    for name, data in (("binary.yaml", bytes(range(256))), ("image.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"--config: '.*{name}' is not a text file"):
            load_config(str(tmp_path / name))
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("1: 2\nnull: 3\noptim: {lr: 0.1}\n")  # keys that are no names
    with pytest.raises(UserError, match="unknown key"):
        load_config(str(numbers))


def test_nested_run_names_inside_output_dir_are_allowed():
    assert load_config(str(REPO / "configs/demo.yaml"), ["output.name=sweep/run-1"]).output.name == "sweep/run-1"


def test_peft_methods_imply_the_selection():
    demo = str(REPO / "configs/demo.yaml")
    assert load_config(demo).selection.method == "spt" and load_config(demo).selection.structured == "lora"
    sel = load_config(demo, ["method.name=spt_adapter"]).selection
    assert (sel.method, sel.structured) == ("spt", "adapter")
    assert load_config(demo, ["method.name=gps"]).selection.method == "gps"
    with pytest.raises(UserError, match="selection.method: method.name gps needs gps"):
        load_config(demo, ["method.name=gps", "selection.method=spt"])
    with pytest.raises(UserError, match="selection.structured: method.name spt_adapter needs adapter"):
        load_config(demo, ["method.name=spt_adapter", "selection.structured=lora"])


def test_demo_compares_spt_lora_and_lora_at_the_same_budget():
    """launch/demo.sh trains LoRA (method.lora_rank) and SPT-LoRA (selection.budget) from configs/demo.yaml: the
    budget is LoRA's number of trainable backbone parameters."""
    from spt_dist.models import create_model
    from spt_dist.peft.baselines import apply_method
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["method.name=lora"])
    model = apply_method(create_model(cfg.model.name, 5, device="meta"), cfg.method)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
    assert load_config(str(REPO / "configs/demo.yaml")).selection.budget == lora


def test_yaml_aliases_are_refused_and_long_values_cut(tmp_path):
    """A "billion laughs" config (nested aliases) would expand past any memory: aliases are refused with one
    line; a value named in an error message is cut to a line's worth."""
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("seed: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"k{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 10)}]\n" for i in range(12)))
    with pytest.raises(UserError, match=r"line 2 is not valid YAML \(alias \*a: aliases are not allowed here\)"):
        load_config(str(laughs))
    with pytest.raises(UserError, match="aliases are not allowed"):
        load_config(str(REPO / "tests/configs/tiny.yaml"), ["seed=&a [1, *a]"])
    with pytest.raises(UserError) as err:
        load_config(str(REPO / "tests/configs/tiny.yaml"), [f"seed=[{', '.join(['x' * 100] * 1000)}]"])
    assert len(str(err.value)) < 200
