"""The demo's own preference data: deterministic, split by question, and decided by the checker."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from orpo_plugin.demo import instructions as ins


def test_split_is_deterministic_and_seeded():
    a_train, a_held = ins.make_split(seed=0)
    b_train, b_held = ins.make_split(seed=0)
    c_train, _ = ins.make_split(seed=1)
    assert [i.row() for i in a_train] == [i.row() for i in b_train]
    assert [i.row() for i in a_held] == [i.row() for i in b_held]
    assert [i.prompt for i in a_train] != [i.prompt for i in c_train]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_held_out_questions_never_appear_in_training(seed):
    train, held = ins.make_split(seed=seed)
    assert len(train) == 336 and len(held) == 70
    assert not {i.question for i in train} & {i.question for i in held}
    train_texts = " ".join(i.prompt for i in train)
    for item in held:
        assert item.question.text not in train_texts
    assert len({i.prompt for i in train}) == len(train) and len({i.prompt for i in held}) == len(held)


def test_every_kind_in_both_splits_evenly():
    train, held = ins.make_split(seed=0)
    for items in (train, held):
        counts = Counter(i.kind for i in items)
        assert set(counts) == set(ins.KINDS)
        assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("seed", [0, 3])
def test_checker_prefers_chosen_for_every_pair(seed):
    train, held = ins.make_split(seed=seed)
    for item in train + held:
        assert ins.check(item.kind, item.chosen), (item.kind, item.chosen)
        assert not ins.check(item.kind, item.rejected), (item.kind, item.rejected)
        assert ins.mentions_answer(item.chosen, item.question.answer)
        assert ins.mentions_answer(item.rejected, item.question.answer)
        assert item.rejected == item.question.sentence


def test_rows_are_conversational():
    train, _ = ins.make_split(train=7, held_out=7)
    row = train[0].row()
    assert row["prompt"] == [{"role": "user", "content": train[0].prompt}]
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"


@pytest.mark.parametrize(
    "kind, reply, ok",
    [
        ("uppercase", "THE CAPITAL OF JAPAN IS TOKYO.", True),
        ("uppercase", "The capital of Japan is TOKYO.", False),
        ("uppercase", "42", False),  # no letters: nothing was written in capitals
        ("lowercase", "the opposite of hot is cold.", True),
        ("lowercase", "The opposite of hot is cold.", False),
        ("one word", "Tokyo.", True),
        ("one word", "  cold  ", True),
        ("one word", "The capital is Tokyo.", False),
        ("one word", "", False),
        ("number only", "42", True),
        ("number only", "42.", True),
        ("number only", "1,000", True),
        ("number only", "-3", True),
        ("number only", "The answer is 42.", False),
        ("number only", "17 + 25 = 42", False),
        ("json", '{"answer": "Madrid"}', True),
        ("json", ' {"answer": 25} ', True),
        ("json", '{"answer": "Madrid", "country": "Spain"}', False),
        ("json", 'The answer is {"answer": "Madrid"}', False),
        ("json", '```json\n{"answer": "Madrid"}\n```', False),
        ("json", '["answer"]', False),
        ("answer prefix", "Answer: Madrid.", True),
        ("answer prefix", "Answer:", False),
        ("answer prefix", "The answer: Madrid.", False),
        ("ends with question", "It is cold. Anything else?", True),
        ("ends with question", "Is it cold? It is.", False),
    ],
)
def test_checker_cases(kind, reply, ok):
    assert ins.check(kind, reply) is ok


def test_checker_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown instruction kind"):
        ins.check("haiku", "x")


def test_mentions_answer_whole_words_only():
    assert ins.mentions_answer('{"answer": 12}', "12")
    assert not ins.mentions_answer("The answer is 120.", "12")
    assert ins.mentions_answer("THE CAPITAL IS PARIS.", "Paris")
    assert not ins.mentions_answer("Parisian food", "Paris")


def test_json_chosen_keeps_numbers_as_numbers():
    train, held = ins.make_split(seed=0)
    for item in train + held:
        if item.kind == "json":
            value = json.loads(item.chosen)["answer"]
            assert isinstance(value, int) is item.question.numeric


def test_too_many_prompts_is_an_error():
    with pytest.raises(ValueError, match="distinct prompts"):
        ins.make_split(train=10, held_out=100_000)
