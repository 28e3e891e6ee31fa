"""Encoder-decoder models (T5, BART) in the padded layout, against TRL's ORPOTrainer on the same batch."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from helpers.pairs import METRICS, ROWS  # tests/helpers
from helpers.training import cpu_fields  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.toy import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 5
    return build_tokenizer(corpus, vocab_size=300)


def t5(vocab):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


def bart(vocab):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.0,
    )
    torch.manual_seed(0)
    return BartForConditionalGeneration(config)


def config(**kw):
    return cpu_fields("/tmp/orpo-test-seq2seq", **{"max_completion_length": 16, **kw})


def step(trainer, batch):
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    logs = {"loss": loss.item()}
    trainer.log(logs)
    return loss.item(), logs, grads


@pytest.mark.parametrize("build", [t5, bart], ids=["t5", "bart"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_matches_trl_loss_metrics_and_grads(tok, build, checkpointing):
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    model = build(len(tok))
    kw = dict(gradient_checkpointing=checkpointing)
    ours = ORPOTrainer(
        model=copy.deepcopy(model),
        args=ORPOConfig(**config(**kw)),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tok,
    )
    batches, _ = ours.get_batch_samples(iter(ours.get_train_dataloader()), 1, ours.args.device)
    a = step(ours, batches[0])
    theirs = TRLTrainer(
        model=copy.deepcopy(model),
        args=TRLConfig(**config(**kw)),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tok,
    )
    b = step(theirs, next(iter(theirs.get_train_dataloader())))
    (la, ma, ga), (lb, mb, gb) = a, b
    assert la == pytest.approx(lb, abs=1e-5)
    for k in METRICS:
        assert ma[k] == pytest.approx(mb[k], abs=1e-5), k
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-5, rtol=1e-4, msg=k)
    assert 0 < ma["tokens/padding_fraction"] < 1


@pytest.mark.parametrize("layout", ["padding_free", "packing", "prefix_sharing"])
def test_fast_layouts_refuse_encoder_decoder_models_at_start(tok, layout):
    with pytest.raises(ValueError, match=r"encoder-decoder model: it trains in the padded layout only"):
        ORPOTrainer(
            model=t5(len(tok)), args=ORPOConfig(**config(**{layout: True})), train_dataset=ROWS, processing_class=tok
        )


def test_is_encoder_decoder_flag_must_match_the_model(tok):
    from orpo_plugin.toy import build_model

    with pytest.raises(ValueError, match="is_encoder_decoder=True but LlamaForCausalLM is a decoder-only model"):
        ORPOTrainer(
            model=build_model(len(tok), hidden_size=32),
            args=ORPOConfig(**config(is_encoder_decoder=True)),
            train_dataset=ROWS,
            processing_class=tok,
        )


def test_t5_trains_evaluates_and_generates(tok, tmp_path):
    import json

    args = ORPOConfig(
        **config(
            output_dir=str(tmp_path),
            max_steps=6,
            learning_rate=1e-2,
            eval_strategy="steps",
            eval_steps=6,
            per_device_eval_batch_size=2,
            generate_during_eval=True,
            max_completion_length=6,
        )
    )
    t = ORPOTrainer(model=t5(len(tok)), args=args, train_dataset=ROWS * 3, eval_dataset=ROWS, processing_class=tok)
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    evals = [h for h in t.state.log_history if "eval_loss" in h]
    assert evals and "eval_rewards/accuracies" in evals[-1]
    rows = [json.loads(line) for line in open(tmp_path / "generations" / "step-6.jsonl", encoding="utf-8")]
    assert len(rows) == 2
    model = t.accelerator.unwrap_model(t.model).eval()
    for row in rows:  # the decoder's greedy output for the prompt alone, without the decoder start token
        pair = next(p for p in t.eval_dataset if tok.decode(p["prompt_input_ids"]) == row["prompt"])
        with torch.no_grad():
            out = model.generate(torch.tensor([pair["prompt_input_ids"]]), max_new_tokens=6, do_sample=False)[
                0, 1:
            ].tolist()
        out = out[: out.index(2) + 1] if 2 in out else out
        assert row["generated"] == tok.decode(out) and len(out) >= 1
