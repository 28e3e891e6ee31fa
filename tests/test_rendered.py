"""Responses that start with a piece of a chat rendering (a second BOS, a system or user turn) are reported once per
dataset with the count and the first row: an error for a turn header, a warning for BOS. The formats of
docs/data-formats.md pass without a word."""

from __future__ import annotations

import copy
import logging

import pytest
from helpers.messages import assistant, system, user  # tests/helpers

from orpo_plugin.data import prepare_dataset
from orpo_plugin.rendered import turn_headers

# The toy template with a document BOS first, as Llama-style templates write it.
BOS_TEMPLATE = "{{ bos_token }}" + (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _pieces(caplog):
    return [r.getMessage() for r in caplog.records if "begins with" in r.getMessage()]


def test_the_toy_templates_turn_headers(tiny_tokenizer):
    assert turn_headers(tiny_tokenizer) == ("<|system|>", "<|user|>")


def test_a_response_that_starts_with_a_user_turn_is_an_error_naming_the_first_row_and_the_count(tiny_tokenizer):
    good = {"prompt": "<|user|>hi<|end|><|assistant|>", "chosen": "yes<|end|>", "rejected": "no<|end|>"}
    bad = {"prompt": "hi", "chosen": " <|user|>hi<|end|><|assistant|>yes<|end|>", "rejected": "no"}
    with pytest.raises(ValueError, match=r"train dataset: 2 row\(s\) .* turn header .*'<\|user\|>'.*first row 1"):
        prepare_dataset([good, bad, good, bad], tiny_tokenizer)


def test_separately_rendered_pieces_with_a_bos_template_warn_once(tiny_tokenizer, caplog):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = BOS_TEMPLATE

    def rendered_apart(q, a, b):  # the pattern users report: each piece through the template on its own
        return {
            "prompt": tok.apply_chat_template([user(q)], tokenize=False, add_generation_prompt=True),
            "chosen": tok.apply_chat_template([assistant(a)], tokenize=False),
            "rejected": tok.apply_chat_template([assistant(b)], tokenize=False),
        }

    rows = [{"prompt": "Q: hi\nA:", "chosen": " yes", "rejected": " no"}]
    rows += [rendered_apart("hi", "yes", "no"), rendered_apart("sky?", "blue", "red")]
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        dataset, _ = prepare_dataset(rows, tok)
    (message,) = _pieces(caplog)
    assert "2 row(s)" in message and "BOS token '<s>'" in message and "first row 1" in message
    assert dataset[1]["chosen_input_ids"][0] == tok.bos_token_id  # trained as given (a warning, as TRL trains it)


def test_pretokenized_responses_starting_with_bos_warn(tiny_tokenizer, caplog):
    bos = tiny_tokenizer.bos_token_id
    rows = [{"prompt_input_ids": [bos, 20], "chosen_input_ids": [bos, 21], "rejected_input_ids": [22]}]
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        prepare_dataset(rows, tiny_tokenizer)
    (message,) = _pieces(caplog)
    assert "1 row(s)" in message and "first row 0" in message


def test_the_documented_formats_pass_without_a_word(tiny_tokenizer, caplog):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = BOS_TEMPLATE
    prompt = [system("be brief"), user("hi")]
    formats = [  # one dataset per format (a column holds one format)
        {"prompt": prompt, "chosen": [assistant("yes")], "rejected": [assistant("no")]},
        {"chosen": [*prompt, assistant("yes")], "rejected": [*prompt, assistant("no")]},
        {
            "prompt": tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
            "chosen": "yes<|end|>",
            "rejected": "no<|end|>",
        },
        {"prompt": "Q: hi\nA:", "chosen": " yes", "rejected": " no"},
    ]
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        for row in formats:
            dataset, _ = prepare_dataset([row], tok)
            assert len(dataset) == 1
    assert _pieces(caplog) == []
