"""CPU defaults: bf16 left unset trains in float32 on a machine without a bf16 accelerator (one notice), an explicit
bf16=True there still errors, and the README's `orpo-plugin train` commands run on a CPU as written.

TRL's config base (trl >= 1.9) declares `bf16: bool | None = None` and turns None into True, which transformers then
refuses on a machine without a bf16 accelerator ("Your setup doesn't support bf16/gpu").
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orpo_plugin import ORPOConfig
from orpo_plugin.toy import build_model, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "bf16 left unset"
ROWS = [
    {"prompt": "Name a fruit.", "chosen": " apple banana.", "rejected": " dog cat."},
    {"prompt": "Name an animal.", "chosen": " dog horse.", "rejected": " red blue."},
    {"prompt": "Name a color.", "chosen": " red green.", "rejected": " saw drill."},
    {"prompt": "Name a tool.", "chosen": " saw hammer.", "rejected": " pear plum."},
]


def _bf16_accelerator() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def _config(caplog, **kw) -> tuple[ORPOConfig, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        args = ORPOConfig(output_dir="/tmp/orpo-cpu-defaults", report_to=[], **kw)
    return args, [r.getMessage() for r in caplog.records if NOTICE in r.getMessage()]


def _pretend_bf16_accelerator(monkeypatch, available: bool):
    """What transformers reports for the accelerator, both where ORPOConfig asks and where its own check asks."""
    import transformers.training_args
    import transformers.utils

    for module in (transformers.utils, transformers.training_args):
        monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda: available)
        monkeypatch.setattr(module, "is_torch_xla_available", lambda: False)


# ------------------------------------------------------------------------------------------------ ORPOConfig
def test_bf16_unset_on_this_machine(caplog):
    """No flag: float32 plus one notice without a bf16 accelerator (this CPU); bf16 and no notice with one."""
    args, notices = _config(caplog)
    if _bf16_accelerator():
        assert args.bf16 is True and notices == []
    else:
        assert args.bf16 is False and len(notices) == 1, notices
        assert "float32" in notices[0] and "bf16=True" in notices[0]


def test_bf16_unset_without_accelerator_trains_fp32_with_one_notice(caplog, monkeypatch):
    _pretend_bf16_accelerator(monkeypatch, False)
    args, notices = _config(caplog)
    assert args.bf16 is False and args.fp16 is False and len(notices) == 1, notices
    assert "no accelerator with bf16" in notices[0]


def test_bf16_unset_with_bf16_accelerator_keeps_trls_default(caplog, monkeypatch):
    _pretend_bf16_accelerator(monkeypatch, True)
    args, notices = _config(caplog)
    assert args.bf16 is True and notices == []


def test_explicit_bf16_true_without_accelerator_still_errors(caplog, monkeypatch):
    _pretend_bf16_accelerator(monkeypatch, False)
    with pytest.raises(ValueError, match="doesn't support bf16"):
        _config(caplog, bf16=True)
    assert not [r for r in caplog.records if NOTICE in r.getMessage()]


def test_explicit_bf16_false_gives_no_notice(caplog):
    args, notices = _config(caplog, bf16=False)
    assert args.bf16 is False and notices == []


def test_use_cpu_unset_bf16_is_fp32_and_explicit_bf16_is_cpu_autocast(caplog):
    """use_cpu=True: float32 unless bf16=True is asked for, which transformers accepts on a CPU (autocast)."""
    args, notices = _config(caplog, use_cpu=True)
    assert args.bf16 is False and len(notices) == 1 and "use_cpu=True" in notices[0]
    args, notices = _config(caplog, use_cpu=True, bf16=True)
    assert args.bf16 is True and notices == []


def test_fp16_asked_for_leaves_bf16_off_without_notice(caplog, monkeypatch):
    """fp16=True with bf16 unset: bf16 off (TRL's rule), nothing to announce."""
    _pretend_bf16_accelerator(monkeypatch, True)
    import transformers.training_args

    # fp16 needs a GPU; only ORPOConfig's handling of bf16 is under test here
    monkeypatch.setattr(transformers.training_args.TrainingArguments, "_validate_args", lambda self: None)
    args, notices = _config(caplog, fp16=True)
    assert args.bf16 is False and args.fp16 is True and notices == []


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-defaults")
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 5, vocab_size=300)
    build_model(len(tok), hidden_size=64, num_layers=2).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    return root


