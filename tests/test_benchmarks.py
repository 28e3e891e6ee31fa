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


def test_sequence_parallel_memory_script_runs_both_ways():
    """benchmarks/sequence_parallel.py (RESULTS.md section 3c) at a tiny size: 1 process and 2 ranks train the same step."""
    out = run("sequence_parallel.py", "--tokens", "512", "--hidden", "64", "--layers", "2", "--vocab", "1000")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in out.splitlines()
        if line.startswith("| one process") or line.startswith("| sp 2")
    }
    assert set(rows) == {"one process", "sp 2"}, out
    assert rows["one process"][0] == "1" and rows["sp 2"][0] == "2"
    assert rows["one process"][-1] == rows["sp 2"][-1]  # the same first loss
