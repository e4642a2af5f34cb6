"""A checkpoint's own record (state.json) is checked like its files: its digest, the files its format requires,
its fields against the directory and their types. A checkpoint that fails is skipped by `--resume latest` for the
one before it (saying why) and refused, in one line, when named. A save that fails (a full disk) leaves no
.partial directory behind, and its error is one line.

One real 2-rank run (4 steps, checkpoints at 2 and 4) is shared by the module; its checkpoints are copied and
edited in-process. Two more real runs: the resume from a tampered newest checkpoint, and a save on a full disk."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spt_dist.checkpoint import find_checkpoint, save_checkpoint
from spt_dist.errors import UserError
from tests.conftest import REPO, TRAIN, check, free_port, kill_tree, run_job, tiny_overrides

RECIPE = ["optim.max_steps=4", "output.checkpoint_every=2", "output.keep_last=0"]


@pytest.fixture(scope="module")
def run(synthetic_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity")
    check(run_job([TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, out, "run"),
                   *RECIPE], nproc=2, timeout=300))
    return out / "run"


def copied(run: Path, where: Path) -> tuple[Path, Path, Path]:
    """(run directory, step_2, step_4) of a copy of `run`'s checkpoints."""
    shutil.copytree(run / "checkpoints", where / "run" / "checkpoints")
    root = where / "run" / "checkpoints"
    return where / "run", root / "step_00000002", root / "step_00000004"


def edit_state(directory: Path, change) -> None:
    path = directory / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state, indent=2))


def assert_skipped(run_dir: Path, previous: Path, newest: Path, reason: str) -> None:
    """`--resume latest` falls back to `previous`, saying why; naming `newest` is one UserError."""
    found, warnings = find_checkpoint("latest", str(run_dir))
    assert found == str(previous), warnings
    assert len(warnings) == 1 and warnings[0].startswith(f"skipped the damaged checkpoint {newest}: ") and \
        reason in warnings[0], warnings
    with pytest.raises(UserError) as refused:
        find_checkpoint(str(newest), None)
    assert f"--resume: the checkpoint {newest} is damaged: " in str(refused.value) and reason in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_fresh_checkpoint_records_its_own_digest(run):
    from spt_dist.checkpoint import Checkpoint, record_digest
    for step in (2, 4):
        checkpoint = Checkpoint.read(str(run / "checkpoints" / f"step_{step:08d}"))
        assert checkpoint.problem() is None
        assert checkpoint.state["record_sha256"] == record_digest(checkpoint.state)
        assert sorted(checkpoint.state["files"]) == ["optimizer.safetensors", "rank_00000.safetensors",
                                                     "rank_00001.safetensors", "trainable.safetensors"]
    assert find_checkpoint("latest", str(run)) == (str(run / "checkpoints" / "step_00000004"), [])


_EDITED = "state.json does not match its record checksum"


@pytest.mark.parametrize("change,reason", [
    (lambda s: s.update(step=3), _EDITED),
    (lambda s: s.update(samples_seen=s["samples_seen"] + 16), _EDITED),
    (lambda s: s["scheduler"].update(last_epoch=s["scheduler"]["last_epoch"] - 1), _EDITED),
    (lambda s: s.update(optimizer_steps=s["optimizer_steps"] + 1), _EDITED),
    (lambda s: s.update(record_sha256="0" * 64), _EDITED),
    (lambda s: s.update(files={}), "state.json's 'files' does not list trainable.safetensors"),
    (lambda s: s["files"].pop("rank_00001.safetensors"), "state.json's 'files' does not list rank_00001.safetensors"),
    (lambda s: [s.pop("files"), s.pop("record_sha256")], "state.json has no 'record_sha256' (edited, or written by"),
    (lambda s: s.pop("files"), "state.json has no 'files'"),
    (lambda s: s.pop("format"), "state.json has no 'format'"),
], ids=["step", "samples_seen", "scheduler", "optimizer_steps", "record_digest", "files_emptied", "file_unlisted",
        "no_checksums", "files_deleted", "format_deleted"])
def test_an_edited_record_is_skipped_for_the_previous_checkpoint(run, tmp_path, change, reason):
    run_dir, previous, newest = copied(run, tmp_path)
    edit_state(newest, change)
    assert_skipped(run_dir, previous, newest, reason)


@pytest.mark.parametrize("change,reason", [
    (lambda s: s.update(step=3), "state.json says step 3, the directory step_00000004"),
    (lambda s: s.update(samples_seen="64"), "state.json's 'samples_seen' is not a whole number"),
    (lambda s: s.update(optimizer_steps=True), "state.json's 'optimizer_steps' is not a whole number"),
    (lambda s: s.update(step=-4), "state.json's 'step' is not a whole number"),
    (lambda s: s.update(scheduler=[]), "state.json's 'scheduler' is not a JSON object"),
    (lambda s: s.update(format="zipped"), "state.json's 'format' is 'zipped'"),
], ids=["step", "samples_seen", "optimizer_steps", "negative_step", "scheduler", "format"])
def test_a_record_with_a_valid_digest_is_still_cross_checked(run, tmp_path, change, reason):
    """Fields checked against the directory and for their types, whatever the digest says (a record rewritten
    whole, or one from before record digests)."""
    from spt_dist.checkpoint import record_digest
    run_dir, previous, newest = copied(run, tmp_path)

    def rewrite(state):
        change(state)
        state["record_sha256"] = record_digest(state)
    edit_state(newest, rewrite)
    assert_skipped(run_dir, previous, newest, reason)


