"""ORPOTrainer against TRL's ORPOTrainer on the same batch, and every layout against the padded one."""

from __future__ import annotations

import copy
import logging
import os
import random

import pytest
import torch
from datasets import Dataset
from helpers.pairs import METRICS, ROWS  # tests/helpers
from helpers.stubs import StubTokenizer  # tests/helpers
from helpers.training import cpu_fields  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.collators import PreferenceCollator
from orpo_plugin.toy import build_model, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONV_ROWS = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
    }
    for r in ROWS
]


@pytest.fixture(scope="module")
def tok():
    corpus = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 5
    return build_tokenizer(corpus + ["the quick brown fox jumps over a lazy dog"] * 3, vocab_size=300)


def config(**kw):
    """Checkpointing at its default (on); test_model_matrix.py runs both."""
    return cpu_fields("/tmp/orpo-test", **kw)


def one_step(trainer_cls, config_cls, model, tok, rows, **kw):
    """Loss, logged metrics and gradients of the first micro-batch, computed the way training does."""
    t = trainer_cls(
        model=model, args=config_cls(**config(**kw)), train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    batches, _ = t.get_batch_samples(iter(t.get_train_dataloader()), 1, t.args.device)
    t.model.train()
    loss = t.compute_loss(t.model, t._prepare_inputs(batches[0]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    logs = {"loss": loss.item()}
    t.log(logs)
    return loss.item(), logs, grads


def trl_step(model, tok, rows, trainer_cls=None, **kw):
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    TRLTrainer = trainer_cls or TRLTrainer
    t = TRLTrainer(
        model=model, args=TRLConfig(**config(**kw)), train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    batch = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    t.model.train()
    loss = t.compute_loss(t.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    logs = {"loss": loss.item()}
    t.log(logs)
    return loss.item(), logs, grads


def assert_same(a, b, metrics=METRICS, atol=1e-5):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert la == pytest.approx(lb, abs=atol)
    for k in metrics:
        assert ma[k] == pytest.approx(mb[k], abs=atol), k
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=1e-4, msg=k)


def test_matches_trl_loss_metrics_and_grads(tok):
    model = build_model(len(tok), hidden_size=32, num_layers=2)
    ours = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, ROWS)
    theirs = trl_step(copy.deepcopy(model), tok, ROWS)
    assert_same(ours, theirs)


def test_conversational_rows_match_trl_on_our_ids_and_differ_only_by_the_second_eos(tok):
    """TRL appends EOS after the template's end-of-turn token; we do not (docs/differences-from-trl.md). On our
    ids, TRL's trainer computes the same loss, metrics and gradients; TRL's own ids are ours plus that EOS."""
    from helpers.trl_ref import pretokenized_trl_trainer, trl_rows  # tests/helpers

    from orpo_plugin.data import prepare_dataset

    model = build_model(len(tok), hidden_size=32, num_layers=2)
    ours = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, CONV_ROWS)
    prepared, _ = prepare_dataset(CONV_ROWS, tok, max_length=64)
    theirs = trl_step(copy.deepcopy(model), tok, trl_rows(prepared), trainer_cls=pretokenized_trl_trainer())
    assert_same(ours, theirs)

    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    trl_ds = TRLTrainer(
        model=copy.deepcopy(model),
        args=TRLConfig(**config()),
        train_dataset=Dataset.from_list(CONV_ROWS),
        processing_class=tok,
    ).train_dataset
    for row, trl_row in zip(prepared, trl_ds):
        for name in ("chosen", "rejected"):
            assert tok.decode(row[f"{name}_input_ids"]).endswith("<|end|>")
            assert trl_row[f"{name}_input_ids"] == row["prompt_input_ids"] + row[f"{name}_input_ids"] + [
                tok.eos_token_id
            ]


def test_mean_logit_metrics_match_trl_without_padding(tok):
    """TRL's logits/* average over pad positions too; on a batch without padding the two definitions agree."""
    words = " dog cat apple pear plum go away hello there friend one two three fox lazy quick brown".split()
    by_len = {}
    for w in words:
        by_len.setdefault(len(tok("hi " + w)["input_ids"]), []).append(" " + w)
    same = max(by_len.values(), key=len)
    assert len(same) >= 4, by_len
    rows = [
        {"prompt": "hi", "chosen": same[0], "rejected": same[1]},
        {"prompt": "hi", "chosen": same[2], "rejected": same[3]},
    ]
    model = build_model(len(tok), hidden_size=32, num_layers=2)
    ours = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, rows)
    theirs = trl_step(copy.deepcopy(model), tok, rows)
    assert_same(ours, theirs, METRICS + ["logits/chosen", "logits/rejected"])


def test_trl_gives_nan_gradient_where_we_do_not():
    """TRL's log1mexp passes the unused branch's inf gradient at logp -> 0; ours stays finite."""
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    from orpo_plugin.losses import log1mexp

    x = torch.tensor([-1e-8, -1e-30, -80.0], requires_grad=True)
    trl_log1mexp(x).sum().backward()
    assert not torch.isfinite(x.grad).all()
    x.grad = None
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_nll_on_prompt_false_is_completion_only(tok):
    model = build_model(len(tok), hidden_size=32, num_layers=2)
    _, logs, _ = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, ROWS, nll_on_prompt=False)
    # hand computation: mean over chosen completion tokens of -log p, pooled over the batch
    from orpo_plugin.data import tokenize_pair

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in ROWS:
            ids = tokenize_pair(r["prompt"], r["chosen"], r["rejected"], tok, max_length=64)
            full = ids["prompt_input_ids"] + ids["chosen_input_ids"]
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            start = len(ids["prompt_input_ids"])
            for j in range(start, len(full)):
                total -= logp[j - 1, full[j]].item()
                count += 1
    assert logs["nll_loss"] == pytest.approx(total / count, abs=1e-5)
    _, logs_prompt, _ = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, ROWS)
    assert logs_prompt["nll_loss"] != pytest.approx(logs["nll_loss"], abs=1e-3)


