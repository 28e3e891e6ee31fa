"""Test doubles shared by several test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations


class StubTokenizer:
    """Enough of a tokenizer for pre-tokenized rows (no text is ever tokenized)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1
    pad_token, eos_token = "<pad>", "</s>"
    chat_template = None

    def save_pretrained(self, *a, **k):
        return ()
