"""The real-model demo's code paths on a tiny local checkpoint (`--model PATH`), in seconds; the run on SmolLM2
itself is tests/real/test_demo_smollm2.py."""

from __future__ import annotations

import json

import pytest
import torch

from orpo_plugin import cli
from orpo_plugin.demo import instructions
from orpo_plugin.demo import real as demo_real

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer, tiny_model_factory):
    """A local checkpoint folder with a chat template: what `--model PATH` takes."""
    folder = tmp_path_factory.mktemp("tiny_chat_model")
    tiny_model_factory(seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _demo(folder, out, *extra):
    argv = [
        "demo",
        "--model",
        str(folder),
        "--output_dir",
        str(out),
        "--train_prompts",
        "14",
        "--held_out_prompts",
        "7",
        "--steps",
        "2",
        "--pairs_per_step",
        "7",
        "--diversity_prompts",
        "0",
        "--quiet",
        *extra,
    ]
    assert cli.main(argv) == 0
    return json.loads((out / "demo_result.json").read_text())


def test_local_checkpoint_end_to_end(tiny_folder, tmp_path):
    result = _demo(tiny_folder, tmp_path)
    assert result["model_path"] == str(tiny_folder)
    s = result["settings"]
    assert s["steps"] == 2 and s["packing"] and s["prefix_sharing"]
    assert s["gradient_checkpointing"] is False  # auto on a CPU
    assert len(result["orpo_history"]) == 2
    for phase in ("before", "after"):
        m = result[phase]
        assert len(m["answers"]) == 7
        assert 0.0 <= m["preference"]["accuracy"] <= 1.0
        assert set(m["checker"]["pass_rate_by_kind"]) == set(instructions.KINDS)
        assert set(m["preference"]["accuracy_by_kind"]) == set(instructions.KINDS)
        assert "diversity" not in m  # --diversity_prompts 0
    report = (tmp_path / "report.md").read_text()
    assert "## Before and after" in report and "## Answers side by side" in report and "PID" not in report
    assert (tmp_path / "pass_rates.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "logps.png").read_bytes()[:8] == PNG_MAGIC
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["phase"] == "before" and rows[-1]["phase"] == "after"
    assert [r["step"] for r in rows if "logps/chosen" in r] == [1, 2]


def test_lora_trains_an_adapter(tiny_folder, tmp_path):
    result = _demo(tiny_folder, tmp_path, "--lora", "--save_model")
    assert result["settings"]["lora"] and result["learning_rate"] == 2e-4
    assert (tmp_path / "model" / "adapter_config.json").exists()
    assert result["after"]["preference"]["chosen_logps"] != result["before"]["preference"]["chosen_logps"]


def test_four_bit_needs_a_gpu(tiny_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU refusal")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        _demo(tiny_folder, tmp_path, "--load_in_4bit")


def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2.*tiny"):
        _demo(tmp_path / "nowhere", tmp_path)


def test_a_pretrained_base_model_without_a_template_is_refused_before_its_conversion(monkeypatch):
    """A base model with no chat template of its own and none written by the project: refused at once, not after
    converting its GGUF; Gemma 3 270M has the project's template (pretrained.GEMMA3_CHAT_TEMPLATE) and is accepted."""
    from orpo_plugin import pretrained

    base = pretrained.PretrainedModel("somebase", "somebase_gguf", "pip install somebase", "somebase.gguf", chat=False)
    monkeypatch.setitem(pretrained.MODELS, "somebase", base)
    monkeypatch.setattr(pretrained, "checkpoint", lambda name: pytest.fail(f"{name} was converted"))
    with pytest.raises(ValueError, match="--model somebase: a base model without a chat template.*smollm2, gemma3"):
        demo_real.resolve_model("somebase")
    assert pretrained.MODELS["gemma3"].chat_template == pretrained.GEMMA3_CHAT_TEMPLATE


@pytest.mark.parametrize(
    "options, says",
    [
        (["--diversity_prompts", "2", "--diversity_samples", "1"], "diversity_samples must be at least 2"),
        (["--diversity_prompts", "2", "--held_out_prompts", "1"], "held_out_prompts must be at least 2"),
        (["--steps", "0"], "steps must be at least 1"),
    ],
)
def test_settings_that_could_only_fail_later_are_refused_at_once(tmp_path, options, says):
    with pytest.raises(ValueError, match=says):
        _demo(tmp_path / "nowhere", tmp_path, *options)  # refused before the model (a missing folder) is looked at


def test_the_demo_leaves_the_process_thread_count_as_it_found_it(tiny_folder, tmp_path):
    before = torch.get_num_threads()
    _demo(tiny_folder, tmp_path, "--threads", "1")
    assert torch.get_num_threads() == before


def test_cpu_threads():
    assert demo_real.cpu_threads("3") == 3
    assert demo_real.cpu_threads(0) == 1
    import os

    assert 1 <= demo_real.cpu_threads("auto") <= (os.cpu_count() or 1)
    cores = len(os.sched_getaffinity(0))
    assert demo_real.cpu_threads("auto", busy=0.0) == cores  # idle: every core
    assert demo_real.cpu_threads("auto", busy=0.4) == cores  # less than half a core used elsewhere
    assert demo_real.cpu_threads("auto", busy=cores + 3.0) == 1  # all busy: one thread, never none
    assert 0.0 <= demo_real.busy_cores(interval=0.1) <= os.cpu_count()


def test_judge_counts_per_kind():
    _, held = instructions.make_split(train=7, held_out=7)
    verdict = demo_real.judge(held, [item.chosen for item in held])
    assert verdict["pass_rate"] == 1.0 and verdict["answer_mentioned"] == 1.0
    verdict = demo_real.judge(held, [item.rejected for item in held])
    assert verdict["pass_rate"] == 0.0 and set(verdict["pass_rate_by_kind"].values()) == {0.0}


def test_gradient_checkpointing_on_trains_the_same_steps(tiny_folder, tmp_path):
    """The demo turns checkpointing off on a CPU (a speed choice, docs/demo.md); the trainer's default, on, gives the same
    training: the same loss and log-probs at every step."""
    off = _demo(tiny_folder, tmp_path / "off")
    on = _demo(tiny_folder, tmp_path / "on", "--gradient_checkpointing", "on")
    assert on["settings"]["gradient_checkpointing"] is True and off["settings"]["gradient_checkpointing"] is False
    assert len(on["orpo_history"]) == len(off["orpo_history"]) == 2
    for a, b in zip(on["orpo_history"], off["orpo_history"]):
        for key in ("loss", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
