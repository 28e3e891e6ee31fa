"""The benchmark scripts run end to end at tiny sizes (their figures are in benchmarks/RESULTS.md, not asserted here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_throughput_script_runs_with_checkpointing_on():
    out = run(
        "throughput.py",
        "--methods",
        "trl",
        "packing",
        "--pairs",
        "40",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--max-length",
        "128",
    )
    assert "| packing " in out and "gradient checkpointing on for every method" in out


def test_memory_script_runs_for_trl_and_ours():
    out = run(
        "memory.py",
        "--methods",
        "trl",
        "ours_chunked",
        "--timing-methods",
        "--seq-len",
        "32",
        "--pairs",
        "2",
        "--hidden",
        "32",
        "--force",
    )
    assert "| ours_chunked |" in out and "model checkpointing True" in out


def test_device_reads_script_names_every_caller():
    """benchmarks/gpu/device_reads.py (RESULTS.md section 4b): TRL's metric reads are found, ours has none of its own."""
    out = run("gpu/device_reads.py")
    blocks, name = {}, None
    for line in out.splitlines():  # a header per trainer, then its callers (indented)
        if line.endswith("device reads per step"):
            name = line.split(":")[0]
            blocks[name] = []
        elif name and line.startswith("  "):
            blocks[name].append(line)
    assert set(blocks) == {"TRL ORPOTrainer", "orpo_plugin padded", "orpo_plugin packing"}, out
    assert any("metrics[k] = v.item()" in c for c in blocks["TRL ORPOTrainer"])
    for name in ("orpo_plugin padded", "orpo_plugin packing"):
        callers = blocks[name]
        assert any("transformers/trainer.py" in c for c in callers), callers
        assert not [c for c in callers if "orpo_plugin/" in c], callers


def test_sequence_parallel_memory_child_measures_a_step(tmp_path, monkeypatch):
    """benchmarks/sequence_parallel.py's run (RESULTS.md section 3c), in this process at a tiny size: the pair is built
    and one process trains it, measuring its second step. Its 2-rank launch is the one
    tests/distributed/test_sequence_parallel.py runs (the same config file and trainer)."""
    import json
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import sequence_parallel as bench_sp

    bench_sp.build(tmp_path, 256, hidden=32, layers=2, vocab=500)
    pair = json.loads((tmp_path / "pair.jsonl").read_text())
    assert set(pair) == {"prompt", "chosen", "rejected"}
    bench_sp.child(tmp_path, 256, tmp_path / "one.json", SimpleNamespace(lora=1, loss_chunk_size=64))
    result = json.loads((tmp_path / "one.json.rank0").read_text())
    assert result["sp_size"] == 1 and result["rank"] == 0
    assert 200 < result["real_tokens"] <= 256 + 8 and result["first_loss"] > 0  # about --tokens
    assert result["step_peak_mib"] >= 0 and result["process_peak_mib"] > 0


def test_vision_script_compares_tower_once_with_the_plain_forward(monkeypatch, capsys):
    """benchmarks/vision.py (RESULTS.md section 3d) at a tiny size, in this process: both methods give the same loss
    (it exits otherwise) and the table says how many images each ran through the tower."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import vision as bench_vision

    # the script quiets every library's logging for its table; the rest of the suite keeps its own
    monkeypatch.setattr(bench_vision.common, "quiet_logs", lambda: None)

    argv = ["--family", "llava", "--pairs", "2", "--steps", "1", "--hidden", "64", "--layers", "1", "--pixels", "32"]
    assert bench_vision.main(argv) == 0
    rows = {
        cells[0]: cells[1:]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["plain padded (tower on both rows)"][0] == "4"
    assert rows["orpo_plugin padded (tower once per pair)"][0] == "2"
    assert rows["orpo_plugin packing + prefix sharing"][0] == "2"
    losses = [float(r[-1]) for name, r in rows.items() if name != "method"]
    assert len(losses) == 4 and max(losses) - min(losses) < 1e-5 * abs(losses[0])  # one loss
