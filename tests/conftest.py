"""Shared fixtures: a tiny local tokenizer and a factory of tiny random-init models (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Covers the strings the tests use; byte-level BPE encodes anything else too, just in more tokens.
CORPUS = [
    "What color is the sky? Blue. Green. The sky is blue.",
    "Q: Is fire hot? Yes. No. Fire is hot.",
    "The capital of France is Paris. The capital of Spain is Madrid.",
    "Be brief. Answer the question. hello world",
    "<|system|>Be brief.<|end|><|user|>What color is the sky?<|end|><|assistant|>Blue.<|end|>",
    "one two three four five six seven eight nine ten",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (~300 tokens) with pad/bos/eos and the toy chat template."""
    from orpo_plugin.toy import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_tokenizer_no_template():
    """The same tokenizer without a chat template."""
    from orpo_plugin.toy import build_tokenizer

    tok = build_tokenizer(CORPUS, vocab_size=300, chat_template=False)
    assert tok.chat_template is None
    return tok


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_tokenizer):
    """`make(**overrides)` -> a float32 random-init Llama sized to the tiny tokenizer (hidden 32, 2 layers, 4 heads)."""
    from orpo_plugin.toy import build_model

    def make(**overrides):
        kwargs = dict(hidden_size=32, num_layers=2, num_heads=4, dtype=torch.float32)
        kwargs.update(overrides)
        return build_model(len(tiny_tokenizer), **kwargs)

    return make
