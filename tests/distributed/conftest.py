"""What the multi-process tests share: the tiny model and data folder (`tiny`: one per test module) and the DeepSpeed
venv's python (`ds_python`)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

from orpo_plugin.toy import build_model, build_tokenizer

WORDS = "apple banana dog cat red blue green saw drill hammer pear plum one two three four five six seven".split()


def make_rows(n, seed):
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": words(1, 6) + ":", "chosen": " " + words(1, 9), "rejected": " " + words(1, 9)} for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tok = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    # a wide init spreads the per-token NLL, so normalising by a rank's own totals would visibly differ
    model = build_model(len(tok), hidden_size=32, num_layers=2, initializer_range=0.2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, rows in {"batch8": make_rows(8, 0), "packed": make_rows(14, 1), "single": make_rows(1, 2)}.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def ds_python() -> Path:
    """The python of the DeepSpeed venv (tests/distributed/deepspeed_env.py), built on first use; without it the test
    skips, or fails when ORPO_REQUIRE_INTEGRATION=1 (CI)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deepspeed_env import DeepSpeedUnavailable, deepspeed_python

    try:
        return deepspeed_python()
    except (DeepSpeedUnavailable, OSError) as err:
        reason = f"no DeepSpeed venv (tests/distributed/deepspeed_env.py): {err}"
        if os.environ.get("ORPO_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"{reason} (ORPO_REQUIRE_INTEGRATION=1)")
        pytest.skip(reason)
