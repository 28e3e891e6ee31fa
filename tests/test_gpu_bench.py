"""benchmarks/gpu/bench.py --dry-run: the user-shaped GPU benchmark's code end to end on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/gpu/bench.py"),
            str(tmp_path),
            "--dry-run",
            "--parts",
            "ladder,main,liger,profile",  # all four, run in bench.PARTS' order
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["cuda"] is False
    summary = {r["method"]: r for r in result["summary"]}
    assert set(summary) == {"trl", "padded", "packing", "prefix_sharing"}
    for method, row in summary.items():  # every method ran twice (alternating), each with timed steps
        assert row["error"] is None and row["runs"] == 2 and all(s >= 2 for s in row["steps"]), (method, row)
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_gib"] is None  # no GPU figure on CPU
    # the same pairs, so the same padded batches for TRL and our padded layout; packing pads nothing
    assert summary["trl"]["pad_fraction"] == summary["padded"]["pad_fraction"] > 0
    assert summary["packing"]["pad_fraction"] == summary["prefix_sharing"]["pad_fraction"] == 0
    assert summary["trl"]["vs_trl"] == 1.0
    ladder = result["meta"]["ladder"]
    assert set(ladder) == {"trl", "ours", "ours+offloading"}
    for name in ("trl", "ours"):
        assert ladder[name]["128"]["status"] == "ok", (name, ladder[name])
    # TRL's offloading manager needs an accelerator: refused at start on a CPU, as the trainer says
    assert ladder["ours+offloading"]["128"]["status"].startswith("refused: activation_offloading=True")
    assert result["meta"]["parts"] == ["main", "profile", "ladder", "liger"]
    # use_liger_kernel is refused at start on a CPU, before the model is given an adapter
    assert result["meta"]["liger_refusal"].startswith("refused: ValueError: use_liger_kernel=True needs a CUDA GPU")
    profile = json.loads((tmp_path / "profile.json").read_text())  # the profile phase, on the same loaded model
    assert set(profile["results"]) == {"trl", "padded", "packing"}
    assert all("error" not in r and r["step_s"] > 0 for r in profile["results"].values()), profile["results"]
    lengths = result["meta"]["lengths"]  # a long tail: the 90th percentile well above the median
    assert lengths["chosen"]["p90"] > 1.3 * lengths["chosen"]["median"]
    table = (tmp_path / "BENCH.md").read_text()
    assert "CPU dry run" in table and "NOT a speed figure" in table and "PROFILE.md" in table
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for column in ("real tokens/s", "vs TRL", "peak GiB", "pad fraction", "MFU", "spread"):
        assert column in header
    for label in ("TRL ORPOTrainer", "orpo_plugin padded", "orpo_plugin packing ", "prefix sharing"):
        assert label in table