# ------------------------------------------------------------------------------------------ layouts
def random_pairs(n, seed, vocab, empty_prompt_every=3):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        lp = 0 if i % empty_prompt_every == 0 else rng.randint(1, 12)
        pairs.append(
            {
                "prompt_input_ids": [rng.randrange(3, vocab) for _ in range(lp)],
                "chosen_input_ids": [rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, 5, 9]))],
                "rejected_input_ids": [rng.randrange(3, vocab) for _ in range(rng.choice([1, 3, 7, 11]))],
            }
        )
    return pairs


LAYOUT_CASES = [
    ("padding_free", "sdpa", True),  # orpo_sdpa per-sequence attention
    ("padding_free", "sdpa", False),  # transformers' block-diagonal mask from position_ids
    ("padding_free", "eager", False),
    ("padding_free", "eager", True),
    ("prefix_sharing", "sdpa", True),
    ("prefix_sharing", "eager", True),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("layout,attn,varlen", LAYOUT_CASES)
def test_layouts_equal_padded(layout, attn, varlen, chunked):
    vocab = 97
    model = build_model(vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, attn_implementation=attn)
    pairs = random_pairs(7, seed=1, vocab=vocab)
    tok_stub = StubTokenizer()

    def run(**kw):
        m = copy.deepcopy(model)
        args = ORPOConfig(**config(per_device_train_batch_size=7, chunked_loss=chunked, loss_chunk_size=5, **kw))
        t = ORPOTrainer(model=m, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok_stub)
        batch = t._prepare_inputs(t.data_collator(pairs))
        t.model.train()
        loss = t.compute_loss(t.model, batch)
        loss.backward()
        logs = {"loss": loss.item()}
        t.log(logs)
        return loss.item(), logs, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}

    reference = run()
    kw = {"prefix_sharing": True} if layout == "prefix_sharing" else {"padding_free": True}
    other = run(varlen_attention=varlen, **kw)
    assert_same(other, reference, METRICS + ["logits/chosen", "logits/rejected"])
    assert other[1]["tokens/padding_fraction"] == 0.0
    assert reference[1]["tokens/padding_fraction"] > 0.2


