"""Saving writes TRL's model card (README.md) with the base model, the ORPO citation, the options used and our tag."""

from __future__ import annotations

import os

import yaml
from helpers.stubs import StubTokenizer  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.toy import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAIRS = [
    {"prompt_input_ids": [1, 5, 6], "chosen_input_ids": [7, 8, 2], "rejected_input_ids": [9, 2]},
    {"prompt_input_ids": [1, 10], "chosen_input_ids": [11, 2], "rejected_input_ids": [12, 13, 2]},
]


def card(path):
    text = open(path, encoding="utf-8").read()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_save_model_writes_a_trl_style_model_card(tmp_path):
    model = build_model(97, hidden_size=32)
    model.config._name_or_path = "tiny-org/tiny-llama"  # a hub id, not a local folder: the card names it
    args = ORPOConfig(
        output_dir=str(tmp_path / "run"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        packing=True,
        packing_max_tokens=96,
        prefix_sharing=True,
        max_length=48,
        truncation_mode="keep_start",
        disable_tqdm=True,
    )
    t = ORPOTrainer(model=model, args=args, train_dataset=PAIRS, processing_class=StubTokenizer())
    t.save_model(str(tmp_path / "saved"))
    for folder in ("run", "saved"):
        meta, body = card(tmp_path / folder / "README.md")
        assert meta["base_model"] == "tiny-org/tiny-llama"
        assert {"orpo-plugin", "orpo", "trl"} <= set(meta["tags"])
        assert "fine-tuned version of [tiny-org/tiny-llama]" in body
        assert (
            "[ORPO: Monolithic Preference Optimization without Reference Model](https://huggingface.co/papers/2403.07691)"
            in body
        )
        assert "@article{hong2024orpo" in body and "eprint       = {arXiv:2403.07691}" in body
        assert "Jiwoo Hong and Noah Lee and James Thorne" in body
        for row in (
            "| `layout` | `prefix_sharing` |",
            "| `packing` | `True` |",
            "| `packing_max_tokens` | `96` |",
            "| `prefix_sharing` | `True` |",
            "| `chunked_loss` | `True` |",
            "| `beta` | `0.1` |",
            "| `truncation_mode` | `keep_start` |",
        ):
            assert row in body, row
        assert "`max_prompt_length`" not in body  # unset: the default rule, no limit to show
        assert "- orpo-plugin: " in body


def test_checkpoints_write_the_model_card(tmp_path):
    args = ORPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to=[],
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    t = ORPOTrainer(
        model=build_model(97, hidden_size=32), args=args, train_dataset=PAIRS, processing_class=StubTokenizer()
    )
    t.train()
    meta, body = card(tmp_path / "README.md")
    assert "orpo-plugin" in meta["tags"] and meta["model_name"] == tmp_path.name
    assert "| `layout` | `padded` |" in body and "@article{hong2024orpo" in body


def test_a_base_model_from_a_local_folder_is_named_by_the_folder(tmp_path):
    folder = tmp_path / "my-base-model"
    build_model(97, hidden_size=32).save_pretrained(folder)
    args = ORPOConfig(output_dir=str(tmp_path / "run"), bf16=False, use_cpu=True, report_to=[], disable_tqdm=True)
    t = ORPOTrainer(model=str(folder), args=args, train_dataset=PAIRS, processing_class=StubTokenizer())
    t.save_model()
    meta, body = card(tmp_path / "run" / "README.md")
    assert "None" not in body.split("## Training procedure")[0], body[:800]
    assert "This model is a fine-tuned version of a model from the local folder `my-base-model`." in body
    assert f'pipeline("text-generation", model="{tmp_path / "run"}"' in body
    assert "base_model" not in meta  # the card's metadata names Hub models only
