"""SmolLM2's real template: rendering the prompt and each response apart writes its default system turn into every
response (its BOS `<|im_start|>` opens every turn); that is refused naming the first row and the count, while
the documented formats tokenize without a word. Gemma 3's `<bos>` at the start of a response is a warning."""

from __future__ import annotations

import logging

import pytest
from helpers.messages import assistant, user  # tests/helpers

from orpo_plugin.data import prepare_dataset
from orpo_plugin.rendered import bos_opens_documents, turn_headers

QUESTIONS = [("What is 2+2?", "4", "5"), ("Capital of France?", "Paris", "Rome"), ("Sky colour?", "Blue", "Green")]


def test_smollm2_pieces_rendered_apart_are_refused(smollm2_tok):
    tok = smollm2_tok
    assert not bos_opens_documents(tok) and "<|im_start|>user\n" in turn_headers(tok)
    rows = [
        {
            "prompt": tok.apply_chat_template([user(q)], tokenize=False, add_generation_prompt=True),
            "chosen": tok.apply_chat_template([assistant(a)], tokenize=False),
            "rejected": tok.apply_chat_template([assistant(b)], tokenize=False),
        }
        for q, a, b in QUESTIONS
    ]
    assert rows[0]["chosen"].startswith("<|im_start|>system\nYou are a helpful AI assistant")  # what users get
    with pytest.raises(ValueError, match=r"3 row\(s\) .* turn header .*<\|im_start\|>system.*first row 0"):
        prepare_dataset(rows, tok)


def test_smollm2_documented_formats_pass_without_a_word(smollm2_tok, caplog):
    tok = smollm2_tok
    q, a, b = QUESTIONS[0]
    formats = [
        {"prompt": [user(q)], "chosen": [assistant(a)], "rejected": [assistant(b)]},
        {
            "prompt": tok.apply_chat_template([user(q)], tokenize=False, add_generation_prompt=True),
            "chosen": a + "<|im_end|>\n",
            "rejected": b + "<|im_end|>\n",
        },
    ]
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        for row in formats:
            dataset, _ = prepare_dataset([row], tok)
            assert dataset[0]["chosen_input_ids"][0] != tok.bos_token_id
    assert not [r for r in caplog.records if "begins with" in r.getMessage()]


def test_gemma3_response_starting_with_bos_warns(gemma3_tok, caplog):
    tok = gemma3_tok
    assert bos_opens_documents(tok)
    rows = [
        {"prompt": "Question: " + q + "\nAnswer:", "chosen": tok.bos_token + " " + a, "rejected": " " + b}
        for q, a, b in QUESTIONS
    ]
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        prepare_dataset(rows, tok)
    (message,) = [r.getMessage() for r in caplog.records if "begins with" in r.getMessage()]
    assert "3 row(s)" in message and "'<bos>'" in message and "first row 0" in message
