"""Every layout against the padded one on real architectures, with the defaults users get (checkpointing on).

Tiny random configs of each architecture (tests/helpers/models.py), windowed models with a 4-token window and
sequences past it, soft-capped (Gemma 2) and sink-attention (GPT-OSS) models through their eager kernels. Each run is
the real `trainer.train()` for one step; the loss and every gradient are captured before the optimizer step.
bf16 is off in every run: the comparison at 1e-5 needs float32 (bf16 numerics are covered in test_numerics.py).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers.models import MODEL_NAMES, WINDOW, build
from helpers.training import cpu_fields  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer

ROWS = [
    {"prompt": "name a fruit that you like to eat:", "chosen": " apple banana pear", "rejected": " dog cat"},
    {"prompt": "hi", "chosen": " hello there my good friend", "rejected": " go away now please go"},
    {"prompt": "count to three and then stop:", "chosen": " one two three", "rejected": " three"},
    {"prompt": "name an animal please:", "chosen": " dog", "rejected": " apple pear plum fig lime"},
]
LAYOUTS = {
    "padded": {},
    "padding_free": {"padding_free": True},
    "packing": {"packing": True, "packing_max_tokens": 1024},
    "prefix_sharing": {"prefix_sharing": True},
}


@pytest.fixture(scope="module")
def tok():
    from orpo_plugin.toy import build_tokenizer

    corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 5
    return build_tokenizer(corpus, vocab_size=300)


def capture_trainer(base):
    class Capture(base):
        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            self.captured = (
                loss.item(),
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            )
            return loss

    return Capture


def args_for(config_cls, **kw):
    return config_cls(**cpu_fields("/tmp/orpo-matrix", **kw))


def train_step(name, tok, trainer_cls=ORPOTrainer, config_cls=ORPOConfig, attn=None, **kw):
    """(loss, grads) of one real training step of a fresh model of architecture `name`."""
    model = build(name, len(tok), attn_implementation=attn)
    t = capture_trainer(trainer_cls)(
        model=model, args=args_for(config_cls, **kw), train_dataset=Dataset.from_list(ROWS), processing_class=tok
    )
    t.train()
    return t.captured


def assert_close(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, abs=atol)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=1e-4, msg=k)


def test_sequences_run_past_the_window(tok):
    lengths = [len(tok(r["prompt"] + r["rejected"])["input_ids"]) for r in ROWS]
    assert max(lengths) > 3 * WINDOW and min(lengths) > WINDOW


_reference: dict = {}


def padded_reference(name, tok):
    """The padded layout with checkpointing off: what TRL computes (checked below)."""
    if name not in _reference:
        _reference[name] = train_step(name, tok, gradient_checkpointing=False)
    return _reference[name]


# every layout with checkpointing on (the default) and off, but the reference itself (padded, off)
CASES = [(layout, ckpt) for layout in LAYOUTS for ckpt in (True, False) if layout != "padded" or ckpt]


@pytest.mark.parametrize(
    "layout,checkpointing", CASES, ids=[f"{layout}-{'ckpt' if c else 'no-ckpt'}" for layout, c in CASES]
)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layout_equals_padded(name, layout, checkpointing, tok):
    ours = train_step(name, tok, gradient_checkpointing=checkpointing, **LAYOUTS[layout])
    assert_close(ours, padded_reference(name, tok))


@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_oss", "mistral"])
def test_reentrant_checkpointing(name, layout, tok):
    """PEFT's kbit preparation and older scripts use reentrant checkpointing: recomputation outside autograd's view."""
    ours = train_step(
        name, tok, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, **LAYOUTS[layout]
    )
    assert_close(ours, padded_reference(name, tok))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padded_equals_trl(name, tok):
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    theirs = train_step(name, tok, TRLTrainer, TRLConfig, gradient_checkpointing=False)
    assert_close(padded_reference(name, tok), theirs)


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_transformers_dense_packed_mask(name, tok):
    """varlen_attention=False: transformers' own block-diagonal mask from position_ids (windows included)."""
    ours = train_step(name, tok, gradient_checkpointing=True, padding_free=True, varlen_attention=False)
    assert_close(ours, padded_reference(name, tok))


# ---- refused at start, never approximated ------------------------------------------------------------------------


def test_attention_dropout_on_flex_prefix_sharing_is_refused_at_start(tok):
    model = build("llama", len(tok), attn_implementation="flex_attention", attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"prefix_sharing layout.*flex_attention.*attention dropout.*orpo_flex cannot"):
        ORPOTrainer(
            model=model,
            args=args_for(ORPOConfig, prefix_sharing=True, disable_dropout=False),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tok,
        )


def test_attention_dropout_is_honoured_by_orpo_sdpa(tok):
    """disable_dropout=False on an sdpa model: packed attention applies the dropout (the step differs from no dropout)."""
    losses = []
    for p in (0.0, 0.5):
        model = build("llama", len(tok), attention_dropout=p)
        t = capture_trainer(ORPOTrainer)(
            model=model,
            args=args_for(ORPOConfig, padding_free=True, disable_dropout=False),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tok,
        )
        t.train()
        losses.append(t.captured[0])
    assert abs(losses[0] - losses[1]) > 1e-4


def test_sinks_on_flex_on_cpu_are_refused_at_start(tok):
    model = build("gpt_oss", len(tok), attn_implementation="flex_attention")
    with pytest.raises(ValueError, match=r"GptOssForCausalLM cannot train in the prefix_sharing layout.*sinks"):
        ORPOTrainer(
            model=model,
            args=args_for(ORPOConfig, prefix_sharing=True),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tok,
        )


# ---- LoRA and QLoRA on a sliding-window model, packed, checkpointing on ---------------------------------------------


def _adapter_step(tok, tmp_path, quantized: bool, **layout):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / "mistral"
    if not path.exists():
        build("mistral", len(tok)).save_pretrained(path)
    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False
    )  # non-zero B: every adapter weight gets a gradient
    torch.manual_seed(0)  # the same random adapter init in every run
    t = capture_trainer(ORPOTrainer)(
        model=model,
        args=args_for(ORPOConfig, gradient_checkpointing=True, **layout),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tok,
        peft_config=lora,
    )
    t.train()
    return t.captured


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora-nf4"])
@pytest.mark.parametrize("layout", ["packing", "prefix_sharing"])
def test_adapters_on_a_sliding_window_model(layout, quantized, tok, tmp_path):
    padded = _adapter_step(tok, tmp_path, quantized)
    ours = _adapter_step(tok, tmp_path, quantized, **LAYOUTS[layout])
    assert padded[1] and all("lora" in k for k in padded[1])
    assert_close(ours, padded)
