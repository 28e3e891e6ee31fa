"""examples/: each script runs as its docstring says, here on a tiny random-init local model folder (the real
SmolLM2 run is in tests/real/test_real_user.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "trl_quickstart.py"
# what a user should not meet on a default run (orpo_plugin/_quiet.py, the trainer's pin_memory choice)
NOISE = ("gemm_4bit_forward", "pip install kernels", "FutureWarning", "pin_memory", "publisher trust check")


def run_quickstart(model: str | None, out: Path, steps: int, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        str(QUICKSTART),
        *([model] if model else []),
        "--max_steps",
        str(steps),
        "--output_dir",
        str(out),
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=out.parent)


def check_quickstart(run: subprocess.CompletedProcess, out: Path) -> dict:
    """The script trained, saved an adapter, reloaded it, generated, and evaluated the reloaded model exactly as the
    trainer evaluated it before saving."""
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in run.stdout.splitlines() if ":" in line}
    evaluation = json.loads(lines["trainer.evaluate()"])
    metrics = json.loads(lines["held-out preference metrics"])
    assert "generated" in lines
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "huggingface.co/None" not in card and 'model="None"' not in card
    assert metrics["pairs"] == 4
    # beta = 0.1: the trainer's rewards are beta * the mean log-probs the reloaded model gives
    assert 0.1 * metrics["logps_chosen"] == pytest.approx(evaluation["eval_rewards/chosen"], abs=1e-4)
    assert 0.1 * metrics["logps_rejected"] == pytest.approx(evaluation["eval_rewards/rejected"], abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(evaluation["eval_rewards/accuracies"])
    for noise in NOISE:
        assert noise not in run.stderr, f"{noise!r} in the quick start's output:\n{run.stderr[-3000:]}"
    return metrics


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random-init Llama folder whose tokenizer (with a chat template) covers the quick start's text."""
    sys.path.insert(0, str(QUICKSTART.parent))
    try:
        import trl_quickstart
    finally:
        sys.path.pop(0)
    from orpo_plugin.toy import build_model, build_tokenizer

    rows = trl_quickstart.preference_rows()
    corpus = [r["prompt"][0]["content"] + r["chosen"][0]["content"] + r["rejected"][0]["content"] for r in rows]
    tok = build_tokenizer(corpus * 3, vocab_size=400)
    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    build_model(len(tok), hidden_size=32, num_layers=2, num_heads=4, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_trl_quickstart_runs_as_written_on_a_local_folder(tiny_chat_model, tmp_path):
    out = tmp_path / "orpo-quickstart"
    check_quickstart(run_quickstart(str(tiny_chat_model), out, steps=2, timeout=300), out)
