"""Every shipped TRL config (configs/trl/*.yaml) trains at tiny scale through the real `orpo-plugin train --config`.

The shipped file itself is passed to `--config`; command-line flags (which TrlParser lets override the file) change
only what the tables below list: the model, dataset and output paths, sizes and step counts, and what a CPU cannot run
as written. Every other option runs as written, gradient checkpointing with its kwargs, packing, QLoRA nf4 with double
quantization, LoRA on all linear layers and the chunked loss included, and the run's saved arguments are checked
against the file. A written value the CPU table does not know fails the test instead of being dropped: add a row that
says how a CPU runs it, or fix the config. The Axolotl configs run in tests/test_axolotl_integration.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orpo_plugin.toy import build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs" / "trl").glob("*.yaml"))
STEPS = 2


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16/AMX), as torch's oneDNN backend reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_BF16 = _cpu_has_bf16()

# What a CPU run changes in a shipped config: key -> {value as written: value here}.
CPU = {
    # flash-attn runs on CUDA only; sdpa runs the same layouts (orpo_plugin's exact per-sequence attention)
    "attn_implementation": {"flash_attention_2": "sdpa", "sdpa": "sdpa", "eager": "eager"},
    # bf16 stays where the CPU computes it (with use_cpu, transformers' condition for bf16 without an accelerator);
    # a CPU without bf16 trains in float32
    "bf16": {True: CPU_BF16, False: False},
    "dtype": {"bfloat16": "bfloat16" if CPU_BF16 else "float32", "float32": "float32", "auto": "auto"},
}
# Sizes and cadence: capped at a tiny run's, never raised.
SIZES = {
    "max_length": 128,
    "max_prompt_length": 64,
    "max_completion_length": 64,
    "packing_max_tokens": 256,
    "loss_chunk_size": 64,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "save_steps": STEPS,
    "warmup_steps": 1,
}
# Set in every run: two optimizer steps, each logged.
ALWAYS = {"max_steps": STEPS, "logging_steps": 1}
# The tiny local model, the local JSONL and this run's directory, given as a user would.
PATHS = ("model_name_or_path", "dataset_name", "output_dir")
CHANGEABLE = set(CPU) | set(SIZES) | set(ALWAYS) | set(PATHS) | {"use_cpu"}

ORPO_METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "tokens/real")
WORDS = (
    "the a river mountain cloud quick slow bright dark green blue stone tree light wind water fire road city garden "
    "window music paper story answer question simple careful honest helpful clear short long because first second"
).split()


def run_config(written: dict, paths: dict[str, str]) -> tuple[dict, dict]:
    """(the flags that override the shipped file, the configuration the run should end up with)."""
    flags = dict(paths)
    for key, table in CPU.items():
        if key in written:
            if written[key] not in table:
                pytest.fail(
                    f"{key}: {written[key]!r} as written: no CPU substitution known; add one to CPU or fix the config"
                )
            if table[written[key]] != written[key]:
                flags[key] = table[written[key]]
    if flags.get("bf16", written.get("bf16")) is True and "use_cpu" not in written:
        flags["use_cpu"] = True  # bf16 autocast on the CPU
    flags.update({k: min(written[k], cap) for k, cap in SIZES.items() if k in written and written[k] > cap})
    flags.update(ALWAYS)
    effective = {**written, **flags}
    assert set(written) <= set(effective)
    changed = {k for k in effective if k not in written or effective[k] != written[k]}
    assert changed <= CHANGEABLE, changed - CHANGEABLE
    return flags, effective


def _argv(flags: dict) -> list[str]:
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "orpo-plugin"
    found = str(script) if script.exists() else shutil.which("orpo-plugin")
    assert found, "the orpo-plugin command is not installed (pip install -e .)"
    return [found]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init Llama and a JSONL of 24 pairs of mixed lengths (prompt/chosen/rejected strings)."""
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = [
        {"prompt": text(3, 24) + "?", "chosen": " " + text(2, 20) + ".", "rejected": " " + text(2, 20) + "."}
        for _ in range(24)
    ]
    root = tmp_path_factory.mktemp("shipped-trl")
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows] + WORDS, vocab_size=400)
    build_model(len(tok), hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=512).save_pretrained(
        root / "model"
    )
    tok.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _plain(value):
    value = getattr(value, "value", value)
    return [] if value in ("none", ["none"]) else value


def _check_model_options(effective: dict, args, out: Path):
    """The model-side options (TRL's ModelConfig) as the run applied them."""
    init = args.model_init_kwargs or {}
    for key in ("attn_implementation", "dtype"):
        if key in effective:
            assert init.get(key) == effective[key], (key, init.get(key), effective[key])
    if effective.get("load_in_4bit"):
        quant = init["quantization_config"]
        assert quant.load_in_4bit and quant.bnb_4bit_quant_type == effective.get("bnb_4bit_quant_type", "nf4")
        assert quant.bnb_4bit_use_double_quant == bool(effective.get("use_bnb_nested_quant", False))
    if effective.get("use_peft"):
        adapter = json.loads((out / "adapter_config.json").read_text())
        for key, field in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
            if key in effective:
                assert adapter[field] == effective[key], (key, adapter[field], effective[key])
        if effective.get("lora_target_modules") in ("all-linear", ["all-linear"]):
            linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == linear, adapter["target_modules"]
        assert (out / "adapter_model.safetensors").exists()
    else:
        assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_trl_config_trains(path, tiny, tmp_path):
    from orpo_plugin import ORPOConfig

    written = yaml.safe_load(path.read_text())
    out = tmp_path / "out"
    flags, effective = run_config(
        written,
        {"model_name_or_path": str(tiny / "model"), "dataset_name": str(tiny / "data.jsonl"), "output_dir": str(out)},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [*_cli(), "train", "--config", str(path), *_argv(flags)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, f"{path.name} with {flags}:\n{run.stderr[-4000:]}"

    steps = [h for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1)), steps
    for entry in steps:
        assert all(math.isfinite(entry[m]) for m in ORPO_METRICS), entry
        assert math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0, entry
    if effective.get("packing") or effective.get("padding_free"):
        assert all(entry["tokens/padding_fraction"] == 0 for entry in steps), steps

    # every training option of the file (as substituted) is what the run used
    args = torch.load(out / "training_args.bin", weights_only=False)
    fields = {f.name for f in ORPOConfig.__dataclass_fields__.values()}
    for key in sorted(set(effective) & fields):
        assert _plain(getattr(args, key)) == _plain(effective[key]), (key, getattr(args, key), effective[key])
    _check_model_options(effective, args, out)
    if effective.get("save_strategy") == "steps":
        assert (out / f"checkpoint-{STEPS}" / "trainer_state.json").exists()
