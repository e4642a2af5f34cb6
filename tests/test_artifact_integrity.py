"""What a run hands on is checked before it is used (issue 26, items 3 and 4): the PEFT artifact (`peft/`) and
the allocation pair carry SHA-256 checksums, every field is validated, and an allocation's record must be what
its indices and the model's layout give. Anything wrong is one line naming the file, key or tensor."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import spt_dist
from spt_dist.errors import UserError
from spt_dist.models import create_model
from spt_dist.peft import artifact
from tests import test_hardening_io as hardening
from tests.conftest import TRAIN, run_job, tiny_overrides

TINY = hardening.TINY
lora_allocation = hardening.lora_allocation  # fixtures: a tiny LoRA allocation, an artifact as a run writes it
run_artifact = hardening.run_artifact


# ------------------------------------------------------------------------------------------- helpers


def _path(directory: str, name: str) -> str:
    return os.path.join(directory, name)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _sha256_of_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _edit_config(directory: str, edit) -> None:
    config = _read_json(_path(directory, artifact.CONFIG_FILE))
    edit(config)
    _write_json(_path(directory, artifact.CONFIG_FILE), config)


def _rewrite_weights(directory: str, edit) -> None:
    """peft_model.safetensors rewritten by `edit(tensors)`, its checksum in peft_config.json made to match (as a
    tool that re-signs would): what is refused then is the content, not the checksum."""
    path = _path(directory, artifact.WEIGHTS_FILE)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, {"format": "spt_dist-peft-1"})
    _edit_config(directory, lambda c: c.setdefault("sha256", {}).__setitem__(artifact.WEIGHTS_FILE,
                                                                               _sha256_of_file(path)))


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)  # inside the last tensor's data: a float that changes a little
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("spt_dist: error: ") and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------- the PEFT artifact


def test_a_flipped_byte_in_the_weights_fails_their_checksum(run_artifact):
    directory, _ = run_artifact
    artifact.load_pretrained(directory)  # intact: loads
    _flip_a_byte(_path(directory, artifact.WEIGHTS_FILE))
    with pytest.raises(UserError, match=r"artifact: '.*peft_model.safetensors' does not match the checksum in "
                                        r"peft_config.json"):
        artifact.load_pretrained(directory)


def test_spt_merge_of_a_tampered_artifact_is_rc_2_and_one_line(run_artifact, tmp_path):
    directory, _ = run_artifact
    _flip_a_byte(_path(directory, artifact.WEIGHTS_FILE))
    out = tmp_path / "merged.safetensors"
    spt_merge = os.path.join(os.path.dirname(sys.executable), "spt-merge")
    command = [spt_merge] if os.path.exists(spt_merge) else [sys.executable, "-m", "spt_dist.peft.artifact", "merge"]
    result = subprocess.run([*command, directory, "--out", str(out)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"spt_dist: error: artifact: '{_path(directory, artifact.WEIGHTS_FILE)}' does not match the checksum in "
        "peft_config.json (damaged or edited); export it again"], result.stderr
    assert not out.exists()


def test_an_edited_config_fails_its_checksum(run_artifact):
    directory, _ = run_artifact

    def scale(config):
        layer = next(spec for spec in config["structure"]["layers"].values() if spec["lora"])
        layer["lora_scale"] = 2.0  # a valid value: the LoRA products would count double
    _edit_config(directory, scale)
    with pytest.raises(UserError, match=r"artifact: '.*peft_config.json' does not match its checksum"):
        artifact.load_pretrained(directory)


def test_an_artifact_without_checksums_says_it_is_older(run_artifact):
    directory, _ = run_artifact
    _edit_config(directory, lambda c: c.pop("sha256", None))
    with pytest.raises(UserError, match=r"artifact: '.*peft_config.json' has no checksum: written by an older "
                                        r"spt_dist; re-export it"):
        artifact.load_pretrained(directory)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_are_refused_naming_the_tensor(run_artifact, value):
    directory, _ = run_artifact
    _rewrite_weights(directory, lambda t: t["head.weight"].view(-1).__setitem__(3, value))
    with pytest.raises(UserError, match=r"artifact: '.*peft_model.safetensors': 'head.weight' holds NaN or "
                                        r"infinite values"):
        artifact.load_pretrained(directory)


def _first(names, suffix):
    return next(k for k in sorted(names) if k.endswith(suffix) or f".{suffix}" in k)


@pytest.mark.parametrize("which", ["head.bias", "lora_A_", "_delta_index", "_delta"])
def test_a_missing_tensor_is_named_as_missing(run_artifact, which):
    """Before: a missing head or full vector was a base mismatch, a missing LoRA or index a 'structure' error."""
    directory, _ = run_artifact
    names = load_file(_path(directory, artifact.WEIGHTS_FILE)).keys()
    name = which if which in names else _first(names, which)
    _rewrite_weights(directory, lambda t: t.pop(name))
    with pytest.raises(UserError, match=rf"artifact: '{name}' is missing from '.*peft_model.safetensors' "
                                        r"\(its structure in peft_config.json names it\)"):
        artifact.load_pretrained(directory)


def test_a_tensor_its_structure_does_not_name_is_refused(run_artifact):
    """A base weight slipped into the artifact would replace the base's silently (and leave the fingerprint)."""
    directory, ckpt = run_artifact
    _rewrite_weights(directory, lambda t: t.__setitem__("blocks.0.norm1.weight", load_file(ckpt)[
        "blocks.0.norm1.weight"] + 1))
    with pytest.raises(UserError, match=r"'.*peft_model.safetensors' holds 'blocks.0.norm1.weight', which its "
                                        r"structure does not name"):
        artifact.load_pretrained(directory)


