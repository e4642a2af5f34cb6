"""spt_dist as a library (spt_dist.api): the README's example runs as written, and the Python path gives what
the command line gives: the same scores (torch.equal), allocation files (bytes) and trained tensors
(torch.equal) in one process; the same allocation bytes on 2 ranks, plain and through ZeRO-3 and FSDP2.
"""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

import spt_dist
from spt_dist.config import load_config
from spt_dist.data.dataset import resolve_dataset
from spt_dist.models import create_model
from spt_dist.peft.tuned import Tuned
from spt_dist.selection.scoring import build_score_model
from tests.conftest import REPO, TRAIN, check, run_job, tiny_overrides
from tests.reference import train_reference
from tests.test_selection_runs import CALIBRATION, read_scores
from tests.workers.api_calibration import calibration_batches

SETTINGS = {"spt": ["method.name=spt_lora", "selection.budget=3000", "optim.weight_decay=0.05"],
            "gps": ["method.name=gps", "selection.loss=ce", "selection.k=2"]}


def test_readme_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- library example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert 15 <= len(code.strip().splitlines()) <= 30
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    finally:
        os.chdir(cwd)
    assert (tmp_path / "out" / "allocation" / "allocation.json").exists()
    plain = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert not any(k.endswith(("_delta", "_delta_index")) or "lora_" in k for k in plain)
    # The saved artifact on the same base gives the merged model again.
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8)
    merged = spt_dist.PeftModel.from_pretrained(base, str(tmp_path / "out" / "peft")).merge_and_unload()
    assert merged.state_dict().keys() == plain.keys()
    assert all(torch.equal(v, plain[k]) for k, v in merged.state_dict().items())


def config(method: str, shards, out, name: str):
    return load_config(str(REPO / "tests/configs/tiny.yaml"),
                       [*tiny_overrides(shards, out, name), *CALIBRATION, *SETTINGS[method]])


@pytest.fixture(scope="module")
def cli_runs(synthetic_shards, tmp_path_factory):
    """The command line in one process: select then train (SPT-LoRA), select (GPS)."""
    out = tmp_path_factory.mktemp("cli")
    common = ["--config", "tests/configs/tiny.yaml", *CALIBRATION]
    check(run_job([TRAIN, *common, *tiny_overrides(synthetic_shards, out, "spt"), *SETTINGS["spt"]],
                  launcher="python", timeout=240))
    check(run_job([TRAIN, *common, "--stage", "select", *tiny_overrides(synthetic_shards, out, "gps"),
                   *SETTINGS["gps"]], launcher="python", timeout=240))
    return out


@pytest.mark.parametrize("method", ["spt", "gps"])
def test_python_path_equals_the_command_line(method, cli_runs, synthetic_shards, tmp_path):
    cfg = config(method, synthetic_shards, tmp_path, "api")
    data = resolve_dataset(cfg.data)
    model = build_score_model(cfg, data.num_classes)  # the seeded model the score pass builds
    scores = spt_dist.score(model, calibration_batches(cfg, data, model), method=method, loss="ce")
    want = read_scores(cli_runs / method)
    got = scores.full()
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert torch.equal(value.reshape(-1), want[name]), name

    sel = cfg.selection
    settings = dict(budget=sel.budget, structured=sel.structured) if method == "spt" else dict(k=sel.k)
    allocation = spt_dist.allocate(scores, **settings)
    allocation.save(str(tmp_path / "allocation"))
    for file in ("allocation.json", "allocation.safetensors"):
        assert (tmp_path / "allocation" / file).read_bytes() == (cli_runs / method / file).read_bytes(), file
    if method == "gps":
        return

    # Trained from the Python path's model = the command line's run, tensor for tensor.
    torch.manual_seed(cfg.seed)
    peft = spt_dist.get_peft_model(create_model(cfg.model.name, data.num_classes), allocation)
    train_reference(cfg, peft.base_model, world=1)
    saved = load_file(str(cli_runs / "spt" / "peft" / "peft_model.safetensors"))
    trained = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert {f"base_model.{k}" for k in saved if not k.endswith("_delta_index")} == trained.keys()
    for name, value in trained.items():
        assert torch.equal(saved[name.removeprefix("base_model.")], value.detach()), name

    # The run's artifact, loaded onto the same base and merged, is the run's merged checkpoint.
    torch.manual_seed(cfg.seed)
    plain = spt_dist.PeftModel.from_pretrained(create_model(cfg.model.name, data.num_classes),
                                               str(cli_runs / "spt" / "peft")).merge_and_unload()
    merged = load_file(str(cli_runs / "spt" / "model.safetensors"))
    state = plain.state_dict()
    assert state.keys() == merged.keys()
    assert all(torch.equal(state[k], merged[k]) for k in merged)


