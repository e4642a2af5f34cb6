"""Files in and out: artifacts tied to their base weights, the merge command's --out, atomic writes on a full
disk, output file modes, printed hints that survive a shell, run names that stay inside output.dir."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import spt_dist
from spt_dist.atomic import write_json, write_safetensors, write_text
from spt_dist.errors import UserError
from spt_dist.models import create_model
from spt_dist.peft import artifact
from spt_dist.peft.allocated import apply_allocation, trainable_state
from spt_dist.peft.tuned import Tuned
from tests.conftest import REPO

TINY = "vit_test_tiny_patch8_32"


@pytest.fixture(scope="module")
def lora_allocation():
    torch.manual_seed(0)
    model = create_model(TINY, 4)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))]
    return spt_dist.allocate(spt_dist.score(model, batches), budget=3000, structured="lora")


@pytest.fixture
def run_artifact(lora_allocation, tmp_path):
    """An artifact as a training run writes it: built on the weights of `base.safetensors` (model.checkpoint),
    trained a little (its deltas and LoRA non-zero)."""
    torch.manual_seed(1)
    ckpt = str(tmp_path / "base.safetensors")
    write_safetensors(ckpt, create_model(TINY, 4).state_dict())
    model = apply_allocation(create_model(TINY, 4, checkpoint=ckpt), lora_allocation.record,
                             lora_allocation.indices)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    directory = str(tmp_path / "peft")
    artifact.save_pretrained(directory, model, model.state_dict(), dict(
        model=TINY, num_classes=4, img_size=None, checkpoint=ckpt, seed=0, method="spt_lora"))
    return directory, ckpt


def _other_weights(ckpt: str) -> None:
    """The base file replaced by other weights of the same names and shapes."""
    state = load_file(ckpt)
    write_safetensors(ckpt, {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()})


# ------------------------------------------------------------------------------------- base fingerprint


def test_merge_refuses_another_base_of_the_same_shapes(run_artifact, tmp_path, capsys):
    directory, ckpt = run_artifact
    recorded = json.loads(open(os.path.join(directory, artifact.CONFIG_FILE)).read())["base_fingerprint"]
    assert recorded.startswith("sha256:") and len(recorded) == 7 + 64
    out = str(tmp_path / "merged.safetensors")
    assert artifact.merge([directory, "--out", out]) == 0  # its own base: merges
    capsys.readouterr()
    _other_weights(ckpt)
    assert artifact.merge([directory, "--out", str(tmp_path / "other.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("spt_dist: error: ")
    assert recorded[:19] in err and "--allow-other-base" in err and err.count("sha256:") == 2
    assert not (tmp_path / "other.safetensors").exists()
    assert artifact.merge([directory, "--out", str(tmp_path / "other.safetensors"), "--allow-other-base"]) == 0
    merged, other = load_file(out), load_file(str(tmp_path / "other.safetensors"))
    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_library_refuses_another_base_untouched_and_older_artifacts_still_load(lora_allocation, tmp_path):
    torch.manual_seed(0)
    peft = spt_dist.get_peft_model(create_model(TINY, 4), lora_allocation)
    peft.save_pretrained(str(tmp_path / "art"))
    torch.manual_seed(0)
    spt_dist.PeftModel.from_pretrained(create_model(TINY, 4), str(tmp_path / "art")).merge_and_unload()
    torch.manual_seed(5)
    other = create_model(TINY, 4)
    with pytest.raises(UserError, match=r"trained on base weights sha256:[0-9a-f]{12}, these are sha256:[0-9a-f]{12}"
                                        r".*allow_other_base=True"):
        spt_dist.PeftModel.from_pretrained(other, str(tmp_path / "art"))
    assert not any(isinstance(m, Tuned) for m in other.modules())  # refused before any change
    spt_dist.PeftModel.from_pretrained(other, str(tmp_path / "art"), allow_other_base=True).merge_and_unload()
    # The fingerprint is under the config's checksum: taking it out does not switch the base check off.
    config_path = tmp_path / "art" / artifact.CONFIG_FILE
    config = json.loads(config_path.read_text())
    del config["base_fingerprint"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="peft_config.json' does not match its checksum"):
        spt_dist.PeftModel.from_pretrained(create_model(TINY, 4), str(tmp_path / "art"))


def test_fingerprint_is_of_the_frozen_base_only(lora_allocation):
    """Recorded when the PEFT model is built, as a plain attribute (state dicts unchanged); training what the
    artifact stores does not change it, the frozen base does."""
    from spt_dist.peft import fingerprint
    torch.manual_seed(0)
    plain_keys = set(create_model(TINY, 4).state_dict())
    torch.manual_seed(0)
    model = apply_allocation(create_model(TINY, 4), lora_allocation.record, lora_allocation.indices)
    recorded = fingerprint.recorded(model)
    assert recorded and not any("fingerprint" in k for k in model.state_dict()) and plain_keys <= set(model.state_dict())
    stored = trainable_state(model.state_dict(), model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
        assert fingerprint.base_fingerprint(model.state_dict(), stored) == recorded
        model.blocks[0].norm1.weight.add_(1e-3)  # frozen
        assert fingerprint.base_fingerprint(model.state_dict(), stored) != recorded


# ------------------------------------------------------------------------------------- merge --out


def test_merge_out_creates_missing_directories_and_refuses_a_directory(run_artifact, tmp_path, capsys):
    directory, _ = run_artifact
    out = tmp_path / "new dir" / "deeper" / "merged.safetensors"
    assert artifact.merge([directory, "--out", str(out)]) == 0 and out.is_file()
    capsys.readouterr()
    assert artifact.merge([directory, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spt_dist: error: --out: ") and "is a directory" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------- disk full


_IN_NAMESPACE = r"""
import contextlib, io, json, os, sys
from spt_dist.atomic import write_text
from spt_dist.peft.artifact import merge
where, art = sys.argv[1], sys.argv[2]
result = {}
with open(os.path.join(where, "merged.safetensors"), "w") as f:
    f.write("old merged")