@pytest.mark.parametrize("which,dtype", [("head.weight", torch.float16), ("_delta", torch.bfloat16),
                                         ("_delta_index", torch.int32)])
def test_a_tensor_of_another_dtype_is_refused_not_converted(run_artifact, which, dtype):
    directory, _ = run_artifact
    names = load_file(_path(directory, artifact.WEIGHTS_FILE)).keys()
    name = which if which in names else _first(names, which)
    _rewrite_weights(directory, lambda t: t.__setitem__(name, t[name].to(dtype)))
    want = "torch.int64" if which == "_delta_index" else "torch.float32"
    with pytest.raises(UserError, match=rf"'.*peft_model.safetensors': '{name}' is {dtype} there, this model's "
                                        rf"is {want}"):
        artifact.load_pretrained(directory)


@pytest.mark.parametrize("value", [12, "sha256:1234", ["sha256:" + "0" * 64], True])
def test_a_base_fingerprint_of_another_type_does_not_switch_the_base_check_off(run_artifact, tmp_path, capsys,
                                                                                value):
    """Before: anything but a string switched the check off, and spt-merge merged onto another base with rc 0."""
    directory, ckpt = run_artifact
    _edit_config(directory, lambda c: c.__setitem__("base_fingerprint", value))
    hardening._other_weights(ckpt)
    out = tmp_path / "merged.safetensors"
    assert artifact.merge([directory, "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"'base_fingerprint' must be \"sha256:\" and 64 hex digits, or null (got {value!r})" in err, err
    assert not out.exists()


@pytest.mark.parametrize("text", ["[]", "12", '"peft"', "null"])
def test_a_config_that_is_not_an_object_is_one_line(run_artifact, tmp_path, capsys, text):
    """Before: `AttributeError: 'list' object has no attribute 'get'`, a traceback."""
    directory, _ = run_artifact
    with open(_path(directory, artifact.CONFIG_FILE), "w") as f:
        f.write(text)
    with pytest.raises(UserError, match=r"artifact: '.*peft_config.json' is not a PEFT config \(a JSON object\)"):
        spt_dist.PeftModel.from_pretrained(create_model(TINY, 4), directory)
    assert artifact.merge([directory, "--out", str(tmp_path / "merged.safetensors")]) == 2
    assert "is not a PEFT config" in _one_line(capsys)


def _lora_layer(config):
    return next(spec for spec in config["structure"]["layers"].values() if spec["lora"])


@pytest.mark.parametrize("edit,key", [
    (lambda c: c.__setitem__("num_classes", "4"), "num_classes"),
    (lambda c: c.__setitem__("num_classes", True), "num_classes"),
    (lambda c: c.__setitem__("seed", 0.5), "seed"),
    (lambda c: c.__setitem__("model", ["vit"]), "model"),
    (lambda c: c.__setitem__("img_size", -32), "img_size"),
    (lambda c: c.__setitem__("checkpoint", 7), "checkpoint"),
    (lambda c: c.__setitem__("format", 2), "format"),
    (lambda c: c.__setitem__("sha256", "abc"), "sha256"),
    (lambda c: c.__setitem__("structure", []), "structure"),
    (lambda c: c["structure"].__setitem__("full", "head.weight"), "structure.full"),
    (lambda c: c["structure"].pop("layers"), "structure.layers"),
    (lambda c: _lora_layer(c).__setitem__("lora_scale", "2"), "lora_scale"),
    (lambda c: _lora_layer(c).__setitem__("lora_scale", float("nan")), "lora_scale"),
    (lambda c: _lora_layer(c)["lora"].__setitem__(next(iter(_lora_layer(c)["lora"])), [0.0, 64]), "lora"),
    (lambda c: next(iter(c["structure"]["layers"].values()))["sparse"].__setitem__("weight", "sparse"), "sparse"),
], ids=["classes-str", "classes-bool", "seed", "model", "img_size", "checkpoint", "format", "sha256", "structure",
        "full", "layers", "scale-str", "scale-nan", "rows", "mode"])
def test_every_config_field_is_type_checked(run_artifact, edit, key):
    directory, _ = run_artifact
    _edit_config(directory, edit)
    with pytest.raises(UserError) as caught:
        artifact.load_pretrained(directory)
    message = str(caught.value)
    assert message.startswith("artifact: '") and "peft_config.json'" in message and f"{key}'" in message, message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------- allocations


def _save(allocation, directory) -> str:
    allocation.save(str(directory))
    return str(directory)


def _first_unit(record, decision="sparse"):
    return next(u for u in record["units"] if u["decision"] == decision)


def _drop_index_tensor(directory):
    path = _path(directory, "allocation.safetensors")
    record = _read_json(_path(directory, "allocation.json"))
    tensors = load_file(path)
    tensors.pop(_first_unit(record)["tensor"])
    save_file(tensors, path, {"method": record["method"]})


def _edit_record(edit):
    def apply(directory):
        path = _path(directory, "allocation.json")
        record = _read_json(path)
        edit(record)
        _write_json(path, record)
    return apply


@pytest.mark.parametrize("attack,message", [
    (_drop_index_tensor, r"'.*allocation.safetensors' does not match the checksum in allocation.json"),
    (_edit_record(lambda r: r.__setitem__("units", [])), r"'.*allocation.json' does not match its checksum"),
    (_edit_record(lambda r: _first_unit(r).__setitem__("picks", _first_unit(r)["picks"] + 1)),
     r"'.*allocation.json' does not match its checksum"),
    (_edit_record(lambda r: r["totals"].__setitem__("sparse_entries", 1)), r"'.*allocation.json' does not match "
                                                                             r"its checksum"),
    (_edit_record(lambda r: r.pop("sha256", None)), r"'.*allocation.json' has no checksum: written by an older "
                                                    r"spt_dist"),
], ids=["deleted-index-tensor", "no-units", "picks", "totals", "no-checksum"])
def test_the_allocation_pair_is_checksummed(lora_allocation, tmp_path, attack, message):
    directory = _save(lora_allocation, tmp_path / "alloc")
    loaded = spt_dist.Allocation.load(directory)
    assert loaded.record == lora_allocation.record  # the checksum is not part of the record
    assert loaded.indices.keys() == lora_allocation.indices.keys()
    attack(directory)
    with pytest.raises(UserError, match="allocation: " + message):
        spt_dist.Allocation.load(directory)


def _without_first_sparse_tensor(record, indices):
    indices.pop(_first_unit(record)["tensor"])


def _stray_index(record, indices):
    """One more index, in a frozen unit's entries (the sparse units' counts unchanged)."""
    frozen = _first_unit(record, "frozen")
    index = indices.get(frozen["tensor"], torch.zeros(0, dtype=torch.int32))
    start = frozen.get("rows", [0])[0] * (frozen["size"] // (frozen["rows"][1] - frozen["rows"][0])) \
        if "rows" in frozen else 0
    indices[frozen["tensor"]] = torch.unique(torch.cat([index, torch.tensor([start], dtype=index.dtype)]))


def _drop_unit(record, indices):
    record["units"].remove(_first_unit(record, "frozen"))


def _more_picks(record, indices):
    """One more pick on a sparse unit, the rest of the record made to agree (costs, totals, τ): only the indices
    can tell."""
    from spt_dist.selection.allocation import spt_record
    from spt_dist.selection.layout import build_layout
    unit = _first_unit(record)
    picks = [u["picks"] for u in record["units"]]
    picks[record["units"].index(unit)] += 1
    record.update(spt_record(build_layout(create_model(TINY, 4), "spt"), record["settings"], picks,
                             record["threshold"]))
    assert record["units"][record["units"].index(_first_unit(record))]["name"] == unit["name"]  # still sparse


def _edited_totals(record, indices):
    record["totals"]["sparse_entries"] += 5


def _edited_cost(record, indices):
    record["cost"] += 5


@pytest.mark.parametrize("edit,message", [
    (_without_first_sparse_tensor, r"allocation: unit '[^']+' records \d+ picks, allocation.safetensors holds 0 of "
                                   r"its indices \(it has none of '[^']+'\)"),
    (lambda r, i: r.__setitem__("units", []), r"allocation: unit '[^']+' of this model is missing from "
                                              r"allocation.json \(0 units listed, the model has \d+\)"),
    (_drop_unit, r"allocation: unit '[^']+' of this model is missing from allocation.json"),
    (_more_picks, r"allocation: unit '[^']+' records \d+ picks, allocation.safetensors holds \d+ of its indices"),
    (_stray_index, r"allocation: allocation.safetensors holds 1 index of '[^']+' outside the allocation's sparse "
                   r"units"),
    (_edited_totals, r"allocation: totals.sparse_entries is \d+, recomputed: \d+"),
    (_edited_cost, r"allocation: cost is \d+, recomputed: \d+"),
], ids=["deleted-index-tensor", "no-units", "unit-dropped", "picks", "stray-index", "totals", "cost"])
def test_the_allocation_record_is_checked_against_its_indices_and_the_layout(lora_allocation, edit, message):
    """In memory (no checksum to fail): what get_peft_model, the trainer and every loader apply."""
    record, indices = copy.deepcopy(lora_allocation.record), dict(lora_allocation.indices)
    edit(record, indices)
    model = create_model(TINY, 4)
    with pytest.raises(UserError, match=message):
        spt_dist.get_peft_model(model, spt_dist.Allocation(record, indices))
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_a_decision_the_picks_do_not_give_is_refused(lora_allocation):
    record = copy.deepcopy(lora_allocation.record)
    unit = _first_unit(record, "sparse")
    unit["decision"], unit["cost"] = "full", unit["size"]  # a whole vector trained where the scores chose a few
    if unit["kind"] != "vector":
        unit["decision"] = "frozen"
    with pytest.raises(UserError, match=rf"allocation: unit '{unit['name']}': decision is '{unit['decision']}', "
                                        r"recomputed: 'sparse'"):
        spt_dist.get_peft_model(create_model(TINY, 4), spt_dist.Allocation(record, dict(lora_allocation.indices)))


def test_a_gps_allocation_is_checked_too():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))]
    allocation = spt_dist.allocate(spt_dist.score(create_model(TINY, 4), batches, method="gps"), k=1)
    spt_dist.get_peft_model(create_model(TINY, 4), allocation)  # as made: applies
    record = copy.deepcopy(allocation.record)
    _first_unit(record)["picks"] += 1
    with pytest.raises(UserError, match=r"allocation: unit '[^']+': picks is \d+, recomputed: \d+"):
        spt_dist.get_peft_model(create_model(TINY, 4), spt_dist.Allocation(record, dict(allocation.indices)))
    indices = dict(allocation.indices)
    indices.pop(next(iter(indices)))
    with pytest.raises(UserError, match=r"allocation: unit '[^']+' records \d+ picks, allocation.safetensors holds 0"):
        spt_dist.get_peft_model(create_model(TINY, 4), spt_dist.Allocation(allocation.record, indices))