def test_tampered_newest_checkpoint_resumes_from_the_one_before(run, synthetic_shards, tmp_path):
    """The issue's case: the newest checkpoint with a flipped byte in its weights, its files table emptied and
    its step edited. The resume says it skipped it, continues exactly from the one before, and ends with the
    uninterrupted run's weights."""
    shutil.copytree(run, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    with open(newest / "trainable.safetensors", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    edit_state(newest, lambda s: s.update(files={}, step=3))
    (tmp_path / "run" / "metrics.json").unlink()
    result = check(run_job([TRAIN, "--config", "tests/configs/tiny.yaml",
                            *tiny_overrides(synthetic_shards, tmp_path, "run"), *RECIPE, "--resume", "latest"],
                           nproc=2, timeout=300))
    assert f"skipped the damaged checkpoint {newest}: {_EDITED}" in result.stdout, result.stdout[-3000:]
    assert f"resumed from {tmp_path}/run/checkpoints/step_00000002 (step 2): data, RNG and state exactly" \
        in result.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["resumed_from_step"] == 2
    expected, got = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


# --------------------------------------------------------------------------- a failed save


class _Engine:
    """What save_checkpoint asks of an engine (consolidated format), on one process."""

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        return {"w": torch.ones(4)}

    def optimizer_state(self):
        return {"w": {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}}, 1


def _save(run_dir: Path, step: int) -> str:
    return save_checkpoint(str(run_dir), step, engine=_Engine(), rank=0, rank_state={"data": {}},
                           state={"world_size": 1, "samples_seen": 8 * step, "scheduler": {},
                                  "config": {"method": {"name": "full"}}})


@pytest.mark.parametrize("failure", ["disk_full", "any_exception"])
def test_a_failed_save_removes_its_partial_directory(tmp_path, monkeypatch, failure):
    """In one process (a world of one): the optimizer file meets a full disk (a UserError naming it, from
    spt_dist.atomic), or writing this rank's files fails otherwise (a bug: its own exception). Either way no
    .partial directory is left (nor one an earlier killed save left), and the complete checkpoint before stays."""
    import safetensors.torch

    from spt_dist import checkpoint
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / ".partial-step_00000009").mkdir()  # a save killed half-way
    if failure == "disk_full":
        save_file = safetensors.torch.save_file

        def full(tensors, path, metadata=None):
            if "optimizer" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            save_file(tensors, path, metadata)
        monkeypatch.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(UserError, match=r"cannot write '.*optimizer.safetensors': no space left") as e:
            _save(tmp_path, 2)
        assert "\n" not in str(e.value)
    else:
        def broken():
            raise RuntimeError("rng broke")
        monkeypatch.setattr(checkpoint, "capture_rng", broken)
        with pytest.raises(RuntimeError, match="rng broke"):
            _save(tmp_path, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]
    assert find_checkpoint("latest", str(tmp_path)) == (str(tmp_path / "checkpoints" / "step_00000001"), [])


def test_a_full_disk_during_a_2_rank_save_is_one_line_and_leaves_no_partial(synthetic_shards, tmp_path):
    """A real full file system: the run directory on a 256 KiB tmpfs in a private mount namespace; the run's
    first files fit, its first checkpoint (a 320 KB trainable.safetensors) does not. Rank 1's own file fits:
    only rank 0 meets the error, and removes the partial directory once every rank has written."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here: cannot make a small tmpfs")
    where = tmp_path / "small"
    where.mkdir()
    args = [TRAIN, "--config", "tests/configs/tiny.yaml", *tiny_overrides(synthetic_shards, where, "run"),
            "optim.max_steps=2", "output.checkpoint_every=1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    inner = (f"mount -t tmpfs -o size=256k none {shlex.quote(str(where))} || exit 97; "
             f"{shlex.join(torchrun + args)}; code=$?; echo LISTING; ls -a {shlex.quote(str(where))}/run/checkpoints; "
             f"exit $code")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inner], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out\n{out[-2000:]}\n{err[-3000:]}")
    if proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {err.strip()[:200]}")
    assert "LISTING" in out, f"rc {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    errors = [line for line in err.splitlines() if "spt_dist: error" in line]
    assert proc.returncode != 0 and len(errors) == 1, err[-4000:]
    assert "no space left" in errors[0] and ".partial-step_00000001/trainable.safetensors" in errors[0], errors
    assert err.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in err  # torchrun's own
    assert out.split("LISTING", 1)[1].split() == [".", ".."], out[-1000:]


@pytest.mark.parametrize("replace", ["fifo", "dev_zero"])
def test_a_file_that_is_no_regular_file_is_skipped_without_reading_it(run, tmp_path, replace):
    """Before: the digest of a FIFO or of /dev/zero never returned (a resume hung, printing nothing)."""
    run_dir, previous, newest = copied(run, tmp_path)
    target = newest / "trainable.safetensors"
    target.unlink()
    if replace == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    assert_skipped(run_dir, previous, newest, "trainable.safetensors is missing or unreadable (not a regular file)")


def test_a_record_nested_past_the_parser_is_skipped(run, tmp_path):
    run_dir, previous, newest = copied(run, tmp_path)
    (newest / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    found, warnings = find_checkpoint("latest", str(run_dir))
    assert found == str(previous) and len(warnings) == 1 and "cannot read JSON (nested too deeply)" in warnings[0]
    with pytest.raises(UserError, match=r"state.json: cannot read JSON \(nested too deeply\)$"):
        find_checkpoint(str(newest), None)
