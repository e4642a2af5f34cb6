"""Mistakes at the edges end in one line: an output.dir that cannot hold a run, an empty batch to score."""

from __future__ import annotations

import subprocess

import pytest
import torch

import spt_dist
from spt_dist.errors import UserError
from spt_dist.models import create_model
from tests.conftest import TRAIN, run_job, tiny_overrides


def _one_line_error(result) -> str:
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("spt_dist: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a read-only file system here")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_an_output_dir_that_cannot_hold_a_run_is_one_line(synthetic_shards, tmp_path, read_only_dir):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    for output_dir, expected in [(a_file, f"output.dir: '{a_file}' is a file, not a directory"),
                                 (a_file / "below", f"output.dir: '{a_file}' is a file, not a directory"),
                                 (read_only_dir, "Read-only file system"),
                                 (read_only_dir / "missing", "Read-only file system")]:
        overrides = [*tiny_overrides(synthetic_shards, output_dir, "run")]
        result = run_job([TRAIN, "--config", "tests/configs/tiny.yaml", *overrides], launcher="python", timeout=240)
        assert expected in _one_line_error(result)


def test_an_empty_batch_is_refused_by_score():
    model = create_model("vit_test_tiny_patch8_32", 4)
    with pytest.raises(UserError, match=r"score: a batch of \(0, 3, 32, 32\) images: every batch needs at least one"):
        spt_dist.score(model, [(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))])
    with pytest.raises(UserError, match="every batch needs at least one image"):
        spt_dist.score(model, [[(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])),
                                (torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))]])
