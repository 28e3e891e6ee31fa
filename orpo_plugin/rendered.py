"""Responses that carry pieces of a chat rendering they should not: a row whose prompt and responses were each
rendered with the chat template on their own gives responses that start with a second BOS, or with a whole system
or user turn (SmolLM2's template writes its default system turn into every rendering). TRL trains such rows as
they are; here they are reported once per dataset with the first row and a count (see docs/data-formats.md).

- a response starting with a rendered system/user turn header of the tokenizer's own chat template trains the model
  to open a new conversation where it should answer: an error (`check_rendered_pieces` raises);
- a response starting with BOS (a token that opens a document, not every turn) puts a second BOS mid-sequence:
  a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger("orpo_plugin")

BOS = "bos"
HEADER = "header"


def turn_headers(tokenizer) -> tuple[str, ...]:
    """The texts the chat template writes before a system or user message: at the start of a conversation (with
    its default system turn, if it writes one) and before a user turn that follows a system turn. Only headers that
    contain a special token of the tokenizer are returned (a plain-text header such as "User:" may start an answer).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ()
    system, user = "Orpo0Probe0System", "Orpo0Probe0User"

    def render(messages):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template without a system role, or stricter rules: fewer headers
            return None

    heads = set()
    both = render([{"role": "system", "content": system}, {"role": "user", "content": user}])
    alone = render([{"role": "system", "content": system}])
    if both and system in both and user in both:
        heads.add(both[: both.index(system)])
        between = both[both.index(system) + len(system) : both.index(user)]
        end = alone[alone.index(system) + len(system) :] if alone and system in alone else ""
        if end and between.startswith(end):
            heads.add(between[len(end) :])
    only_user = render([{"role": "user", "content": user}])
    if only_user and user in only_user:
        heads.add(only_user[: only_user.index(user)])
    bos_text = getattr(tokenizer, "bos_token", None) if bos_opens_documents(tokenizer) else None
    for head in list(heads):
        if bos_text and head.startswith(bos_text):
            heads.add(head[len(bos_text) :])
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    return tuple(sorted(h.lstrip() for h in heads if h.strip() and any(t in h for t in specials)))


def bos_opens_documents(tokenizer) -> bool:
    """Whether the BOS token opens a document only (Llama's `<s>`), not every turn (SmolLM2's BOS `<|im_start|>`)."""
    bos_text = getattr(tokenizer, "bos_token", None)
    if getattr(tokenizer, "bos_token_id", None) is None or not bos_text:
        return False
    if not getattr(tokenizer, "chat_template", None):
        return True
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            tokenize=False,
        )
    except Exception:  # noqa: BLE001
        return True
    return text.count(bos_text) <= 1


class PieceCheck:
    """Which rendered piece, if any, a row's responses start with ("" none, BOS or HEADER)."""

    def __init__(self, tokenizer):
        self.headers = turn_headers(tokenizer)
        self.bos = tokenizer.bos_token_id if bos_opens_documents(tokenizer) else None

    def __call__(self, responses_text: Sequence[str] | None, responses_ids: Sequence[Sequence[int]]) -> str:
        for text in responses_text or ():
            start = text.lstrip()
            for head in self.headers:
                if start.startswith(head):
                    return f"{HEADER}:{head}"
        if self.bos is not None and any(ids and ids[0] == self.bos for ids in responses_ids):
            return BOS
        return ""


def check_rendered_pieces(pieces: Sequence[str], name: str, bos_token: str | None) -> None:
    """Report the rows whose responses start with a rendered piece: once, with the count and the first row."""
    headers = [(i, p) for i, p in enumerate(pieces) if p.startswith(HEADER)]
    if headers:
        first, piece = headers[0]
        raise ValueError(
            f"{name} dataset: {len(headers)} row(s) have a response that begins with a rendered turn header of the "
            f"chat template ({piece.split(':', 1)[1][:80]!r}), first row {first}: the model would be trained to "
            "open a new conversation where it should answer. The prompt and each response were probably rendered "
            "with the chat template separately: pass message lists (the template is applied once, to the whole "
            "conversation), or render the prompt with add_generation_prompt=True and give each response as its "
            "text alone (see docs/data-formats.md)"
        )
    bos_rows = [i for i, p in enumerate(pieces) if p == BOS]
    if bos_rows:
        logger.warning(
            "%s dataset: %d row(s) have a response that begins with the BOS token %r, first row %d: every such pair "
            "is trained with a second BOS in the middle of the sequence. Give responses without it (a response "
            "rendered on its own, or tokenized with add_special_tokens=True, has one; see docs/data-formats.md)",
            name,
            len(bos_rows),
            bos_token,
            bos_rows[0],
        )
