"""bench/gpu_check.sh stays working: its CPU smoke version (the tiny ViT, every engine x method, the score pass,
the allocation, a checkpoint resumed) runs for real, in one process of its own (~30 s)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import REPO


def test_gpu_check_smoke_runs_every_row_and_resumes_exactly(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "check.json"
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--in-process",
                             "--work", str(tmp_path / "work"), "--json", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    figures = json.loads(out.read_text())
    assert figures["failures"] == []
    rows = {f"{e}/{m}" for e in ("zero2", "zero3", "fsdp2") for m in ("full", "lora", "spt_lora", "gps")}
    assert set(figures["train"]) == rows
    for row in figures["train"].values():
        assert row["images_per_s"] > 0 and row["peak_gib"] > 0 and row["mfu"] is None  # no MFU on CPU
    ratios = " | ".join(figures["ratios"])
    for part in ("score pass / plain steps (zero3", "score pass / plain steps (fsdp2", "allocation / one read",
                 "SPT-LoRA step / LoRA step (zero2)", "SPT-LoRA step / LoRA step (zero3)",
                 "SPT-LoRA step / LoRA step (fsdp2)"):
        assert part in ratios
    assert all(v > 0 for v in figures["ratios"].values())
    assert figures["resume"]["bitwise"] and figures["resume"]["same_samples"] and figures["resume"]["ok"]
    table = result.stdout[result.stdout.index("engine  method"):]
    for row in rows:
        engine, method = row.split("/")
        assert any(line.split()[:2] == [engine, method] and "FAILED" not in line for line in table.splitlines())
    assert "exact, samples identical -> ok" in table and "all checks passed" in table
