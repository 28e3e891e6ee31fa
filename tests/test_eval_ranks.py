"""Evaluation metrics cover exactly the eval set, whatever the number of processes.

With 2 ranks and 3 eval pairs, accelerate gives every rank as many batches by repeating pairs from the start of the
set (a whole batch at batch size 1, one pair inside the last batch at batch size 2). Those repeats must not count:
each eval metric of a 2-process run (DDP over gloo, CPU) equals the 1-process run's over the same 3 pairs — an
accuracy in thirds, not 0.5 or 0.75 — for the padded and the packing configuration, and the generations written
during evaluation are the 1-process ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests/helpers/eval_ranks.py"
WORDS = "apple banana dog cat red blue green saw drill hammer pear plum one two three four five".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": words(1, 5) + ":", "chosen": " " + words(1, 8), "rejected": " " + words(1, 8)} for _ in range(n)]


def test_eval_metrics_on_two_ranks_equal_one_rank_with_an_odd_eval_set(tmp_path):
    from orpo_plugin.toy import build_model, build_tokenizer

    tok = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    model = build_model(len(tok), hidden_size=32, num_layers=2, initializer_range=0.2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = _rows(3, seed=3)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [sys.executable, str(HELPER), str(tmp_path), str(tmp_path / "one.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(HELPER),
        str(tmp_path),
        str(tmp_path / "two.json"),
    ]
    for _attempt in (1, 2):  # gloo on CPU now and then kills a worker by a signal outside our code: once more then
        two = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        if two.returncode == 0 or not re.search(r"exitcode\s*:\s*-(6|11)\b", two.stdout + two.stderr):
            break
    assert two.returncode == 0 and (tmp_path / "two.json").exists(), (two.stdout + two.stderr)[-3000:]

    want = json.loads((tmp_path / "one.json").read_text())
    got = json.loads((tmp_path / "two.json").read_text())
    assert sorted(got) == sorted(want) == ["packing_bs2", "padded_bs1", "padded_bs2"]
    for name in want:
        assert want[name].pop("world_size") == 1 and got[name].pop("world_size") == 2, name
        accuracy = want[name]["eval_rewards/accuracies"]
        # the data must give a value that a repeated pair would change (1/3 or 2/3 of 3 pairs)
        assert accuracy == pytest.approx(1 / 3) or accuracy == pytest.approx(2 / 3), (name, accuracy)
        assert sorted(got[name]) == sorted(want[name]), name
        for key, value in want[name].items():
            if key == "generations":
                assert got[name][key] == value and len(value) == 2, name  # the 2 sampled pairs, each once
            else:
                assert got[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} {key}"
