"""Gemma 3's 262,144-token vocabulary: the chunked loss equals full logits, loss and output-layer gradient.

The output layer is tied to the input embedding (one [262144, 640] weight), trained here. Three runs of the same
first training step (checkpointing on): full logits, the default chunk (one chunk: its gradient kept from forward)
and 16-token chunks (logits recomputed chunk by chunk in backward).
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from helpers.pairs import METRICS  # tests/helpers
from helpers.real import args, load, one_step  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.chunked import default_chunk_size

ROWS = [
    {"prompt": "Name a fruit that grows on trees.", "chosen": " An apple, or a pear.", "rejected": " A hammer."},
    {"prompt": "What is two plus two?", "chosen": " Two plus two is four.", "rejected": " Five, I think."},
    {"prompt": "Which animal barks?", "chosen": " A dog barks.", "rejected": " The moon."},
]


def step(path, tok, out, **kw):
    return one_step(
        ORPOTrainer,
        model=load(path),
        args=args(ORPOConfig, out, max_length=128, **kw),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tok,
    )


def test_chunked_loss_equals_full_logits_at_262k(gemma3_path, gemma3_tok, tmp_path):
    full = step(gemma3_path, gemma3_tok, tmp_path, chunked_loss=False)
    assert full.chunk_size is None
    head = "model.embed_tokens.weight"
    assert full.config.vocab_size == 262_144 and full.config.tie_word_embeddings and head in full.grads
    for chunk in (None, 16):
        ours = step(gemma3_path, gemma3_tok, tmp_path, loss_chunk_size=chunk)
        assert ours.chunk_size == (chunk or default_chunk_size(262_144))
        assert ours.loss == pytest.approx(full.loss, rel=1e-5, abs=1e-5)
        for k in METRICS:
            assert ours.logged[k] == pytest.approx(full.logged[k], rel=1e-4, abs=1e-5), k
        d = float((ours.grads[head] - full.grads[head]).abs().max() / full.grads[head].abs().max())
        assert d < 1e-4, f"output-layer gradient, chunk {chunk}: {d:.2e}"
        # The layers below see float32 rounding of a 262,144-term normalizer, amplified through 18 layers: the full
        # path itself moves its gradients by 1.3e-4 (relative L2) when its logsumexp is replaced by log_softmax,
        # which is exactly what the chunks compute (measured on this batch).
        num = sum(float((ours.grads[k] - full.grads[k]).pow(2).sum()) for k in full.grads)
        den = sum(float(full.grads[k].pow(2).sum()) for k in full.grads)
        assert (num / den) ** 0.5 < 5e-4, f"chunk {chunk}: gradients differ by {(num / den) ** 0.5:.2e} (relative L2)"
    n = sum(
        len(p) + len(c) for p, c in zip(full.train_dataset["prompt_input_ids"], full.train_dataset["chosen_input_ids"])
    )
    assert n > 2 * 16, "test precondition: several 16-token chunks"
