"""A TRL-style user script runs end to end with our trainer (QLoRA, padding-free); shipped TRL configs parse."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_plugin.toy import build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"prompt": "Name a fruit.", "chosen": " apple banana.", "rejected": " dog cat."},
    {"prompt": "Name an animal.", "chosen": " dog horse.", "rejected": " red blue."},
    {"prompt": "Name a color.", "chosen": " red green.", "rejected": " saw drill."},
]


@pytest.mark.integration
def test_trl_user_script_qlora_padding_free(tmp_path):
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 5, vocab_size=300)
    build_model(len(tok), hidden_size=64, num_layers=2).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "integration/trl/orpo_qlora.py"),
        "--config",
        str(ROOT / "configs/trl/tiny-cpu-orpo.yaml"),
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    logged = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if "'log_odds_ratio'" in line]
    assert len(logged) == 2, run.stdout[-2000:]
    assert re.search(r"'tokens/padding_fraction': '?0(\.0)?'?[,}]", logged[0]), logged[0]


@pytest.mark.parametrize("path", sorted((ROOT / "configs/trl").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_trl_configs_parse(path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    from orpo_plugin import ORPOConfig

    parser = TrlParser((ScriptArguments, ORPOConfig, ModelConfig))
    # GPU configs ask for bf16, which a CPU-only machine refuses unless use_cpu is set
    script, args, model = parser.parse_args_and_config(["--config", str(path), "--use_cpu", "True"])
    assert args.beta > 0 and args.max_length
    if "8b" in path.name:
        assert model.load_in_4bit and model.use_bnb_nested_quant and model.bnb_4bit_quant_type == "nf4"
        assert model.use_peft and model.lora_target_modules in ("all-linear", ["all-linear"])
        assert args.packing and args.bf16 and args.gradient_checkpointing and args.learning_rate == 8e-6
        assert args.optim.value == "paged_adamw_8bit" and model.attn_implementation == "flash_attention_2"
