"""The `orpo-plugin` command line: train from flags and from a YAML config, QLoRA on CPU, data errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from orpo_plugin import cli
from orpo_plugin.toy import build_model, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [
    {"prompt": "Name a fruit.", "chosen": " apple banana.", "rejected": " dog cat."},
    {"prompt": "Name an animal.", "chosen": " dog horse.", "rejected": " red blue."},
    {"prompt": "Name a color.", "chosen": " red green.", "rejected": " saw drill."},
    {"prompt": "Name a tool.", "chosen": " saw hammer.", "rejected": " pear plum."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 5, vocab_size=300)
    model = build_model(len(tok), hidden_size=64, num_layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    return root


def common(tiny, out):
    return [
        "--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "train.jsonl"),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--bf16", "False", "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no",
        "--gradient_checkpointing", "False", "--logging_steps", "1", "--max_length", "64", "--disable_tqdm", "True",
    ]


def logged(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_train_qlora_two_steps_padding_free(tiny, tmp_path):
    out = tmp_path / "qlora"
    argv = ["train", *common(tiny, out), "--load_in_4bit", "--use_peft", "--lora_r", "8",
            "--lora_target_modules", "all-linear", "--padding_free", "True", "--learning_rate", "1e-3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    # no backward through bitsandbytes' inference-only CPU kernel (it appears after an eval-mode forward)
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    steps = [h for h in logged(out) if "loss" in h]
    assert len(steps) == 2 and all("log_odds_ratio" in h and "nll_loss" in h for h in steps)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    assert (out / "logps.png").exists()


def test_train_from_yaml_config_with_packing(tiny, tmp_path):
    out = tmp_path / "yaml"
    flags = common(tiny, out)
    cfg = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}
    cfg.update({"packing": True, "beta": 0.2, "max_steps": 2, "per_device_train_batch_size": 4,
                "bf16": False, "use_cpu": True, "gradient_checkpointing": False, "disable_tqdm": True})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", "--config", str(path)]) == 0
    steps = [h for h in logged(out) if "loss" in h]
    assert len(steps) == 2 and steps[0]["tokens/padding_fraction"] == 0.0
    assert (out / "model.safetensors").exists()


def test_malformed_jsonl_names_file_and_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    argv = ["train", *common(tiny, tmp_path / "o")]
    argv[argv.index("--dataset_name") + 1] = str(bad)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        cli.main(argv)


def test_module_entry_point_and_help():
    run = subprocess.run([sys.executable, "-m", "orpo_plugin.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "train" in run.stdout and "demo" in run.stdout
    run = subprocess.run([sys.executable, "-m", "orpo_plugin.cli", "nonsense"], capture_output=True, text=True)
    assert run.returncode == 2
