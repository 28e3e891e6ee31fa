"""`axolotl train` with the plugin on SmolLM2-135M-Instruct's real weights: the shipped tiny config, pointed at the
converted checkpoint folder, `chat_template: tokenizer_default` (SmolLM2's ChatML), argilla rows, packing and gradient
checkpointing on, 2 steps, in Axolotl's own virtualenv (integration/axolotl/run.sh --venv)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


def argilla(q, good, bad):
    return {
        "system": "Be brief.",
        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
    }


ROWS = [
    argilla("What is the capital of France?", "Paris.", "I like bread."),
    argilla("What is 7 times 6?", "42", "48"),
    argilla("Name a fruit.", "An apple.", "A hammer."),
    argilla("Say hello in capital letters.", "HELLO!", "hello."),
]


def test_axolotl_trains_smollm2_with_the_plugin(smollm2_path, tmp_path):
    build = subprocess.run(
        ["bash", str(REPO / "integration" / "axolotl" / "run.sh"), "--venv"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    python = Path(build.stdout.strip().splitlines()[-1])
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = yaml.safe_load((REPO / "configs" / "axolotl" / "tiny-cpu-orpo.yml").read_text())
    cfg.update(
        base_model=str(smollm2_path),
        chat_template="tokenizer_default",
        max_steps=STEPS,
        save_steps=STEPS,
        gradient_checkpointing=True,
        micro_batch_size=4,
        orpo_packing=True,
        orpo_packing_max_tokens=256,
        dataset_prepared_path=str(tmp_path / "prepared"),
        output_dir=str(tmp_path / "out"),
    )
    cfg["datasets"] = [dict(cfg["datasets"][0], path=str(data))]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [str(python.parent / "axolotl"), "train", str(path), "--launcher", "python"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    state = json.loads((tmp_path / "out" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert len(steps) == STEPS
    for entry in steps:
        for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "tokens/real"):
            assert math.isfinite(entry[key]), (key, entry)
        # orpo_plugin's trainer ran (Axolotl's built-in ORPO logs no token counts), in the packed layout
        assert entry["tokens/padding_fraction"] == 0 and entry["tokens/real"] > 0