with open(os.path.join(where, "notes.txt"), "w") as f:
    f.write("old notes")
err = io.StringIO()
with contextlib.redirect_stderr(err):
    result["merge_rc"] = merge([art, "--out", os.path.join(where, "merged.safetensors")])
result["merge_err"] = err.getvalue()
try:
    write_text(os.path.join(where, "notes.txt"), "x" * 200_000)
    result["text_err"] = None
except Exception as e:
    result["text_err"] = f"{type(e).__name__}: {e}"
result["files"] = {name: open(os.path.join(where, name)).read() for name in sorted(os.listdir(where))}
print("RESULT " + json.dumps(result))
"""


def test_a_full_disk_is_one_line_and_keeps_the_old_files(run_artifact, tmp_path):
    """A real full file system: a 64 KiB tmpfs in a private mount namespace (the merged tiny model is ~320 KB)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here: cannot make a small tmpfs")
    directory, _ = run_artifact
    where = tmp_path / "small"
    where.mkdir()
    script = tmp_path / "in_namespace.py"
    script.write_text(_IN_NAMESPACE)
    inner = (f"mount -t tmpfs -o size=64k none {shlex.quote(str(where))} || exit 97; "
             f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(where))} "
             f"{shlex.quote(directory)}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inner], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 97 or (proc.returncode != 0 and "RESULT" not in proc.stdout and
                                 ("unshare" in proc.stderr or "mount" in proc.stderr)):
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[:200]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(line[len("RESULT "):])
    assert result["merge_rc"] == 2, result
    assert len(result["merge_err"].strip().splitlines()) == 1
    assert result["merge_err"].startswith("spt_dist: error: cannot write '") and "merged.safetensors" in \
        result["merge_err"] and "no space left" in result["merge_err"]
    assert result["text_err"] and result["text_err"].startswith("UserError: cannot write '") and \
        "notes.txt" in result["text_err"] and "no space left" in result["text_err"]
    # The old files as they were, no temp file left behind.
    assert result["files"] == {"merged.safetensors": "old merged", "notes.txt": "old notes"}


