"""benchmarks/gpu/bench.py --dry-run: the user-shaped GPU benchmark's code end to end on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert profile["cuda"] is False and set(profile["results"]) == {"trl", "padded", "packing"}
    for method, r in profile["results"].items():
        assert "error" not in r and r["step_s"] > 0, (method, r)
        shares = r["share"]
        assert shares["host-side / idle"] >= 0
        assert shares["matmul"] > 0 and shares["4-bit dequant"] > 0, (method, shares)  # QLoRA's two big costs
    assert profile["results"]["packing"]["share"]["attention"] > 0
    profile_table = (tmp_path / "PROFILE.md").read_text()
    assert "NOT a GPU profile" in profile_table and "host-side / idle %" in profile_table
    assert "device reads / step" in profile_table
    table = (tmp_path / "BENCH.md").read_text()
    assert "CPU dry run" in table and "NOT a speed figure" in table and "PROFILE.md" in table
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for column in ("real tokens/s", "vs TRL", "peak GiB", "pad fraction", "MFU", "spread"):
        assert column in header
    for label in ("TRL ORPOTrainer", "orpo_plugin padded", "orpo_plugin packing ", "prefix sharing"):
        assert label in table


def test_gpu_bench_lengths_are_the_stated_distribution_in_tokens():
    """At the GPU sizes: the realised token medians are the stated ones (prompt 130, responses 300) and the tail is
    long; the ladder's pair has the length it is named by. (Words of another lexicon than the tokenizer's once made
    every part 2.5x longer than drawn.)"""
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "gpu")]
    import bench
    import common
    from datasets import Dataset

    from orpo_plugin.data import prepare_dataset

    sizes = bench.Sizes(dry=False)
    tok = common.build_tokenizer(seed=1, vocab_size=sizes.vocab)
    prepared, _ = prepare_dataset(Dataset.from_list(bench.make_rows(sizes, tok)), tokenizer=tok, max_length=2048)
    stats = bench.length_stats(prepared)
    assert len(prepared) == sizes.pairs == 160
    assert 120 <= stats["prompt"]["median"] <= 160, stats
    for part in ("chosen", "rejected"):
        assert 270 <= stats[part]["median"] <= 340 and stats[part]["p90"] > 2 * stats[part]["median"], stats
    for length in (2048, 8192):
        pair, _ = prepare_dataset(Dataset.from_list(bench.ladder_rows(length, tok)), tokenizer=tok, max_length=length)
        assert 0.99 * length <= bench.length_stats(pair)["real_tokens"] <= length


def test_trl_is_halved_until_it_fits_and_ours_padded_follows(monkeypatch):
    """TRL out of memory at the shipped micro-batch under the cap: retried at half (accumulation doubled, the same
    pairs per optimizer step), and our padded layout measured at TRL's micro-batch."""
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "gpu")]
    import bench

    calls = []

    def fake_measure(method, model, rows, tok, sizes, cuda, out, deadline, acc, extra=None, micro_batch=None):
        calls.append((method, micro_batch, acc))
        if method == "trl" and micro_batch > 1:
            return {"error": "OutOfMemoryError: CUDA out of memory."}, model
        return {"tokens_per_s": 1.0}, model

    monkeypatch.setattr(bench, "measure", fake_measure)
    fit = {"shipped": 4, "trl": 4, "padded": 4}
    results = {m: [] for m in ("trl", "padded", "packing")}
    bench._measure_plan(["trl", "padded", "packing", "trl"], results, None, [], None, None, False, "", 0.0, 1, fit)
    assert calls == [
        ("trl", 4, 1),
        ("trl", 2, 2),
        ("trl", 1, 4),
        ("padded", 1, 4),
        ("packing", None, 1),
        ("trl", 1, 4),  # the second round starts where the first fitted
    ]
    assert results["trl"][0]["oom_micro_batches"] == [4, 2] and "oom_micro_batches" not in results["trl"][1]
    assert (results["padded"][0]["micro_batch"], results["padded"][0]["accumulation"]) == (1, 4)


def test_liger_parity_verdict_is_relative_to_plain_bf16():
    """The verdict compares a Liger variant's error against float32 with plain bf16's, not with a fixed tolerance."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import liger_parity

    torch = __import__("torch")
    ref = {"a.q_proj.lora_B": torch.ones(4, 4), "a.down_proj.lora_B": torch.ones(4, 4)}
    shifted = lambda by: {k: v + by for k, v in ref.items()}  # noqa: E731
    results = {
        "fp32": {"loss": 1.0, "grads": ref},
        "bf16": {"loss": 1.0, "grads": shifted(0.08)},  # bf16 alone: 8 % from float32
        "liger": {"loss": 1.0, "grads": shifted(0.09)},  # 1.125x bf16's error: as exact
        "liger:rope": {"loss": 1.0, "grads": shifted(0.2)},  # 2.5x: less exact
    }
    rows = {r["variant"]: r for r in liger_parity.compare(results)}
    assert rows["bf16"]["grad_vs_fp32"] == pytest.approx(0.08)
    assert rows["liger"]["ratio_to_bf16"] == pytest.approx(1.125) and rows["liger"]["verdict"] == "as exact as bf16"
    assert rows["liger:rope"]["verdict"] == "LESS EXACT than bf16"
    assert rows["liger"]["grad_vs_bf16"] == pytest.approx(0.01 / 1.08)  # relative to bf16's own gradient
    assert rows["liger"]["per_projection_vs_fp32"] == {"q_proj": pytest.approx(0.09), "down_proj": pytest.approx(0.09)}
    table = liger_parity.render(liger_parity.compare(results), "CPU", "versions", 1.0)
    assert "| liger " in table and "as exact as bf16" in table and "LESS EXACT than bf16" in table