def test_training_from_a_tampered_allocation_stops_with_one_line(lora_allocation, synthetic_shards, tmp_path):
    directory = _save(lora_allocation, tmp_path / "alloc")
    _edit_record(lambda r: r.__setitem__("units", []))(directory)
    result = run_job([TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, tmp_path, "x"),
                      "method.name=spt_lora", f"method.allocation={directory}"], launcher="python", timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"spt_dist: error: method.allocation: '{_path(directory, 'allocation.json')}' does not match its checksum "
        "(damaged or edited); run `--stage select` first"], result.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


# ------------------------------------------------------------------------------------- model.checkpoint


def test_a_pickled_checkpoint_says_what_is_accepted_not_torchs_weights_only_false(tmp_path):
    """Before: torch's first line, advising to re-run torch.load with weights_only=False (which runs the file's
    code)."""
    import datetime
    path = str(tmp_path / "pickled.pth")
    torch.save({**create_model(TINY, 4).state_dict(), "saved_on": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(UserError) as caught:
        create_model(TINY, 4, checkpoint=path)
    message = str(caught.value)
    assert message.startswith(f"model.checkpoint: cannot read '{path}': not a file of plain tensors (Unsupported "
                              "global: GLOBAL datetime.date); accepted: .safetensors, a torch file"), message
    assert "weights_only" not in message and "\n" not in message