def _train(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "orpo_plugin.cli", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def _check_trained(run: subprocess.CompletedProcess, out: Path, steps: int = 2):
    assert run.returncode == 0, run.stderr[-4000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in logged if "loss" in h]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), logged
    args = torch.load(out / "training_args.bin", weights_only=False)
    if not _bf16_accelerator():
        assert args.bf16 is False
        assert run.stderr.count(NOTICE) == 1, run.stderr[-4000:]
    return args


def test_cli_defaults_train_packed_on_cpu(tiny, tmp_path):
    """`orpo-plugin train --model_name_or_path M --dataset_name d.jsonl --output_dir o --packing True`: no --bf16,
    gradient checkpointing at its default (on); only the step count and log cadence are added, to keep it short."""
    run = _train(
        [
            "train",
            "--model_name_or_path",
            str(tiny / "model"),
            "--dataset_name",
            str(tiny / "data.jsonl"),
            "--output_dir",
            "o",
            "--packing",
            "True",
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
        ],
        tmp_path,
    )
    args = _check_trained(run, tmp_path / "o")
    assert args.gradient_checkpointing is True and args.packing is True
    assert (tmp_path / "o" / "model.safetensors").exists()


def _readme_command(start: str) -> list[str]:
    """The README's shell command (continuation lines joined) that begins with `start`."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith(start)]
    assert len(lines) == 1, f"expected one README command starting with {start!r}, found {lines}"
    return shlex.split(lines[0])


def test_readme_qlora_packing_command_runs_on_cpu(tiny, tmp_path):
    """The README's flag-style QLoRA command, with PATH/data.jsonl/out pointing at local files and 2 steps."""
    argv = _readme_command("orpo-plugin train --model_name_or_path")
    assert "--bf16" not in argv and "--use_cpu" not in argv and "--gradient_checkpointing" not in argv
    local = {"PATH": str(tiny / "model"), "data.jsonl": str(tiny / "data.jsonl")}
    argv = [local.get(a, a) for a in argv[1:]] + ["--max_steps", "2", "--logging_steps", "1"]
    run = _train(argv, tmp_path)
    out = tmp_path / argv[argv.index("--output_dir") + 1]
    args = _check_trained(run, out)
    assert args.gradient_checkpointing is True and args.packing is True
    assert args.model_init_kwargs["quantization_config"].load_in_4bit
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("size", ["cp_size", "tp_size"])
def test_a_parallelism_config_that_splits_sequences_is_refused(size, tmp_path):
    """Context/tensor parallelism would compute per-sequence log-probs on shards: refused at config time."""
    from accelerate import ParallelismConfig

    from orpo_plugin.config import check_no_sequence_split

    split = ParallelismConfig(**{size: 2})
    with pytest.raises(ValueError, match=rf"parallelism_config\.{size}=2: .* Set {size}=1"):
        check_no_sequence_split(split)
    with pytest.raises(ValueError, match=rf"parallelism_config\.{size}=2"):
        ORPOConfig(output_dir=str(tmp_path), parallelism_config=split, report_to=[])
    check_no_sequence_split(ParallelismConfig(dp_shard_size=2))  # data parallelism only: accepted
    # Ulysses sequence parallelism is reduced over its group (tests/distributed/test_sequence_parallel.py)
    check_no_sequence_split(ParallelismConfig(sp_size=2, sp_backend="deepspeed"))
