"""Dataset rows -> tokenized pairs: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (responses only).

Accepted rows (one format per dataset is typical, but each row is read on its own):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a message list, `chosen`/`rejected` message lists (rendered by the chat template);
- implicit prompt: only `chosen`/`rejected` (strings or message lists); their shared prefix is the prompt;
- Axolotl argilla rows: `chosen`/`rejected` = [user, assistant] message lists, optional `system` string.

Bad rows raise a ValueError/TypeError naming the row and the field. Rows that are valid but unusable (chosen
identical to rejected, a prompt that alone fills `max_length`) are dropped, counted and logged.

Pairs longer than `max_length` are fitted as TRL's DPO did: a prompt longer than `max_prompt_length` is cut first
(`truncation_mode` "keep_end" keeps its latest tokens, BOS staying first; "keep_start" its first ones), then the
responses. Without `max_prompt_length` the result is TRL ORPO's (responses cut) except for a prompt that alone fills
`max_length`: it is cut to half of `max_length` instead of leaving nothing to score. Encoder-decoder pairs keep the
prompt as encoder input and the responses as decoder labels (TRL's tokenization: the tokenizer's own special tokens,
responses cut to `max_completion_length`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rendered import PieceCheck, check_rendered_pieces

logger = logging.getLogger("orpo_plugin")

COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
DROP_IDENTICAL = "chosen identical to rejected"
DROP_LONG_PROMPT = "prompt alone fills max_length"
DROP_TOO_LONG = "pair longer than max_length (drop_long_pairs)"
DROP_IDENTICAL_TRUNCATED = "chosen identical to rejected after truncation"
DROP_UNSCORED = "a response with no scored token (empty prompt, no BOS)"
DROP_EMPTY_ENCODER_INPUT = "empty prompt (an encoder-decoder model needs encoder input)"
NO_ROWS = "the dataset has no rows"
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class PrepareStats:
    """What preparing a dataset did: rows kept, rows dropped by reason, responses truncated."""

    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated_responses: int = 0
    truncated_prompts: int = 0
    mostly_cut: int = 0  # kept pairs with a response that lost more than half of its tokens
    full_lengths: list = field(default_factory=list, repr=False)  # kept pairs' prompt + longer response, uncut

    def mostly_cut_warning(self, name: str, limits: str, share: float = 0.1) -> str | None:
        """A warning when more than `share` of the kept pairs lost more than half of a response, else None."""
        if not self.kept or self.mostly_cut <= share * self.kept:
            return None
        lengths = sorted(self.full_lengths)
        length_note = (
            f"; before cutting, prompt + longer response was {lengths[len(lengths) // 2]} tokens (median), "
            f"{lengths[-1]} at most"
            if lengths
            else ""
        )
        return (
            f"{name} dataset: {self.mostly_cut} of {self.kept} pairs ({self.mostly_cut / self.kept:.0%}) lost more "
            f"than half of a response to {limits}{length_note}. The model is trained on those fragments; raise "
            "max_length (or set drop_long_pairs=True to leave such pairs out)"
        )

    first_dropped: dict = field(default_factory=dict)  # reason -> the index of the first row dropped for it

    def summary(self) -> str:
        def first(reason):
            return f", first row {self.first_dropped[reason]}" if reason in self.first_dropped else ""

        drops = ", ".join(f"{n} ({reason}{first(reason)})" for reason, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.kept}/{self.rows} pairs kept; dropped: {drops}; "
            f"prompts truncated: {self.truncated_prompts}; "
            f"responses truncated to max_length/max_completion_length: {self.truncated_responses}"
            + (f" ({self.mostly_cut} pairs lost more than half of a response)" if self.mostly_cut else "")
        )


# ----------------------------------------------------------------------------------------------- validation
def _check_text(value: Any, row: int, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"row {row}: field '{name}' must be a string, got {type(value).__name__}")
    try:  # a lone surrogate (legal in JSON escapes) would fail later in arrow or the tokenizer, unnamed
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"row {row}: field '{name}' is not valid unicode text ({err.reason} at position {err.start})"
        ) from None
    if not allow_empty and not value.strip():
        raise ValueError(f"row {row}: field '{name}' is empty")
    return value


PART_TYPES = ("text", "image")  # the typed content parts of TRL's vision format (images: vision.py)


def _check_parts(content: list, row: int, name: str) -> None:
    """A message content given as typed parts (TRL's vision format): text parts with their text, image parts."""
    for j, part in enumerate(content):
        where = f"{name}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"row {row}: field '{where}' is a {kind!r} part; the parts supported are {PART_TYPES}")
        if part["type"] == "text":
            _check_text(part.get("text"), row, f"{where}.text", allow_empty=True)


def _check_messages(value: Any, row: int, name: str, parts: bool = False) -> list[dict[str, Any]]:
    """The messages of a field, checked; with `parts` (a row with images) a content may be a list of typed parts."""
    if not isinstance(value, list) or not value:
        raise TypeError(f"row {row}: field '{name}' must be a non-empty list of messages, got {type(value).__name__}")
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise TypeError(f"row {row}: field '{name}[{k}]' must be a message dict, got {type(msg).__name__}")
        if "role" not in msg or "content" not in msg:
            raise ValueError(f"row {row}: field '{name}[{k}]' needs 'role' and 'content' keys, has {sorted(msg)}")
        _check_text(msg["role"], row, f"{name}[{k}].role")
        content = msg["content"]
        if parts and isinstance(content, list) and content:
            _check_parts(content, row, f"{name}[{k}]")
            continue
        if isinstance(content, list) and content and all(isinstance(p, dict) and "type" in p for p in content):
            kinds = sorted({str(p["type"]) for p in content})
            raise ValueError(
                f"row {row}: field '{name}[{k}].content' is a list of {', '.join(kinds)} parts (the vision format): "
                "rows with typed parts train with images, given as an 'images' column beside a vision model's "
                "processor (docs/vision.md); for a text-only model give each message's content as a string"
            )
        _check_text(content, row, f"{name}[{k}].content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict)


# ----------------------------------------------------------------------------------------------- rows -> text
def _common_prefix(a: list | str, b: list | str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def row_to_text(row: dict[str, Any], index: int, tokenizer, parts: bool = False) -> tuple[str, str, str]:
    """Render one row to (prompt, chosen, rejected) text, whatever its format; `parts`: message contents may be typed
    parts (a row with images, rendered by a processor's chat template)."""
    if not hasattr(row, "keys") or not hasattr(row, "get"):
        raise TypeError(f"row {index}: expected a mapping with 'chosen' and 'rejected', got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise ValueError(f"row {index}: missing field '{name}' (columns present: {sorted(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    conversational = _is_messages(chosen) or _is_messages(rejected) or _is_messages(prompt)

    if not conversational:
        chosen = _check_text(chosen, index, "chosen")
        rejected = _check_text(rejected, index, "rejected")
        if prompt is None:  # implicit prompt: the shared prefix, without the space before the answers
            n = _common_prefix(chosen, rejected)
            if n == min(len(chosen), len(rejected)):
                n = max(n - 1, 0)
            if n > 0 and chosen[n - 1] == " ":
                n -= 1
            return chosen[:n], chosen[n:], rejected[n:]
        return _check_text(prompt, index, "prompt", allow_empty=True), chosen, rejected

    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"row {index}: conversational data (message lists) needs a tokenizer with a chat template; "
            "set tokenizer.chat_template or pass plain-text rows"
        )
    chosen = _check_messages(chosen, index, "chosen", parts)
    rejected = _check_messages(rejected, index, "rejected", parts)
    if isinstance(prompt, str) and not prompt.strip():
        prompt = None
    if prompt is None or isinstance(prompt, str):
        n = _common_prefix(chosen, rejected)
        if n == min(len(chosen), len(rejected)):
            n = max(n - 1, 0)
        text_prompt = prompt
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if text_prompt is not None:
            prompt = _prompt_beside_messages(text_prompt, prompt, tokenizer, index)
        if not prompt:
            raise ValueError(f"row {index}: 'chosen' and 'rejected' share no leading messages to use as the prompt")
        for field, response in (("chosen", chosen), ("rejected", rejected)):
            if response[0]["role"] != "assistant":
                raise ValueError(
                    f"row {index}: field '{field}' goes on with a '{response[0]['role']}' message after the {n} "
                    "message(s) 'chosen' and 'rejected' share; what follows the prompt must be the assistant's answer "
                    "(do the two conversations' earlier turns differ?)"
                )
    else:
        prompt = _check_messages(prompt, index, "prompt", parts)
    system = row.get("system")
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": _check_text(system, index, "system")}] + prompt
    return _render_chat(prompt, chosen, rejected, tokenizer, index)


def _prompt_beside_messages(text: str, shared: list[dict], tokenizer, index: int) -> list[dict]:
    """The prompt of a row whose `prompt` is a string beside `chosen`/`rejected` message lists (TRL's mixed format).

    As in TRL the prompt is the messages both responses start with, and the string must say the same thing: the
    last shared message's content, all their contents, or their rendering. With no shared messages (responses that
    are assistant turns only) the string is the user's turn.
    """
    _check_text(text, index, "prompt")
    if not shared:
        return [{"role": "user", "content": text}]
    said = text.strip()
    contents = [m["content"] for m in shared]
    agreeing = {contents[-1].strip(), "\n".join(contents).strip(), " ".join(contents).strip()}
    try:
        agreeing.add(tokenizer.apply_chat_template(shared, tokenize=False, add_generation_prompt=True).strip())
    except Exception:  # noqa: BLE001 - a template that cannot render the prefix alone; the contents still count
        pass
    if said not in agreeing:
        raise ValueError(
            f"row {index}: field 'prompt' is the string {text[:60]!r} but 'chosen' and 'rejected' begin with the "
            f"messages {[m['role'] for m in shared]} ending {contents[-1][:60]!r}; give the prompt once (as messages "
            "in 'prompt', or only inside 'chosen'/'rejected')"
        )
    return shared


def _render_chat(prompt, chosen, rejected, tokenizer, index):
    last_role = prompt[-1]["role"]
    if last_role not in ("user", "tool", "assistant", "system"):
        raise ValueError(f"row {index}: field 'prompt' ends with role '{last_role}', expected user/tool/assistant")
    continuing = last_role == "assistant"
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=not continuing, continue_final_message=continuing
        )
        full = [tokenizer.apply_chat_template(prompt + r, tokenize=False) for r in (chosen, rejected)]
    except Exception as err:  # noqa: BLE001 - jinja2's TemplateError and whatever a template raises: name the row
        roles = [m["role"] for m in prompt] + ["|"] + [m["role"] for m in chosen]
        raise ValueError(
            f"row {index}: the tokenizer's chat template refused the conversation (roles {roles}, '|' marks where "
            f"the prompt ends): {type(err).__name__}: {err}"
        ) from err
    # Some templates render the generation prompt differently from a finished turn: keep the common prefix.
    n = min(_common_prefix(prompt_text, full[0]), _common_prefix(prompt_text, full[1]))
    prompt_text = prompt_text[:n]
    return prompt_text, full[0][n:], full[1][n:]


# ----------------------------------------------------------------------------------------------- text -> ids
def truncate_prompt(ids: list[int], length: int, mode: str = "keep_end", bos: int | None = None) -> list[int]:
    """The prompt cut to `length` tokens: its latest ones ("keep_end", a leading BOS kept first) or its first ones."""
    if len(ids) <= length:
        return ids
    if mode == "keep_start":
        return ids[:length]
    if mode != "keep_end":
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    if bos is not None and ids[0] == bos and length >= 1:
        return [bos] + ids[len(ids) - (length - 1) :]
    return ids[len(ids) - length :]


def fit_pair(
    prompt_ids: list[int],
    responses: list[list[int]],
    max_length: int | None = None,
    max_completion_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    bos: int | None = None,
) -> dict[str, Any]:
    """Fit one pair within `max_length`: a long prompt is cut to `max_prompt_length` first, then the responses.

    The prompt is cut only when prompt + the longer response exceed `max_length` (as TRL's DPO did). Without a
    `max_prompt_length`, only a prompt that alone fills `max_length` is cut (to half of it).
    Returns the three id lists, `truncated` (responses cut), `prompt_truncated` and `drop` (a reason, or "").
    """
    out = {"truncated": 0, "prompt_truncated": 0, "drop": "", "mostly_cut": 0}
    out["full_length"] = len(prompt_ids) + max(len(r) for r in responses)
    keep = None
    if max_length is not None:
        if max_prompt_length is None:
            # default: every pair TRL trains comes out as in TRL (responses cut); a prompt that alone fills
            # max_length, which would leave nothing to score, is cut to half of it instead of being dropped
            keep = max(max_length // 2, 1) if len(prompt_ids) >= max_length else None
        elif len(prompt_ids) > max_prompt_length and len(prompt_ids) + max(len(r) for r in responses) > max_length:
            keep = max_prompt_length
    if keep is not None:
        prompt_ids = truncate_prompt(prompt_ids, keep, truncation_mode, bos)
        out["prompt_truncated"] = 1
    out["prompt_input_ids"] = prompt_ids
    if responses[0] == responses[1]:
        out["drop"] = DROP_IDENTICAL
    limit = None
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            out["drop"] = out["drop"] or DROP_LONG_PROMPT
        limit = max_length - len(prompt_ids)
    if max_completion_length is not None:
        limit = max_completion_length if limit is None else min(limit, max_completion_length)
    for name, resp in zip(("chosen_input_ids", "rejected_input_ids"), responses):
        if limit is not None and len(resp) > limit:
            out["mostly_cut"] |= 2 * max(limit, 0) < len(resp)
            resp = resp[: max(limit, 0)]
            out["truncated"] += 1
        out[name] = resp
    return out


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {i for i, token in decoder.items() if getattr(token, "special", False)}


def end_of_turn_ids(tokenizer, renderer=None) -> frozenset[int]:
    """Token ids that end a turn: the tokenizer's EOS and the special tokens its chat template writes after an
    assistant message (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>` ...).

    Read off the template's own rendering of a short conversation (the template of `renderer`, a processor, when
    given); empty for a tokenizer with neither.
    """
    ends = {tokenizer.eos_token_id} - {None}
    renderer = tokenizer if renderer is None else renderer
    if getattr(renderer, "chat_template", None) is None:
        return frozenset(ends)
    marker = "Orpo0Probe0Reply"
    try:
        text = renderer.apply_chat_template(
            [{"role": "user", "content": "Orpo0Probe0Ask"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception as err:  # noqa: BLE001 - a template that refuses the probe: only EOS is known to end a turn
        _warn_once(renderer, f"the chat template refused a [user, assistant] probe ({type(err).__name__}: {err})")
        return frozenset(ends)
    if marker not in text:
        _warn_once(renderer, "the chat template did not render the probe's assistant message")
        return frozenset(ends)
    after = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
    return frozenset(ends | (set(after) & _special_ids(tokenizer)))


_WARNED_TEMPLATES: set[str] = set()


def _warn_once(renderer, why: str) -> None:
    if renderer.chat_template not in _WARNED_TEMPLATES:
        _WARNED_TEMPLATES.add(renderer.chat_template)
        logger.warning(
            "%s: its end-of-turn token is unknown, so EOS is appended after every response that does not already end "
            "with EOS (as TRL does), also after the template's own end of turn if it has one",
            why,
        )


def _ends_turn(ids: list[int], ends: frozenset[int], tokenizer) -> bool:
    """Whether `ids` end with an end-of-turn token, possibly followed by whitespace (ChatML's `<|im_end|>\\n`)."""
    for i in reversed(ids):
        if i in ends:
            return True
        if tokenizer.decode([i]).strip():
            return False
    return False


def tokenize_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer,
    max_length: int | None = None,
    max_completion_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    end_of_turn: frozenset[int] | None = None,
) -> dict[str, Any]:
    """Token ids of one pair: a shared prompt (one BOS first) and two responses, truncated by `fit_pair`.

    `prompt + response` is tokenized as one text (no special tokens added) and split where both responses'
    tokens part from each other and from the prompt's own tokens, so `prompt_input_ids + chosen_input_ids` is
    the tokenization of the whole text (for a chat row: exactly what the template renders), with:
    - BOS prepended when the tokenizer has one and the text does not already start with it (exactly one BOS);
    - EOS appended to a response unless it already ends a turn: its last token, trailing whitespace aside, is EOS
      or the chat template's end-of-turn token (`end_of_turn_ids`; computed here when not given). Plain text without
      such a token gets EOS, as in TRL; a rendered turn (`...<|im_end|>\\n`) is not given a second one.
    Returns the three id lists plus `truncated`, `prompt_truncated` and `drop` (a reason, or "").
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = [tokenizer(prompt + r, add_special_tokens=False)["input_ids"] for r in (chosen, rejected)]
    shared = min(_common_prefix(prompt_ids, f) for f in full)
    prompt_ids = full[0][:shared]
    responses = [f[shared:] for f in full]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos] + prompt_ids
    if eos is not None:
        ends = end_of_turn_ids(tokenizer) if end_of_turn is None else end_of_turn
        responses = [r if _ends_turn(r, ends, tokenizer) else r + [eos] for r in responses]
    return fit_pair(prompt_ids, responses, max_length, max_completion_length, max_prompt_length, truncation_mode, bos)


def tokenize_seq2seq_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer,
    max_completion_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> dict[str, Any]:
    """Encoder-decoder pair as TRL tokenizes it: prompt (encoder input) and responses each with the tokenizer's
    special tokens, responses cut to `max_completion_length`; the prompt cut to `max_prompt_length` if given."""
    out = {"truncated": 0, "prompt_truncated": 0, "drop": ""}
    for name, text in (("chosen_input_ids", chosen), ("rejected_input_ids", rejected)):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if max_completion_length is not None and len(ids) > max_completion_length:
            ids = tokenizer(text, truncation=True, max_length=max_completion_length, add_special_tokens=True)[
                "input_ids"
            ]
            out["truncated"] += 1
        out[name] = ids
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        side = getattr(tokenizer, "truncation_side", "right")
        tokenizer.truncation_side = "left" if truncation_mode == "keep_end" else "right"
        try:  # the tokenizer's own truncation keeps its special tokens (e.g. a final </s>) in place
            prompt_ids = tokenizer(prompt, truncation=True, max_length=max_prompt_length, add_special_tokens=True)[
                "input_ids"
            ]
        finally:
            tokenizer.truncation_side = side
        out["prompt_truncated"] = 1
    out["prompt_input_ids"] = prompt_ids
    if out["chosen_input_ids"] == out["rejected_input_ids"]:
        out["drop"] = DROP_IDENTICAL
    return out


def _final_checks(out: dict, encoder_decoder: bool = False) -> dict:
    """Drop reasons that only show after truncation: identical responses, a response with nothing to score."""
    if out["drop"]:
        return out
    chosen, rejected = out["chosen_input_ids"], out["rejected_input_ids"]
    if chosen == rejected:
        out["drop"] = DROP_IDENTICAL_TRUNCATED
    elif encoder_decoder:
        if not out["prompt_input_ids"]:
            out["drop"] = DROP_EMPTY_ENCODER_INPUT
    elif not out["prompt_input_ids"] and min(len(chosen), len(rejected)) < 2:
        # without a prompt token the first response token is never predicted
        out["drop"] = DROP_UNSCORED
    return out


def prepare_dataset(
    dataset,
    tokenizer,
    max_length: int | None = None,
    max_completion_length: int | None = None,
    drop_long_pairs: bool = False,
    num_proc: int | None = None,
    name: str = "train",
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    encoder_decoder: bool = False,
):
    """Validate, render and tokenize a preference dataset; drop and count unusable pairs. Returns (dataset, stats).

    Already-tokenized datasets (with the three id columns) are only checked, truncated and dropped like text rows.
    Pairs longer than `max_length` are fitted by `fit_pair`: with `max_prompt_length=None` (the config's default)
    only responses are cut, except a prompt that alone fills `max_length`, which is cut to half of it; with a value,
    a long prompt is cut to it first. With `encoder_decoder` the prompt is the encoder input, `max_length` does not
    apply and `max_prompt_length` limits the encoder input (as in TRL).
    A bad row raises a ValueError/TypeError that starts with the dataset's name and the row, counted from 0
    ("train dataset, row 7 (0-based): field 'rejected' ...").
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    from datasets import Dataset, Features, Sequence, Value

    with _row_errors_named(name):
        if isinstance(dataset, list):
            if not dataset:
                raise ValueError(f"{name} dataset: no usable pairs left ({NO_ROWS})")
            _refuse_vision({k for row in dataset if isinstance(row, dict) for k in row}, name)
            dataset = _rows_to_dataset(dataset, tokenizer)
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"{name} dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} dataset: no usable pairs left ({NO_ROWS})")
        columns = set(dataset.column_names)
        _refuse_vision(columns, name)
        pretokenized = set(COLUMNS) <= columns
        if not pretokenized and not {"chosen", "rejected"} <= columns:
            raise ValueError(
                f"{name} dataset needs 'chosen' and 'rejected' columns (and optionally 'prompt'), "
                f"or pre-tokenized {list(COLUMNS)}; it has {sorted(columns)}"
            )
        bos = getattr(tokenizer, "bos_token_id", None)
        fit_length = None if encoder_decoder else max_length
        ends = None if pretokenized or encoder_decoder else end_of_turn_ids(tokenizer)
        pieces = None if encoder_decoder else PieceCheck(tokenizer)  # see rendered.py

        def convert(row, index):
            if pretokenized:
                ids = {k: list(row[k]) for k in COLUMNS}
                for k in ("chosen_input_ids", "rejected_input_ids"):
                    if not ids[k]:
                        raise ValueError(f"row {index}: field '{k}' is empty")
                # cut exactly as text rows are
                out = fit_pair(
                    ids["prompt_input_ids"],
                    [ids["chosen_input_ids"], ids["rejected_input_ids"]],
                    fit_length,
                    max_completion_length,
                    max_prompt_length,
                    truncation_mode,
                    bos,
                )
                if encoder_decoder and max_prompt_length is not None and fit_length is None:
                    if len(out["prompt_input_ids"]) > max_prompt_length:
                        out["prompt_input_ids"] = truncate_prompt(
                            out["prompt_input_ids"], max_prompt_length, truncation_mode, bos
                        )
                        out["prompt_truncated"] = 1
                texts = None
            else:
                prompt, chosen, rejected = row_to_text(dict(row), index, tokenizer)
                if chosen == rejected:
                    return {k: [] for k in COLUMNS} | {
                        "truncated": 0,
                        "prompt_truncated": 0,
                        "drop": DROP_IDENTICAL,
                        "mostly_cut": 0,
                        "full_length": 0,
                        "piece": "",
                    }
                texts = (chosen, rejected)
                if encoder_decoder:
                    out = tokenize_seq2seq_pair(
                        prompt, chosen, rejected, tokenizer, max_completion_length, max_prompt_length, truncation_mode
                    )
                else:
                    out = tokenize_pair(
                        prompt,
                        chosen,
                        rejected,
                        tokenizer,
                        max_length,
                        max_completion_length,
                        max_prompt_length,
                        truncation_mode,
                        ends,
                    )
            if drop_long_pairs and (out["truncated"] or out["prompt_truncated"]) and not out["drop"]:
                out["drop"] = DROP_TOO_LONG
            out.setdefault("mostly_cut", 0)
            out.setdefault("full_length", 0)
            out["piece"] = pieces(texts, (out["chosen_input_ids"], out["rejected_input_ids"])) if pieces else ""
            return _final_checks(out, encoder_decoder)

        keep = set(COLUMNS)
        # explicit types: a write batch made only of dropped pairs would otherwise type the id columns as null
        features = Features(
            {
                **{k: Sequence(Value("int64")) for k in COLUMNS},
                "truncated": Value("int64"),
                "prompt_truncated": Value("int64"),
                "mostly_cut": Value("int64"),
                "full_length": Value("int64"),
                "drop": Value("string"),
                "piece": Value("string"),
            }
        )
        tokenized = dataset.map(
            convert,
            with_indices=True,
            num_proc=num_proc,
            features=features,
            remove_columns=[c for c in dataset.column_names if c not in keep],
            desc=f"Tokenizing {name} pairs",
        )
        check_rendered_pieces(tokenized["piece"], name, getattr(tokenizer, "bos_token", None))
        stats = PrepareStats(rows=len(tokenized))
        drops = tokenized["drop"]
        stats.dropped = Counter(d for d in drops if d)
        for index, reason in enumerate(drops):
            if reason:
                stats.first_dropped.setdefault(reason, index)
        stats.truncated_responses = sum(t for t, d in zip(tokenized["truncated"], drops) if not d)
        stats.truncated_prompts = sum(t for t, d in zip(tokenized["prompt_truncated"], drops) if not d)
        stats.mostly_cut = sum(t for t, d in zip(tokenized["mostly_cut"], drops) if not d)
        stats.full_lengths = [n for n, d in zip(tokenized["full_length"], drops) if not d and n]
        tokenized = tokenized.filter(lambda d: not d, input_columns="drop", num_proc=num_proc)
        tokenized = tokenized.remove_columns(
            ["drop", "truncated", "prompt_truncated", "mostly_cut", "full_length", "piece"]
        )
        stats.kept = len(tokenized)
        if stats.dropped or stats.truncated_responses or stats.truncated_prompts:
            logger.warning("%s dataset: %s", name, stats.summary())
        limits = " and ".join(
            f"{k}={v}" for k, v in (("max_length", fit_length), ("max_completion_length", max_completion_length)) if v
        )
        warning = stats.mostly_cut_warning(name, limits or "max_completion_length")
        if warning:
            logger.warning(warning)
        if stats.kept == 0:
            raise ValueError(f"{name} dataset: no usable pairs left ({stats.summary()})")
        return tokenized, stats


# columns of vision preference rows (TRL's `images`, and the forms close to it): refused, see prepare_dataset
VISION_COLUMNS = ("images", "image", "pixel_values", "videos", "video")


def _refuse_vision(columns: set[str], name: str) -> None:
    vision = sorted(columns & set(VISION_COLUMNS))
    if vision:
        raise ValueError(
            f"{name} dataset has the column {vision[0]!r}: this path reads text only, and the images would never reach "
            "the model (a silent text-only run). ORPOTrainer trains pairs with images (an 'images' column) given a "
            f"vision-language model and its processor (docs/vision.md); to train on the text alone remove {vision[0]!r}"
        )


@contextmanager
def _row_errors_named(name: str):
    """A row's ValueError/TypeError ("row 7: field ...") gets the dataset's name and how rows are counted."""
    try:
        yield
    except (ValueError, TypeError) as err:
        message = str(err)
        if not message.startswith("row "):
            raise
        if "(0-based)" not in message.split(":", 1)[0]:
            message = message.replace(":", " (0-based):", 1)
        raise (TypeError if isinstance(err, TypeError) else ValueError)(f"{name} dataset, {message}") from None


_ROW_FIELDS = ("prompt", "chosen", "rejected", "system", *COLUMNS)


def _slim(row: Any) -> Any:
    """The fields (and message keys) row_to_text reads, so junk elsewhere cannot fail the whole dataset in arrow."""
    if not isinstance(row, dict):
        return row
    conversational = any(_is_messages(row.get(k)) for k in ("prompt", "chosen", "rejected"))

    def slim_value(value):
        if not _is_messages(value):
            return value
        return [{k: m[k] for k in ("role", "content") if k in m} if isinstance(m, dict) else m for m in value]

    return {k: slim_value(v) for k, v in row.items() if k in _ROW_FIELDS and (k != "system" or conversational)}


def _kind(value: Any) -> str | None:
    """The format of one field's value, as a user would name it; None for a value that fits any format."""
    if value is None or (isinstance(value, list) and not value):
        return None
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "message list" if isinstance(value[0], dict) else "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "mapping" if isinstance(value, dict) else type(value).__name__


def row_place(index: int, source: str | None = None, lines: list[int] | None = None) -> str:
    """How an error names a row: 'row 7 (0-based)', with the file and its line when the rows came from one."""
    where = f"row {index} (0-based)"
    if lines is not None:
        return f"{where}, line {lines[index]} of {source}"
    return f"{where} of {source}" if source else where


def check_row_formats(rows: list, source: str | None = None, lines: list[int] | None = None) -> None:
    """Every field holds one format in every row (a string, a message list ...), as a table needs.

    Raises a TypeError naming the first row that disagrees (0-based, with its line when `lines` is given), the
    field, and the earlier row it disagrees with; rows that are not mappings are left to the row checks.
    """
    first: dict[str, tuple[str, int]] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        for name, value in row.items():
            kind = _kind(value)
            if kind is None:
                continue
            seen_kind, seen_row = first.setdefault(name, (kind, index))
            if kind != seen_kind:
                raise TypeError(
                    f"{row_place(index, source, lines)}: field '{name}' is a {kind} but "
                    f"{row_place(seen_row, None if lines is None else source, lines)} has a {seen_kind}; "
                    "each column must hold one format in every row"
                )


def _rows_to_dataset(rows: list, tokenizer):
    """A list of dicts as a Dataset; a value arrow cannot store gets our row/field error instead of arrow's."""
    from datasets import Dataset

    rows = [_slim(row) for row in rows]
    for index, row in enumerate(rows):
        # a value no valid row has (a mapping, a number, a list that is not messages ...) may pass arrow and then
        # fail when read back: refuse it now
        plain = isinstance(row, dict) and all(
            v is None or isinstance(v, str) or _is_messages(v) for k, v in row.items() if k not in COLUMNS
        )
        if not plain:
            row_to_text(row, index, tokenizer)
    check_row_formats(rows)
    try:
        return dataset_from_rows(rows)
    except Exception as err:  # arrow's errors vary (ArrowInvalid, ArrowTypeError, OverflowError, ...)
        for index, row in enumerate(rows):  # now also the rows that lack a column
            if not all(k in row for k in COLUMNS):
                row_to_text(row, index, tokenizer)
        for index, row in enumerate(rows):
            for name, value in row.items():
                try:
                    Dataset.from_list([{name: value}])
                except Exception:
                    raise TypeError(
                        f"{row_place(index)}: field '{name}' holds a value arrow cannot store ({err})"
                    ) from None
        raise


def dataset_from_rows(rows: list[dict[str, Any]]):
    """A `datasets.Dataset` with a column for every key any row has; a row without a key holds None there.

    (`Dataset.from_list` keeps only the first row's keys: a `prompt` that only later rows have would be lost.)
    """
    from datasets import Dataset

    keys = list(dict.fromkeys(k for row in rows for k in row))
    return Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})


# ----------------------------------------------------------------------------------------------- files
def read_jsonl(path: str | Path, lines: list[int] | None = None) -> list[dict[str, Any]]:
    """Read a JSONL file; a malformed line raises a ValueError naming the file and the line number.

    When `lines` is a list, the (1-based) line number of each row is appended to it.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            if lines is not None:
                lines.append(lineno)
    return rows


def _file_rows(path: Path, split: str) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The rows of a .json/.jsonl file and, for JSON lines, the line each row is on."""
    lines: list[int] = []
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, lines), lines
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # JSON lines under a .json name
        lines = []
        return read_jsonl(path, lines), lines
    if isinstance(data, dict) and split in data:
        data = data[split]
    elif isinstance(data, dict):  # a single row (one JSON line under a .json name)
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ValueError(f"{path}: expected a JSON list of rows (or {{'{split}': [...]}})")
    return data, None


def _images_beside(row: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A row of a JSON file with its relative image paths (`images`, `image`) made relative to the file's folder."""

    def place(value):
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and "://" not in value:
            return str(folder / value)
        return value

    for key in ("images", "image"):
        value = row.get(key)
        if isinstance(value, list):
            row[key] = [place(v) for v in value]
        elif value is not None:
            row[key] = place(value)
    return row


_LOCAL_LOOKING = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


def load_preference_dataset(name_or_path: str, split: str = "train", config: str | None = None):
    """A hub dataset name, a local directory (saved or loadable by `datasets`), or a .json/.jsonl/.parquet file.

    The command line (`orpo-plugin train`, `orpo-plugin eval`) reads its data here; relative image paths in a JSON
    file's `images`/`image` are read from the file's folder. JSON rows are checked before
    they become a table: a field whose format differs between rows raises a TypeError naming the row (0-based), its
    line in the file and the field (the row checks of `prepare_dataset` follow, as for a list given to the trainer).
    A path that does not exist raises FileNotFoundError.
    """
    import datasets

    path = Path(name_or_path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows, lines = _file_rows(path, split)
            check_row_formats(rows, path.name, lines)
            return dataset_from_rows([_images_beside(row, path.parent) for row in rows])
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        raise ValueError(f"{path}: unsupported file type '{suffix}' (use .json, .jsonl or .parquet)")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        if (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))[split]
        return datasets.load_dataset(str(path), config, split=split)
    missing = f"{name_or_path}: no such file or directory (looked in {Path.cwd()})"
    hub_like = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) and not name_or_path.lower().endswith(_LOCAL_LOOKING)
    if not hub_like or name_or_path.startswith("."):
        raise FileNotFoundError(missing)
    try:
        return datasets.load_dataset(name_or_path, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, no access: say both readings of the name
        raise FileNotFoundError(
            f"{missing}; as a Hugging Face Hub dataset name it failed too ({type(err).__name__}: {err})"
        ) from err
