"""benchmarks/gpu/run.sh proof --dry-run: the GPU proof's code end to end on CPU at tiny sizes (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_proof_dry_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh"), "proof", "--dry-run", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cuda"] is False
    parity = {(r["model"], r["layout"]): r for r in results["parity"]}
    assert set(parity) == {
        (m, lay) for m in ("llama", "mistral") for lay in ("padding_free", "packing", "prefix_sharing")
    }
    for row in parity.values():  # on CPU only orpo_sdpa runs; float32 within 1e-4 of padded
        assert row["backend"] == "sdpa" and row["status"] == "pass" and row["attention"] == "orpo_sdpa"
        assert row["loss_rel"] <= 1e-4 and row["grad_rel"] <= 1e-4
    qlora = results["qlora"]
    for method in ("packing", "padded", "trl"):
        assert "error" not in qlora[method], qlora[method]
        assert qlora[method]["tokens_per_s"] > 0 and "peak_gib" not in qlora[method]  # no GPU figure on a CPU
    assert qlora["attention"] == "orpo_sdpa" and qlora["real_tokens"] > 0
    table = (tmp_path / "RESULTS.md").read_text()
    assert "CPU (dry run" in table and "| TRL ORPOTrainer |" in table and "n/a (CPU)" in table