def test_flex_attention_padding_free_forward_matches_padded():
    """flex_attention has no CPU backward in torch 2.13: compare per-sequence log-probs forward-only."""
    from orpo_plugin.modeling import OutputHead, orpo_forward

    vocab = 97
    model = build_model(vocab, hidden_size=32, num_layers=2, attn_implementation="flex_attention")
    pairs = random_pairs(5, seed=2, vocab=vocab)
    head = OutputHead.of(model)
    model.eval()
    with torch.no_grad():
        padded = orpo_forward(model, PreferenceCollator(0, "padded")(pairs), head, 0.1)
        free = orpo_forward(model, PreferenceCollator(0, "padding_free")(pairs), head, 0.1)
    torch.testing.assert_close(free.output.chosen_logps, padded.output.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(free.output.rejected_logps, padded.output.rejected_logps, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_of_packed_micro_batches_is_exact():
    """4 packed micro-batches of uneven size accumulate to the gradient of one batch holding all their pairs."""
    vocab = 97
    model = build_model(vocab, hidden_size=32, num_layers=2)
    pairs = random_pairs(11, seed=3, vocab=vocab)
    groups = [pairs[:2], pairs[2:7], pairs[7:8], pairs[8:]]

    def grads(micro, ga):
        m = copy.deepcopy(model)
        args = ORPOConfig(**config(padding_free=True, gradient_accumulation_steps=ga))
        t = ORPOTrainer(model=m, args=args, train_dataset=Dataset.from_list(pairs), processing_class=StubTokenizer())
        batches, _ = t.get_batch_samples(iter([t.data_collator(g) for g in micro]), ga, t.args.device)
        t.model.train()
        total = 0.0
        for b in batches:
            loss = t.compute_loss(t.model, t._prepare_inputs(b))
            loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in t.model.named_parameters()}

    acc_loss, acc = grads(groups, 4)
    one_loss, one = grads([pairs], 1)
    assert acc_loss == pytest.approx(one_loss, abs=1e-5)
    for k in one:
        torch.testing.assert_close(acc[k], one[k], atol=1e-5, rtol=1e-4, msg=k)


def test_packing_trains_within_budget_and_logs_token_metrics(tmp_path):
    vocab = 97
    pairs = random_pairs(40, seed=4, vocab=vocab)
    model = build_model(vocab, hidden_size=32, num_layers=2)
    args = ORPOConfig(**config(output_dir=str(tmp_path), packing=True, packing_max_tokens=120, max_steps=4))
    t = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=StubTokenizer())
    loader = t.get_train_dataloader()
    sizes = [int(b["real_tokens"]) for b in loader]
    kept = t.train_dataset  # pairs without a prompt and a one-token response are dropped (nothing to score)
    assert 0 < len(kept) <= len(pairs)
    assert max(sizes) <= 120 and sum(sizes) == sum(
        2 * len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in kept
    )
    t.train()
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == 4
    assert all(h["tokens/padding_fraction"] == 0.0 and 0 < h["tokens/real"] <= 120 for h in logged)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)


def test_pair_longer_than_packing_budget_is_refused():
    pairs = random_pairs(6, seed=5, vocab=97)
    pairs[3]["chosen_input_ids"] = list(range(3, 60))
    args = ORPOConfig(**config(packing=True, packing_max_tokens=40))
    t = ORPOTrainer(
        model=build_model(97, hidden_size=32), args=args, train_dataset=pairs, processing_class=StubTokenizer()
    )
    with pytest.raises(ValueError, match="pair 3 needs"):
        t.get_train_dataloader()


def test_chunked_and_full_logits_agree_through_the_trainer(tok):
    model = build_model(len(tok), hidden_size=32, num_layers=2, tie_word_embeddings=True)
    full = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, ROWS, chunked_loss=False)
    chunked = one_step(ORPOTrainer, ORPOConfig, copy.deepcopy(model), tok, ROWS, chunked_loss=True, loss_chunk_size=7)
    assert_same(chunked, full, METRICS + ["logits/chosen", "logits/rejected"])


def test_lora_on_output_layer_falls_back_with_notice(tok, caplog):
    from peft import LoraConfig

    model = build_model(len(tok), hidden_size=32, num_layers=2)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        t = ORPOTrainer(
            model=model, args=ORPOConfig(**config()), train_dataset=ROWS, processing_class=tok, peft_config=peft_config
        )
    assert t.chunk_size is None
    assert "using full logits" in caplog.text


def test_tokenizer_without_pad_token_uses_eos(tok, caplog):
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = None
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        t = ORPOTrainer(
            model=build_model(len(tok), hidden_size=32),
            args=ORPOConfig(**config()),
            train_dataset=ROWS,
            processing_class=tok2,
        )
    assert tok2.pad_token_id == tok2.eos_token_id
    assert t.data_collator.pad_token_id == tok2.eos_token_id
    assert "no pad token" in caplog.text


def test_prefix_sharing_flex_block_mask_forward_matches_padded():
    """flex_attention with the prefix-sharing BlockMask (forward only: no flex backward on CPU in torch 2.13)."""
    from orpo_plugin.attention import FLEX_NAME, attention_implementation, register
    from orpo_plugin.modeling import OutputHead, orpo_forward

    model = build_model(97, hidden_size=32, num_layers=2, attn_implementation="flex_attention").eval()
    pairs = random_pairs(6, seed=6, vocab=97)
    head = OutputHead.of(model)
    with torch.no_grad():
        padded = orpo_forward(model, PreferenceCollator(0, "padded")(pairs), head, 0.1)
        with attention_implementation(model, register(FLEX_NAME)):
            shared = orpo_forward(
                model, PreferenceCollator(0, "prefix_sharing", pad_to_multiple_of=16)(pairs), head, 0.1
            )
    torch.testing.assert_close(shared.output.chosen_logps, padded.output.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.output.rejected_logps, padded.output.rejected_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.output.loss, padded.output.loss, atol=1e-5, rtol=1e-5)