# ------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_safetensors(str(tmp_path / "a.safetensors"), {"x": torch.zeros(2)})
        write_json(str(tmp_path / "a.json"), {"a": 1})
        write_text(str(tmp_path / "a.txt"), "a")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "a.json", "a.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, (name, oct((tmp_path / name).stat().st_mode))


# ------------------------------------------------------------------------------------- printed hints


def test_the_sweep_report_hint_survives_the_shell(tmp_path, monkeypatch, capsys):
    from spt_dist import sweep
    spec = tmp_path / "mini.yaml"
    spec.write_text(f"config: [{REPO / 'configs/demo.yaml'}]\ngrid:\n  optim.lr: [0.001]\n")
    out = tmp_path / "it's a sweep dir"
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: 0)  # the runs themselves are not the point
    assert sweep.main([str(spec), "--output-dir", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("report: "))
    assert shlex.split(line.removeprefix("report: ")) == ["spt-report", str(out / "mini")]


def test_a_binary_sweep_file_is_one_line(tmp_path):
    from spt_dist.sweep import load_sweep
    (tmp_path / "sweep.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="sweep: '.*sweep.yaml' is not a text file"):
        load_sweep(str(tmp_path / "sweep.yaml"))


def test_checkpoint_state_without_its_keys_and_damaged_checkpoints_are_one_line(tmp_path):
    """state.json lacking a key is one line naming it; `--resume` of a run directory skips checkpoints that fail
    their checksums (or lost a file) for the newest intact one, saying which and why; a damaged checkpoint asked
    for by name, or none intact, is one line."""
    from spt_dist.checkpoint import RECORD_DIGEST, Checkpoint, file_digest, find_checkpoint, record_digest
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        directory = root / f"step_{step:08d}"
        directory.mkdir(parents=True)
        for name in ("trainable.safetensors", "optimizer.safetensors", "rank_00000.safetensors"):
            (directory / name).write_bytes(b"%s %d" % (name.encode(), step))
        state = {"step": step, "optimizer_steps": step, "world_size": 1, "samples_seen": 8 * step, "scheduler": {},
                 "config": {"method": {"name": "full"}}, "format": "consolidated",
                 "files": {name: file_digest(str(directory / name)) for name in os.listdir(directory)}}
        (directory / "state.json").write_text(json.dumps(dict(state, **{RECORD_DIGEST: record_digest(state)})))
    (root / "step_00000003" / "trainable.safetensors").write_bytes(b"trainable.safetensors 4")  # a flipped byte
    (root / "step_00000002" / "trainable.safetensors").unlink()  # a lost file
    found, warnings = find_checkpoint(str(tmp_path / "run"), None)
    assert found == str(root / "step_00000001") and warnings == [
        f"skipped the damaged checkpoint {root / 'step_00000003'}: trainable.safetensors does not match its checksum",
        f"skipped the damaged checkpoint {root / 'step_00000002'}: trainable.safetensors is missing or unreadable "
        "(No such file or directory)"]
    with pytest.raises(UserError, match="step_00000003 is damaged: trainable.safetensors does not match"):
        find_checkpoint(str(root / "step_00000003"), None)

    state = json.loads((root / "step_00000001" / "state.json").read_text())
    del state["scheduler"]
    (root / "step_00000001" / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"state.json' lacks 'scheduler'"):
        Checkpoint.read(str(root / "step_00000001"))
    with pytest.raises(UserError, match="no intact checkpoint in .*; newest: trainable.safetensors does not match"):
        find_checkpoint("latest", str(tmp_path / "run"))
