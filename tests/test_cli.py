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
        "--model_name_or_path",
        str(tiny / "model"),
        "--dataset_name",
        str(tiny / "train.jsonl"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--bf16",
        "False",
        "--use_cpu",
        "True",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--max_length",
        "64",
        "--disable_tqdm",
        "True",
    ]


def logged(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_train_qlora_two_steps_padding_free(tiny, tmp_path):
    out = tmp_path / "qlora"
    argv = [
        "train",
        *common(tiny, out),
        "--load_in_4bit",
        "--use_peft",
        "--lora_r",
        "8",
        "--lora_target_modules",
        "all-linear",
        "--padding_free",
        "True",
        "--learning_rate",
        "1e-3",
    ]
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
    cfg.update(
        {
            "packing": True,
            "beta": 0.2,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "bf16": False,
            "use_cpu": True,
            "disable_tqdm": True,
        }
    )
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


# ------------------------------------------------------------------------ bitsandbytes' CPU inference layout
def _qlora_trainer(tiny, tmp_path):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from orpo_plugin import ORPOConfig, ORPOTrainer

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", quantization_config=quant, device_map={"": "cpu"})
    args = ORPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
    )
    return ORPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(ROWS),
        eval_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(tiny / "model"),
        peft_config=LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False),
    )


def _lora_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.training_step(trainer.model, dict(batch))
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return grads, [str(w.message) for w in caught if "autograd kernel was not registered" in str(w.message)]


def _repacked(trainer):
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in trainer._4bit_layers())


@pytest.fixture
def qlora(tiny, tmp_path):
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(8, 8)
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    trainer = _qlora_trainer(tiny, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def test_qlora_evaluation_mid_training_keeps_the_training_weight_layout(qlora):
    """trainer.evaluate() between steps (eval_strategy) leaves the LoRA gradients of the next step unchanged."""
    trainer, batch = qlora
    before, warned = _lora_grads(trainer, batch)
    assert before and not warned
    trainer.evaluate()
    assert _repacked(trainer) == 0
    after, warned = _lora_grads(trainer, batch)
    assert not warned
    assert before.keys() == after.keys()
    for name in before:
        torch_close(after[name], before[name], name)


def test_qlora_generations_during_evaluation_keep_the_training_weight_layout(qlora, tmp_path):
    """generate_during_eval runs the 4-bit model in eval mode without grad: still no repacking, same gradients."""
    import json

    trainer, batch = qlora
    before, _ = _lora_grads(trainer, batch)
    trainer.args.generate_during_eval = True
    trainer.args.max_completion_length = 4
    trainer.evaluate()
    assert _repacked(trainer) == 0
    rows = [json.loads(line) for line in open(tmp_path / "generations" / "step-0.jsonl", encoding="utf-8")]
    assert len(rows) == 4 and all(set(r) == {"step", "prompt", "chosen", "rejected", "generated"} for r in rows)
    after, warned = _lora_grads(trainer, batch)
    assert not warned
    for name in before:
        torch_close(after[name], before[name], name)


def test_qlora_eval_mode_forward_in_a_callback_during_training_does_not_repack(qlora):
    """Sampling from the model in a callback (eval mode, no grad) during train() keeps the training layout."""
    import torch
    from transformers import TrainerCallback

    trainer, batch = qlora
    seen = []

    class Sample(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            model.eval()
            with torch.no_grad():
                model(input_ids=batch["input_ids"][:, :8], use_cache=False)
            model.train()
            seen.append(_repacked(trainer))

    trainer.add_callback(Sample())
    trainer.args.max_steps = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert seen == [0, 0]
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]


def test_qlora_weights_repacked_before_training_stop_the_first_step(qlora):
    """The model ran in eval mode before training (weights repacked, not exactly reversible): a clear error."""
    import torch

    trainer, batch = qlora
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(input_ids=batch["input_ids"][:, :8], use_cache=False)
    trainer.model.train()
    assert _repacked(trainer) > 0  # the situation this guards against really arises here
    with pytest.raises(
        RuntimeError, match=r"\d+ bitsandbytes 4-bit layers .* repacked for CPU inference.*reload the model"
    ):
        trainer.training_step(trainer.model, dict(batch))


def torch_close(a, b, name):
    import torch

    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _bf16_qlora(tiny, tmp_path, trainer_module):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny / "model", quantization_config=quant, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    args = trainer_module.ORPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        bf16=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
        gradient_checkpointing=True,
    )
    torch.manual_seed(0)
    return trainer_module.ORPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(tiny / "model"),
        peft_config=LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False),
    )


def test_bf16_qlora_keeps_the_frozen_embeddings_in_their_loaded_dtype(tiny, tmp_path):
    """PEFT's 4-bit preparation upcasts the frozen input and output embeddings to float32 (2 GiB more for an 8B
    model with a 128k vocabulary); under bf16 training they return to bf16 exactly, as TRL's trainer leaves them,
    norms stay float32, and a training step reaches every adapter (gradient checkpointing on, the default)."""
    import torch
    from trl.experimental import orpo as trl_orpo

    import orpo_plugin

    ours = _bf16_qlora(tiny, tmp_path / "ours", orpo_plugin)
    theirs = _bf16_qlora(tiny, tmp_path / "trl", trl_orpo)

    def dtypes(trainer):
        model = trainer.model
        norms = {m.weight.dtype for n, m in model.named_modules() if n.endswith("norm")}
        return model.get_input_embeddings().weight.dtype, model.get_output_embeddings().weight.dtype, norms

    assert dtypes(ours) == dtypes(theirs) == (torch.bfloat16, torch.bfloat16, {torch.float32})
    from transformers import TrainerCallback

    grads = {}

    class Grads(TrainerCallback):  # through train(): mixed precision is applied where training applies it
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    ours.add_callback(Grads())
    ours.train()
    adapters = [n for n, p in ours.model.named_parameters() if p.requires_grad]
    assert adapters and sorted(grads) == sorted(adapters)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert ours.model.get_output_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_jsonl_row_of_another_format_stops_train_and_eval_with_its_row_line_and_field(tiny, tmp_path, command):
    good = {
        "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple"}],
        "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "dog"}],
    }
    bad = tmp_path / "prefs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [good] * 7 + [{**good, "rejected": "dog"}]))
    if command == "train":
        argv = ["train", *common(tiny, tmp_path / "o")]
        argv[argv.index("--dataset_name") + 1] = str(bad)
    else:
        argv = [
            "eval",
            "--model",
            str(tiny / "model"),
            "--dataset",
            str(bad),
            "--split",
            "train",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    with pytest.raises(
        TypeError,
        match=r"^row 7 \(0-based\), line 8 of prefs\.jsonl: field 'rejected' is a string "
        r"but row 0 \(0-based\), line 1 of prefs\.jsonl has a message list",
    ):
        cli.main(argv)