def test_prefix_sharing_refuses_unsupported_attention(tok):
    model = build_model(len(tok), hidden_size=32)
    model.config._attn_implementation = "flash_attention_3"
    with pytest.raises(ValueError, match="prefix_sharing runs on sdpa, eager"):
        ORPOTrainer(
            model=model, args=ORPOConfig(**config(prefix_sharing=True)), train_dataset=ROWS, processing_class=tok
        )


def test_training_reduces_loss_and_evaluates(tok, tmp_path):
    model = build_model(len(tok), hidden_size=32, num_layers=2)
    args = ORPOConfig(
        **config(
            output_dir=str(tmp_path),
            max_steps=8,
            learning_rate=5e-3,
            eval_strategy="steps",
            eval_steps=8,
            per_device_eval_batch_size=2,
        )
    )
    t = ORPOTrainer(model=model, args=args, train_dataset=ROWS * 4, eval_dataset=ROWS, processing_class=tok)
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    evals = [h for h in t.state.log_history if "eval_loss" in h]
    assert evals and "eval_rewards/accuracies" in evals[-1] and "eval_nll_loss" in evals[-1]


@pytest.mark.parametrize("layout", ["padded", "padding_free", "prefix_sharing"])
def test_logits_computed_inside_the_forward_match(layout):
    """The path used under FSDP/ZeRO-3 (and for models with unknown logit transforms) gives the same results."""
    vocab = 97
    model = build_model(vocab, hidden_size=32, num_layers=2)
    pairs = random_pairs(5, seed=7, vocab=vocab)
    kw = {"padding_free": {"padding_free": True}, "prefix_sharing": {"prefix_sharing": True}}.get(layout, {})

    def run(inside):
        t = ORPOTrainer(
            model=copy.deepcopy(model),
            args=ORPOConfig(**config(**kw)),
            train_dataset=pairs,
            processing_class=StubTokenizer(),
        )
        t.logits_in_forward = inside
        t.model.train()
        loss = t.compute_loss(t.model, t._prepare_inputs(t.data_collator(pairs)))
        loss.backward()
        logs = {"loss": loss.item()}
        t.log(logs)
        return loss.item(), logs, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}

    assert_same(run(True), run(False), METRICS + ["logits/chosen", "logits/rejected"])


def test_long_prompts_are_cut_to_half_of_max_length_by_default_and_trained():
    """A prompt that alone fills max_length is cut (keep_end, BOS first) and the pair trains, instead of dropped."""
    pairs = random_pairs(4, seed=8, vocab=97, empty_prompt_every=100)
    pairs[1]["prompt_input_ids"] = [1] + list(range(3, 60))
    args = ORPOConfig(**config(max_length=32, gradient_checkpointing=True))
    t = ORPOTrainer(
        model=build_model(97, hidden_size=32), args=args, train_dataset=pairs, processing_class=StubTokenizer()
    )
    stats = t.data_stats["train"]
    assert stats.kept == 4 and not stats.dropped and stats.truncated_prompts == 1
    assert t.train_dataset[1]["prompt_input_ids"] == [1] + list(range(45, 60))  # 16 = 32 // 2 tokens
    t.model.train()
    loss = t.compute_loss(t.model, t._prepare_inputs(t.data_collator([t.train_dataset[1]])))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(truncation_mode="middle"), "truncation_mode must be one of"),
        (dict(max_length=64, max_prompt_length=64), r"max_prompt_length \(64\) must be < max_length \(64\)"),
        (dict(max_prompt_length=0), "max_prompt_length must be >= 1"),
    ],
)
def test_prompt_truncation_options_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        ORPOConfig(**config(**kw))


def test_packing_says_how_many_pairs_make_an_optimizer_step(caplog):
    # 12 pairs of 10 tokens each (prompt counted twice without prefix sharing) in budgets of 40: 3 micro-batches of 4
    pairs = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8, 9 + i], "rejected_input_ids": [10, 11, 30 + i]}
        for i in range(12)
    ]
    args = ORPOConfig(
        **config(packing=True, packing_max_tokens=40, prefix_sharing=False, max_steps=6, per_device_train_batch_size=4)
    )
    t = ORPOTrainer(
        model=build_model(97, hidden_size=32), args=args, train_dataset=pairs, processing_class=StubTokenizer()
    )
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        t.get_train_dataloader()
    said = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("packing:")
    ]
    assert said == [
        "packing: 12 pairs in micro-batches of up to 40 tokens (packing_max_tokens; per_device_train_batch_size does "
        "not count pairs here), 4.0 pairs per micro-batch on average: about 4 pairs per optimizer step, 3 optimizer "
        "steps per epoch; max_steps=6 is 2.0 epochs"
    ]