@pytest.mark.parametrize("engines", [["plain", "zero3"], ["fsdp2"]])
def test_python_path_on_two_ranks_gives_the_same_allocation(engines, cli_runs, synthetic_shards, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": [str(REPO / "tests/configs/tiny.yaml")],
                                "overrides": [*tiny_overrides(synthetic_shards, tmp_path, "unused"), *CALIBRATION,
                                              *SETTINGS["spt"]]}))
    check(run_job(["tests/workers/api_select.py", str(spec), str(tmp_path), *engines], nproc=2, timeout=300))
    for engine in engines:
        for file in ("allocation.json", "allocation.safetensors"):
            assert (tmp_path / engine / file).read_bytes() == (cli_runs / "spt" / file).read_bytes(), (engine, file)


def test_library_errors_are_one_line_user_errors():
    from spt_dist.errors import UserError
    model = create_model("vit_test_tiny_patch8_32", 4)
    with pytest.raises(UserError, match="method must be 'spt' or 'gps'"):
        spt_dist.score(model, [], method="ssf")
    with pytest.raises(UserError, match="trains an allocation"):
        spt_dist.get_peft_model(model, "spt_lora")
    scores = spt_dist.score(model, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))])
    with pytest.raises(UserError, match="SPT takes a budget"):
        spt_dist.allocate(scores)
    with pytest.raises(UserError, match="SPT takes a budget"):
        spt_dist.allocate(scores, budget=100, k=2)
    with pytest.raises(UserError, match="structured must be"):
        spt_dist.allocate(scores, budget=100, structured="ia3")
    with pytest.raises(UserError, match="no batches"):
        spt_dist.score(create_model("vit_test_tiny_patch8_32", 4), [])
    with pytest.raises(UserError, match="batches must be"):
        spt_dist.score(create_model("vit_test_tiny_patch8_32", 4), [torch.randn(2, 3, 32, 32)])
    with pytest.raises(UserError, match="engine= needs a process group"):
        spt_dist.score(create_model("vit_test_tiny_patch8_32", 4), [], engine="zero3")
    with pytest.raises(UserError, match="num_classes=0"):
        spt_dist.score(create_model("vit_test_tiny_patch8_32", 4), [], method="gps", loss="supcon")
    with pytest.raises(UserError, match="timm-style model"):
        spt_dist.score(torch.nn.Linear(2, 2), [])


@pytest.fixture(scope="module")
def tiny_allocation():
    torch.manual_seed(0)
    model = create_model("vit_test_tiny_patch8_32", 4)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))) for _ in range(2)]
    return spt_dist.allocate(spt_dist.score(model, batches), budget=3000, structured="adapter")


def _edited(allocation, unit_edit=None, index_edit=None):
    import copy
    record, indices = copy.deepcopy(allocation.record), dict(allocation.indices)
    if unit_edit:
        unit = next(u for u in record["units"] if u["decision"] == unit_edit[0])
        unit[unit_edit[1]] = unit_edit[2]
    if index_edit:
        name = next(iter(indices))
        indices[name] = index_edit(indices[name])
    return spt_dist.Allocation(record, indices)


