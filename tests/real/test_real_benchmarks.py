"""The benchmark scripts' real-model options run end to end at the smallest sizes that still take the real path:
SmolLM2's tokenizer, chat template and pretrained weights (its first 2 layers) in throughput.py, Gemma 3's 262,144-token
vocabulary (its first layer) in memory.py. Their figures are in benchmarks/RESULTS.md, not asserted here."""

from __future__ import annotations

import re

from test_benchmarks import run  # tests/


def test_throughput_smollm2_conversational_pairs(smollm2_path):
    out = run(
        "throughput.py",
        "--model",
        "smollm2",
        "--layers",
        "2",
        "--methods",
        "trl",
        "packing+prefix_sharing",
        "--pairs",
        "8",
        "--batch",
        "2",
        "--max-length",
        "128",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
    )
    assert "pretrained SmolLM2-135M-Instruct (llama, its first 2 of 30 layers" in out
    # TRL's extra EOS after ChatML's end of turn is the only tokenization difference, on every response
    assert re.search(r"except for the EOS TRL appends after the template's end of turn \((\d+) of \1 responses", out)
    assert "0 truncated" in out
    for method in ("trl", "packing+prefix_sharing"):
        assert re.search(rf"  {re.escape(method)} +loss on .* model checkpointing on=True off=False\n", out), method
        assert f"| {method} " in out
    assert "MISMATCH" not in out


def test_memory_gemma3_vocabulary(gemma3_path):
    out = run(
        "memory.py",
        "--model",
        "gemma3",
        "--layers",
        "1",
        "--methods",
        "trl",
        "ours_packing",
        "--pairs",
        "1",
        "--seq-len",
        "32",
        "--force",
    )
    assert "vocab 262,144, tied output layer, sliding window 512" in out
    rows = dict(re.findall(r"\| (trl|ours_packing) +\|([^\n]*)\|\n", out))
    assert rows.keys() == {"trl", "ours_packing"}
    tokens = {m: r.split("|")[-2].strip() for m, r in rows.items()}
    assert tokens == {"trl": "64", "ours_packing": "64"}  # 1 pair x 2 sequences x 32 tokens, for both
    assert "NOTE" not in out and out.count("model checkpointing True") == 2
