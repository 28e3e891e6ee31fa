"""The toy demo (`--model tiny`) end to end: ORPO learns the held-out preference; SFT on chosen lifts rejected too."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers.shell import run_as_written  # tests/helpers

from orpo_plugin import demo
from orpo_plugin.demo import toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


DEMO_TINY = "orpo-plugin demo --model tiny"  # as docs/demo.md writes it (tests/test_doc_commands.py)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`orpo-plugin demo --model tiny` run as written, in a fresh folder: its output goes to ./orpo-demo."""
    cwd = tmp_path_factory.mktemp("demo")
    run = run_as_written(DEMO_TINY, cwd, timeout=600)
    out = cwd / "orpo-demo"
    return run.returncode, out, json.loads((out / "demo_result.json").read_text())


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """`orpo-plugin demo --model tiny --compare-sft` with its defaults (steps unset: the comparison's own default)."""
    out = tmp_path_factory.mktemp("compare")
    rc = demo.main(
        argparse.Namespace(model="tiny", output_dir=str(out), steps=None, seed=0, no_packing=False, compare_sft=True)
    )
    return rc, out, json.loads((out / "compare_sft.json").read_text())


def test_default_demo_learns_the_held_out_preference(demo_run):
    rc, out, result = demo_run
    assert rc == 0
    assert result["mode"] == "orpo" and result["steps"] == 120
    assert 0.35 <= result["before"]["accuracy"] <= 0.65  # a random model: chance
    assert result["after"]["accuracy"] >= 0.9
    assert result["after"]["log_odds_margin"] > result["before"]["log_odds_margin"] + 1.0


def test_default_demo_writes_model_metrics_and_plot(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = demo_run
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "logps/chosen" in r]
    assert len(logged) >= 20  # every 5 steps
    for key in ("logps/rejected", "log_odds_ratio", "nll_loss", "rewards/accuracies", "step"):
        assert key in logged[0]
    assert (
        logged[-1]["logps/chosen"] - logged[-1]["logps/rejected"]
        > logged[0]["logps/chosen"] - logged[0]["logps/rejected"]
    )
    assert (out / "logps.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_sft_directions(compare_run, capsys):
    rc, out, result = compare_run
    assert rc == 0
    sft, orpo = result["runs"]["sft"], result["runs"]["orpo"]
    # SFT on chosen only: the rejected log-prob rises along with the chosen one
    assert sft["last"]["chosen"] > sft["first"]["chosen"]
    assert sft["last"]["rejected"] > sft["first"]["rejected"]
    # ORPO opens a wider gap, on the training curves and on held-out pairs
    assert orpo["final_margin"] > sft["final_margin"]
    assert orpo["after"]["log_odds_margin"] > sft["after"]["log_odds_margin"]
    assert orpo["last"]["rejected"] < sft["last"]["rejected"]


def test_compare_sft_writes_plot_and_runs(compare_run):
    _, out, result = compare_run
    assert (out / "compare_sft.png").read_bytes()[:8] == PNG_MAGIC
    for mode in ("sft", "orpo"):
        assert (out / mode / "metrics.jsonl").exists()
        assert result["runs"][mode]["last"]["step"] == result["steps"]
        assert 0.0 <= result["runs"][mode]["after"]["accuracy"] <= 1.0
    table = toy.format_compare(result)
    assert "SFT" in table and "ORPO" in table and "held-out acc" in table