@pytest.mark.parametrize("edit,message", [
    (dict(unit_edit=("adapter", "rows", [0, 1000])), "do not fit"),
    (dict(unit_edit=("adapter", "rows", [0.0, 64.0])), "do not fit"),
    (dict(unit_edit=("adapter", "rows", [64, 0])), "do not fit"),
    (dict(unit_edit=("adapter", "rank", -3)), "a whole rank in [1, "),
    (dict(unit_edit=("adapter", "rank", 10**8)), "a whole rank in [1, "),
    (dict(unit_edit=("adapter", "decision", "LoRA")), "unknown decision 'LoRA'"),
    (dict(unit_edit=("sparse", "tensor", "blocks.9.mlp.fc1.weight")), "no parameter 'blocks.9.mlp.fc1.weight'"),
    (dict(index_edit=lambda i: i + 10_000_000), "must be increasing whole numbers"),
    (dict(index_edit=lambda i: i.float()), "must be increasing whole numbers"),
    (dict(index_edit=lambda i: torch.cat([i, i])), "must be increasing whole numbers"),
    (dict(index_edit=lambda i: i - 1_000_000), "must be increasing whole numbers"),
])
def test_hostile_allocations_fail_with_one_line(tiny_allocation, edit, message):
    from spt_dist.errors import UserError
    model = create_model("vit_test_tiny_patch8_32", 4)
    with pytest.raises(UserError, match=re.escape(message)):
        spt_dist.get_peft_model(model, _edited(tiny_allocation, **edit))
    assert not any(p.requires_grad is False for p in model.parameters())  # refused before anything changed


def test_another_models_allocation_and_artifacts_fail_with_one_line(tiny_allocation, tmp_path):
    from spt_dist.errors import UserError
    with pytest.raises(UserError, match="another model"):
        spt_dist.get_peft_model(create_model("vit_test_small_patch8_32", 4), tiny_allocation)
    deeper = timm.create_model("vit_test_tiny_patch8_32", pretrained=False, num_classes=4, depth=4)
    with pytest.raises(UserError, match="scored params, this one has"):  # same names and widths, more blocks
        spt_dist.get_peft_model(deeper, tiny_allocation)
    peft = spt_dist.get_peft_model(create_model("vit_test_tiny_patch8_32", 4), tiny_allocation)
    with pytest.raises(UserError, match="Adapters"):
        peft.merge_and_unload()
    assert sum(isinstance(m, Tuned) for m in peft.modules()) > 0  # nothing merged half-way
    peft.save_pretrained(str(tmp_path / "art"))
    with pytest.raises(UserError, match="PeftModel.from_pretrained"):
        from spt_dist.peft.artifact import load_pretrained
        load_pretrained(str(tmp_path / "art"))
    with pytest.raises(UserError, match="another base"):
        spt_dist.PeftModel.from_pretrained(create_model("vit_test_tiny_patch8_32", 10), str(tmp_path / "art"))
    assert peft.get_classifier() is peft.base_model.get_classifier()  # attributes reach the base, as HF PEFT



@pytest.fixture
def spt_sparse():
    """A method registered for one test: SPT with sparse entries only (no LoRA/Adapter modules)."""
    from spt_dist.methods import _METHODS, PeftMethod, register_peft_method
    yield register_peft_method(PeftMethod("spt_sparse", selection="spt", structured="none",
                                          budget=("selection.budget", "{:g}")))
    del _METHODS["spt_sparse"]


def test_a_new_method_is_one_registration(spt_sparse):
    """Config, planner and reports know the registered method with no other edit."""
    from spt_dist.plan import make_plan
    from spt_dist.report import _budget
    demo = str(REPO / "configs/demo.yaml")
    cfg = load_config(demo, ["method.name=spt_sparse", "selection.budget=2000"])
    assert (cfg.selection.method, cfg.selection.structured) == ("spt", "none")
    plan = make_plan(cfg, 2, 4)
    assert plan.trainable_params == 2000 + 64 * 4 + 4 and plan.scored_params > 0
    assert _budget(cfg.to_dict()) == "2000"
    from spt_dist.errors import UserError
    with pytest.raises(UserError, match="method.name: unknown method 'nope' \\(known: full, linear, lora, spt_lora"):
        load_config(demo, ["method.name=nope"])


