"""As a user would, on SmolLM2's real weights: QLoRA with packing, and the command line with no options.

- QLoRA: nf4 with double quantization + LoRA on every linear layer, packing, gradient checkpointing on (the
  default): the loss of a fixed batch falls over a few steps (every step trains on the same packed batch).
- `orpo-plugin train --model_name_or_path <converted folder> --dataset_name <conversational JSONL>` and nothing
  else (TrainingArguments' defaults: 3 epochs, batch 8, output in ./trainer_output), then `orpo-plugin eval` on what
  it saved.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import torch
from datasets import Dataset
from helpers.messages import assistant, user  # tests/helpers
from helpers.real import args  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I like bread."),
    ("Reply in all capital letters: say hello.", "HELLO!", "hello there, how are you?"),
    ("What is 7 times 6?", "42", "It is 48."),
    ("Name a fruit.", "An apple.", "A hammer."),
    ("Answer with one word: what color is grass?", "Green.", "Grass has many colors in the summer."),
    ("What is 2 plus 3?", "5", "23"),
    ("Say goodbye in French.", "Au revoir.", "Goodbye."),
    ("Name a planet.", "Mars.", "The sun is a star."),
]
CHAT_ROWS = [{"prompt": [user(q)], "chosen": [assistant(c)], "rejected": [assistant(r)]} for q, c, r in PAIRS]


def test_qlora_with_packing_lowers_the_loss_of_a_fixed_batch(smollm2_path, smollm2_tok, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"}
    )
    assert model.is_loaded_in_4bit
    steps = 4
    trainer = ORPOTrainer(
        model=model,
        args=args(
            ORPOConfig,
            tmp_path,
            max_steps=steps,
            learning_rate=2e-3,
            packing=True,
            max_length=256,
            lr_scheduler_type="constant",
            optim="adamw_torch",
        ),
        train_dataset=Dataset.from_list(CHAT_ROWS[:4]),
        processing_class=smollm2_tok,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    assert trainer.args.gradient_checkpointing and trainer.args.packing
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps
    assert sum(1 for h in trainer.state.log_history if "tokens/real" in h) == steps
    # one packed row per step: the same batch every time, so its loss before each update is comparable
    assert len(trainer.get_train_dataloader()) == 1
    assert losses[-1] < losses[0] - 0.2, losses
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def _cli(*argv, cwd):
    exe = shutil.which("orpo-plugin")
    cmd = [exe] if exe else [sys.executable, "-m", "orpo_plugin.cli"]
    run = subprocess.run([*cmd, *argv], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_command_line_train_then_eval_with_no_other_options(smollm2_path, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = CHAT_ROWS[:4]  # one step per epoch at the default batch of 8; a few seconds each on 2 cores
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = _cli("train", "--model_name_or_path", str(smollm2_path), "--dataset_name", str(data), cwd=tmp_path)
    out = tmp_path / "trainer_output"
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 3  # 4 pairs, batch 8, 3 epochs
    summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(summary["train_loss"]), summary
    assert "float32" in run.stderr  # bf16 left unset on a CPU: float32, said once

    report = tmp_path / "eval.json"
    _cli(
        "eval",
        "--model",
        str(out),
        "--dataset",
        str(data),
        "--split",
        "train",
        "--output",
        str(report),
        "--quiet",
        cwd=tmp_path,
    )
    result = json.loads(report.read_text())
    assert result["data"]["pairs"] == result["preference"]["pairs"] == len(rows)
    assert 0.0 <= result["preference"]["accuracy"] <= 1.0


def test_readme_trl_quick_start_runs_as_written(smollm2_path, tmp_path):
    # the README's TRL snippet, verbatim, in a fresh process: a local model, a dataset, LoRA, train, save
    import os
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**A TRL script**") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "pretrained.checkpoint" in code and "trainer.train()" in code
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert "Traceback" not in run.stderr
