"""`generation.generate`, the one generation loop (evaluation's samples, the demo's answers, generation during eval):
batching with left padding changes nothing, sampling is seeded and leaves the caller's random state alone, and every
completion ends at its first stop token. (Generation during evaluation: tests/test_trainer_eval.py; stopping at a
chat template's end of turn: tests/test_chat_templates.py and tests/test_evaluation.py.)"""

from __future__ import annotations

import torch

from orpo_plugin.generation import decode_completions, generate, stop_token_ids


def test_batched_left_padding_matches_one_by_one(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=3)
    prompts = [tiny_tokenizer("What color is the sky?")["input_ids"], tiny_tokenizer("Be brief.")["input_ids"]]
    together = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=8)
    alone = [generate(model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=8)[0] for p in prompts]
    assert together == alone
    assert [len(group) for group in together] == [1, 1]  # greedy: one completion per prompt
    assert all(1 <= len(c) <= 6 for group in together for c in group)


def test_sampling_is_seeded_and_leaves_the_callers_random_state(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=3)
    prompts = [tiny_tokenizer("What color is the sky?")["input_ids"], tiny_tokenizer("Be brief.")["input_ids"]]
    sampled = generate(model, tiny_tokenizer, prompts, 6, batch_size=8, num_samples=3, seed=0)
    assert [len(s) for s in sampled] == [3, 3]
    assert sampled == generate(model, tiny_tokenizer, prompts, 6, batch_size=8, num_samples=3, seed=0)
    torch.manual_seed(5)
    untouched = torch.rand(4)
    torch.manual_seed(5)
    generate(model, tiny_tokenizer, prompts, 6, batch_size=8, num_samples=3, seed=0)
    assert torch.equal(torch.rand(4), untouched), "sampling must leave the caller's random state as it was"
    model.train()
    generate(model, tiny_tokenizer, prompts, 2)
    assert model.training, "the model's training mode is restored"


def test_completions_end_at_their_first_stop_token(tiny_tokenizer, tiny_model_factory):
    """Make a token of a greedy completion the model's configured EOS: the completion now ends there, keeping it."""
    model = tiny_model_factory(seed=3)
    prompts = [tiny_tokenizer("What color is the sky?")["input_ids"]]
    (free,) = generate(model, tiny_tokenizer, prompts, 8)[0]
    assert not set(free[:-1]) & set(stop_token_ids(model, tiny_tokenizer))
    stop = free[2]
    model.generation_config.eos_token_id = stop
    assert stop in stop_token_ids(model, tiny_tokenizer)
    (cut,) = generate(model, tiny_tokenizer, prompts, 8)[0]
    assert cut == free[: free.index(stop) + 1]


def test_decode_removes_special_tokens():
    from orpo_plugin.toy import build_tokenizer

    tok = build_tokenizer(["Blue. Green."], vocab_size=300)
    ids = tok(" Blue. ")["input_ids"] + [tok.eos_token_id]
    assert decode_completions(tok, [[ids, [tok.eos_token_id]]]) == [[" Blue. ", ""]]
    assert decode_completions(tok, [[ids]], strip=True) == [["Blue."]]