def test_non_editable_install_runs_the_demo_and_the_slurm_dry_run(tmp_path):
    """`pip install .` (a wheel, not the editable checkout) in a fresh venv, used from another directory: the
    console scripts make shards, train on 2 ranks through `torchrun -m spt_dist.train`, merge the artifact
    and print a Slurm dry run. The heavy dependencies come from this venv (a .pth line), not the network."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bin_dir = venv / "bin"
    wheels, source = tmp_path / "wheels", tmp_path / "source"  # built from a copy: the checkout stays untouched
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "spt_dist", source / "spt_dist", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                            "--no-build-isolation", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              *map(str, wheels.glob("spt_dist-*.whl"))], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SLURM_", "PYTHONPATH"))}
    env.update(OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{env['PATH']}")
    env.pop("RANK", None)

    def run(*argv, timeout=300):
        result = subprocess.run(list(argv), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    where = run(str(bin_dir / "python"), "-c", "import spt_dist, sys; print(spt_dist.__file__)").stdout
    assert str(site) in where and str(REPO) not in where  # the installed copy, not the checkout
    run("spt-shards", "synthetic", "--out", "data", "--classes", "4", "--train", "256", "--test", "64",
        "--samples-per-shard", "32")
    run(str(bin_dir / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "spt_dist.train", "--config", str(REPO / "tests/configs/tiny.yaml"), "method.name=spt_lora",
        "selection.budget=2000", "selection.batches=2", "selection.batch_size=16",
        "data.train_shards=data/train-{000000..000007}.tar", "data.eval_shards=data/test-{000000..000001}.tar",
        "output.dir=runs", "output.name=demo")
    assert (work / "runs" / "demo" / "metrics.json").exists()
    run("spt-merge", "runs/demo/peft", "--out", "merged.safetensors")
    merged, run_merged = load_file(str(work / "merged.safetensors")), load_file(str(work / "runs/demo/model.safetensors"))
    assert merged.keys() == run_merged.keys() and all(torch.equal(merged[k], run_merged[k]) for k in merged)
    dry = run("spt-slurm", "launch", "--dry-run", "--nodelist", "gpu[01-02]", "--gpus-per-node", "2",
              "--job-id", "7", "--config", str(REPO / "tests/configs/tiny.yaml"), "output.name=big").stdout
    assert "-m spt_dist.train" in dry and "node 1 gpu02: ranks 2-3" in dry


def test_training_an_adapter_allocation_as_lora_stops_before_training(tiny_allocation, synthetic_shards, tmp_path):
    tiny_allocation.save(str(tmp_path / "adapters"))
    result = run_job([TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "x"),
                      "method.name=spt_lora", f"method.allocation={tmp_path / 'adapters'}"], launcher="python",
                     timeout=300)
    assert result.returncode == 2 and "holds adapter modules, method.name spt_lora trains lora" in result.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_corrupt_allocation_and_artifact_files_fail_with_one_line(tiny_allocation, tmp_path):
    from spt_dist.errors import UserError
    tiny_allocation.save(str(tmp_path / "alloc"))
    (tmp_path / "alloc" / "allocation.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(UserError, match="allocation: cannot read '.*allocation.safetensors'"):
        spt_dist.Allocation.load(str(tmp_path / "alloc"))
    peft = spt_dist.get_peft_model(create_model("vit_test_tiny_patch8_32", 4), tiny_allocation)
    peft.save_pretrained(str(tmp_path / "art"))
    (tmp_path / "art" / "peft_model.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(UserError, match="artifact: cannot read '.*peft_model.safetensors'"):
        spt_dist.PeftModel.from_pretrained(create_model("vit_test_tiny_patch8_32", 4), str(tmp_path / "art"))
