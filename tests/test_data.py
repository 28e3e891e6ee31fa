"""Rows -> tokenized pairs for every accepted format; truncation and dropping; errors that name the row and field."""

from __future__ import annotations

import json
import logging
import re

import datasets
import pytest
from helpers.messages import assistant, system, user  # tests/helpers

from orpo_plugin import data
from orpo_plugin.data import (
    DROP_IDENTICAL,
    DROP_LONG_PROMPT,
    DROP_TOO_LONG,
    load_preference_dataset,
    prepare_dataset,
    read_jsonl,
    row_to_text,
)

SKY = "What color is the sky?"
FIRE = "Q: Is fire hot?"


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_pair(tok, prompt_text, chosen_text, rejected_text, eos=True):
    """BOS + the prompt's tokens; each response's tokens, + EOS for plain text (a chat turn ends with the template's
    end-of-turn token instead); for texts whose boundary no BPE merge crosses."""
    for response in (chosen_text, rejected_text):
        assert enc(tok, prompt_text + response) == enc(tok, prompt_text) + enc(tok, response), "test precondition"
    end = [tok.eos_token_id] if eos else []
    return {
        "prompt_input_ids": [tok.bos_token_id] + enc(tok, prompt_text),
        "chosen_input_ids": enc(tok, chosen_text) + end,
        "rejected_input_ids": enc(tok, rejected_text) + end,
    }


def assert_pair(tok, got, prompt_text, chosen_text, rejected_text, eos=True):
    want = expected_pair(tok, prompt_text, chosen_text, rejected_text, eos)
    assert {k: list(got[k]) for k in data.COLUMNS} == want
    assert got["prompt_input_ids"][0] == tok.bos_token_id
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        ids = got["prompt_input_ids"] + got[f"{name}_input_ids"]
        assert ids.count(tok.eos_token_id) == int(eos) and ids.count(tok.bos_token_id) == 1
        # Decoding prompt + response gives back the rendered text, after BOS (and before EOS for plain text).
        assert tok.decode(ids) == tok.bos_token + prompt_text + text + (tok.eos_token if eos else "")


def chat_prompt(*messages):
    """The toy template's rendering of `messages` followed by the generation prompt."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


# ----------------------------------------------------------------------------------------------- formats
def test_standard_strings(tiny_tokenizer):
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": FIRE, "chosen": " Yes.", "rejected": " No."},
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert set(ds.column_names) == set(data.COLUMNS)
    assert (stats.rows, stats.kept, stats.truncated_responses, sum(stats.dropped.values())) == (2, 2, 0, 0)
    assert_pair(tiny_tokenizer, ds[0], SKY, " Blue.", " Green.")
    assert_pair(tiny_tokenizer, ds[1], FIRE, " Yes.", " No.")


def test_standard_strings_with_a_merge_across_the_boundary(tiny_tokenizer):
    # "sk" + "y?" tokenizes as "sky" + "?": the shared prompt is shortened so prompt + response keeps the
    # tokenization of the whole text.
    prompt, chosen, rejected = "What color is the sk", "y? Blue.", "y? Green."
    assert enc(tiny_tokenizer, prompt + chosen)[: len(enc(tiny_tokenizer, prompt))] != enc(tiny_tokenizer, prompt)
    ds, _ = prepare_dataset([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tiny_tokenizer)
    row = ds[0]
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        whole = [bos] + enc(tiny_tokenizer, prompt + response) + [eos]
        assert row["prompt_input_ids"] + row[f"{name}_input_ids"] == whole
    assert tiny_tokenizer.decode(row["prompt_input_ids"], skip_special_tokens=True) == "What color is the"


def test_conversational(tiny_tokenizer):
    rows = [
        {"prompt": [user(SKY)], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
        {
            "prompt": [system("Be brief."), user(FIRE)],
            "chosen": [assistant("Yes.")],
            "rejected": [assistant("No.")],
        },
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert stats.kept == 2
    assert_pair(tiny_tokenizer, ds[0], chat_prompt(user(SKY)), "Blue.<|end|>", "Green.<|end|>", eos=False)
    assert_pair(
        tiny_tokenizer, ds[1], chat_prompt(system("Be brief."), user(FIRE)), "Yes.<|end|>", "No.<|end|>", eos=False
    )


def test_implicit_prompt_strings(tiny_tokenizer):
    rows = [
        {"chosen": f"{FIRE} Yes.", "rejected": f"{FIRE} No."},
        {"chosen": f"{SKY} Blue.", "rejected": f"{SKY} Green."},
    ]
    # The shared prefix is the prompt, without the space before the answers.
    assert row_to_text(rows[0], 0, tiny_tokenizer) == (FIRE, " Yes.", " No.")
    ds, _ = prepare_dataset(rows, tiny_tokenizer)
    assert_pair(tiny_tokenizer, ds[0], FIRE, " Yes.", " No.")
    assert_pair(tiny_tokenizer, ds[1], SKY, " Blue.", " Green.")


def test_implicit_prompt_messages(tiny_tokenizer):
    rows = [
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
        {
            "chosen": [system("Be brief."), user(FIRE), assistant("Yes.")],
            "rejected": [system("Be brief."), user(FIRE), assistant("No.")],
        },
    ]
    ds, _ = prepare_dataset(rows, tiny_tokenizer)
    assert_pair(tiny_tokenizer, ds[0], chat_prompt(user(SKY)), "Blue.<|end|>", "Green.<|end|>", eos=False)
    assert_pair(
        tiny_tokenizer, ds[1], chat_prompt(system("Be brief."), user(FIRE)), "Yes.<|end|>", "No.<|end|>", eos=False
    )


def test_axolotl_argilla_rows(tiny_tokenizer):
    rows = [
        {
            "system": "Be brief.",
            "chosen": [user(SKY), assistant("Blue.")],
            "rejected": [user(SKY), assistant("Green.")],
        },
        {"system": None, "chosen": [user(FIRE), assistant("Yes.")], "rejected": [user(FIRE), assistant("No.")]},
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert stats.kept == 2
    assert_pair(
        tiny_tokenizer, ds[0], chat_prompt(system("Be brief."), user(SKY)), "Blue.<|end|>", "Green.<|end|>", eos=False
    )
    assert_pair(tiny_tokenizer, ds[1], chat_prompt(user(FIRE)), "Yes.<|end|>", "No.<|end|>", eos=False)


def test_argilla_without_system_column(tiny_tokenizer):
    rows = [{"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]}]
    ds, _ = prepare_dataset(datasets.Dataset.from_list(rows), tiny_tokenizer)
    assert_pair(tiny_tokenizer, ds[0], chat_prompt(user(SKY)), "Blue.<|end|>", "Green.<|end|>", eos=False)


def test_pretokenized_rows_pass_through(tiny_tokenizer):
    rows = [
        {"prompt_input_ids": [1, 10, 11], "chosen_input_ids": [12, 2], "rejected_input_ids": [13, 2]},
        {"prompt_input_ids": [1, 10], "chosen_input_ids": [12, 2], "rejected_input_ids": [12, 2]},
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert ds.to_list() == rows[:1]
    assert stats.dropped == {DROP_IDENTICAL: 1}


# ----------------------------------------------------------------------------------------------- truncation
LONG = " one two three four five six seven eight nine ten."


def test_long_responses_truncated_to_max_length(tiny_tokenizer):
    rows = [
        {"prompt": SKY, "chosen": LONG, "rejected": " Green."},  # one response truncated
        {"prompt": SKY, "chosen": LONG, "rejected": " Green" + LONG},  # both truncated, still different
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},  # none
    ]
    prompt_len = 1 + len(enc(tiny_tokenizer, SKY))
    short = len(enc(tiny_tokenizer, " Green.")) + 1
    max_length = prompt_len + short + 1
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=max_length)
    assert stats.kept == 3 and stats.truncated_responses == 3
    limit = max_length - prompt_len
    full_long = enc(tiny_tokenizer, LONG) + [tiny_tokenizer.eos_token_id]
    assert ds[0]["chosen_input_ids"] == full_long[:limit]
    assert ds[0]["rejected_input_ids"] == enc(tiny_tokenizer, " Green.") + [tiny_tokenizer.eos_token_id]
    assert ds[1]["chosen_input_ids"] == full_long[:limit]
    assert len(ds[1]["rejected_input_ids"]) == limit
    for row in ds:
        longest = max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
        assert len(row["prompt_input_ids"]) + longest <= max_length
    assert "truncated" in stats.summary()


def test_max_completion_length(tiny_tokenizer):
    rows = [{"prompt": SKY, "chosen": LONG, "rejected": " Green."}]
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_completion_length=3)
    assert ds[0]["chosen_input_ids"] == enc(tiny_tokenizer, LONG)[:3]
    assert len(ds[0]["rejected_input_ids"]) <= 3
    assert stats.truncated_responses == 1 + (len(enc(tiny_tokenizer, " Green.")) + 1 > 3)
    # Both limits: the tighter wins.
    ds, _ = prepare_dataset(rows, tiny_tokenizer, max_length=1000, max_completion_length=4)
    assert len(ds[0]["chosen_input_ids"]) == 4
    prompt_len = 1 + len(enc(tiny_tokenizer, SKY))
    ds, _ = prepare_dataset(rows, tiny_tokenizer, max_length=prompt_len + 2, max_completion_length=4)
    assert len(ds[0]["chosen_input_ids"]) == 2


def test_drop_long_pairs(tiny_tokenizer):
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": LONG, "rejected": " Green."},
    ]
    prompt_len = 1 + len(enc(tiny_tokenizer, SKY))
    room = 1 + max(len(enc(tiny_tokenizer, " Blue.")), len(enc(tiny_tokenizer, " Green.")))
    assert len(enc(tiny_tokenizer, LONG)) + 1 > room
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=prompt_len + room, drop_long_pairs=True)
    assert len(ds) == 1 and stats.kept == 1 and stats.rows == 2
    assert stats.dropped == {DROP_TOO_LONG: 1}
    assert_pair(tiny_tokenizer, ds[0], SKY, " Blue.", " Green.")


def test_dropped_long_pairs_are_not_also_counted_as_truncated(tiny_tokenizer):
    # A pair dropped by drop_long_pairs is not trained on, truncated or otherwise: the summary must not report
    # truncated responses that are in no kept pair.
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": LONG, "rejected": LONG + " one"},
    ]
    max_length = 1 + len(enc(tiny_tokenizer, SKY)) + len(enc(tiny_tokenizer, " Green.")) + 1
    _, stats = prepare_dataset(rows, tiny_tokenizer, max_length=max_length, drop_long_pairs=True)
    assert stats.dropped == {DROP_TOO_LONG: 1}
    assert stats.truncated_responses == 0


# ----------------------------------------------------------------------------------------------- drops
def test_chosen_identical_to_rejected_is_dropped_and_counted(tiny_tokenizer):
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Blue."},
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": FIRE, "chosen": " Yes.", "rejected": " Yes."},
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert len(ds) == 1 and stats.dropped == {DROP_IDENTICAL: 2}
    assert DROP_IDENTICAL in stats.summary()


def test_identical_messages_are_dropped_and_counted(tiny_tokenizer):
    rows = [
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Blue.")]},
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert len(ds) == 1 and stats.dropped == {DROP_IDENTICAL: 1}


def test_many_leading_identical_pairs_do_not_break_the_column_types(tiny_tokenizer):
    # A dropped pair's empty id lists must not fix the column type for the rest: `datasets` writes rows in
    # batches of 1000, and a first batch of only dropped pairs used to type the id columns as list<null>.
    same, differ = {"prompt": "Q", "chosen": " a", "rejected": " a"}, {"prompt": "Q", "chosen": " a", "rejected": " b"}
    rows = [same] * 1000 + [differ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer)
    assert len(ds) == 1 and stats.dropped == {DROP_IDENTICAL: 1000}


def test_prompt_alone_filling_max_length_is_cut_to_half_or_dropped_and_counted(tiny_tokenizer):
    """Default: a prompt that alone fills max_length keeps its latest max_length // 2 tokens (BOS first), where TRL
    would leave an empty response; drop_long_pairs drops it instead. Pairs TRL trains are cut as TRL cuts them."""
    long_prompt = "one two three four five six seven eight nine ten " * 3
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": long_prompt, "chosen": " Yes.", "rejected": " No."},
    ]
    max_length = 1 + len(enc(tiny_tokenizer, SKY + " Green.")) + 1  # the SKY pair fits whole
    prompt_ids = [tiny_tokenizer.bos_token_id] + enc(tiny_tokenizer, long_prompt)
    assert len(prompt_ids) >= max_length
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=max_length)
    assert len(ds) == 2 and stats.truncated_prompts == 1 and not stats.dropped
    kept = ds[1]["prompt_input_ids"]
    assert kept == [prompt_ids[0]] + prompt_ids[len(prompt_ids) - (max_length // 2 - 1) :]
    assert ds[0]["prompt_input_ids"] == [tiny_tokenizer.bos_token_id] + enc(tiny_tokenizer, SKY)  # untouched
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=max_length, drop_long_pairs=True)
    assert len(ds) == 1 and stats.dropped == {DROP_TOO_LONG: 1}
    # An explicit max_prompt_length that still leaves no room: the pair is dropped and counted.
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=max_length, max_prompt_length=max_length)
    assert len(ds) == 1 and stats.dropped == {DROP_LONG_PROMPT: 1}


def test_all_rows_dropped_is_an_error(tiny_tokenizer):
    rows = [{"prompt": SKY, "chosen": " Blue.", "rejected": " Blue."}] * 2
    with pytest.raises(ValueError, match=r"eval dataset: no usable pairs left .*2 \(chosen identical"):
        prepare_dataset(rows, tiny_tokenizer, name="eval")


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_column_dataset_level(tiny_tokenizer):
    rows = [{"prompt": SKY, "chosen": " Blue."}]
    with pytest.raises(ValueError, match=r"train dataset needs 'chosen' and 'rejected' columns") as err:
        prepare_dataset(rows, tiny_tokenizer)
    assert "['chosen', 'prompt']" in str(err.value)  # what the dataset does have


def test_missing_field_row_level(tiny_tokenizer):
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": " Blue."},  # `datasets` fills the hole with None
    ]
    with pytest.raises(ValueError, match=r"row 2 \(0-based\): missing field 'rejected'"):
        prepare_dataset(rows, tiny_tokenizer)


def test_non_string_content_in_a_list_of_rows(tiny_tokenizer):
    # A list of dicts is the first thing users pass; a wrong type must be reported by row and field, not by
    # pyarrow ("Expected bytes, got a 'int' object") while building the Dataset.
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": 42, "rejected": " Green."},
    ]
    with pytest.raises(TypeError, match=r"row 1 \(0-based\): field 'chosen' must be a string, got int"):
        prepare_dataset(rows, tiny_tokenizer)


def test_non_string_content_in_a_dataset(tiny_tokenizer):
    ints = datasets.Dataset.from_list([{"prompt": SKY, "chosen": 1, "rejected": 2}])
    with pytest.raises(TypeError, match=r"row 0 \(0-based\): field 'chosen' must be a string, got int"):
        prepare_dataset(ints, tiny_tokenizer)
    rows = [
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
        {"chosen": [user(SKY), assistant(None)], "rejected": [user(SKY), assistant("Green.")]},
    ]
    with pytest.raises(
        TypeError, match=r"row 1 \(0-based\): field 'chosen\[1\]\.content' must be a string, got NoneType"
    ):
        prepare_dataset(rows, tiny_tokenizer)
    # Row by row (what `datasets.map` calls), with any index.
    with pytest.raises(TypeError, match=r"row 7: field 'rejected' must be a string, got list"):
        row_to_text({"prompt": SKY, "chosen": " Blue.", "rejected": ["Green."]}, 7, tiny_tokenizer)


def test_empty_content(tiny_tokenizer):
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": "   ", "rejected": " Green."},
    ]
    with pytest.raises(ValueError, match=r"row 1 \(0-based\): field 'chosen' is empty"):
        prepare_dataset(rows, tiny_tokenizer)
    rows = [
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("")]},
    ]
    with pytest.raises(ValueError, match=r"row 1 \(0-based\): field 'rejected\[1\]\.content' is empty"):
        prepare_dataset(rows, tiny_tokenizer)


def test_message_without_role_or_content(tiny_tokenizer):
    # Through `datasets`, a missing key becomes None in the message struct.
    rows = [
        {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
        {"chosen": [{"content": SKY}, assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]},
    ]
    with pytest.raises(TypeError, match=r"row 1 \(0-based\): field 'chosen\[0\]\.role' must be a string"):
        prepare_dataset(rows, tiny_tokenizer)
    rows[1] = {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), {"role": "assistant"}]}
    with pytest.raises(TypeError, match=r"row 1 \(0-based\): field 'rejected\[1\]\.content' must be a string"):
        prepare_dataset(rows, tiny_tokenizer)
    # A plain dict row (no `datasets` in between) names the missing keys.
    row = {"chosen": [user(SKY), {"role": "assistant"}], "rejected": [user(SKY), assistant("Green.")]}
    with pytest.raises(ValueError, match=r"row 3: field 'chosen\[1\]' needs 'role' and 'content' keys"):
        row_to_text(row, 3, tiny_tokenizer)


def test_conversational_rows_need_a_chat_template(tiny_tokenizer_no_template):
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
    ]
    prepare_dataset(rows, tiny_tokenizer_no_template)  # plain text is fine without one
    rows = [{"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]}] * 2
    with pytest.raises(
        ValueError, match=r"row 0 \(0-based\): conversational data .* needs a tokenizer with a chat template"
    ):
        prepare_dataset(rows, tiny_tokenizer_no_template)


def test_not_a_dataset(tiny_tokenizer):
    with pytest.raises(TypeError, match="train dataset must be a datasets.Dataset or a list of dicts, got str"):
        prepare_dataset("rows.jsonl", tiny_tokenizer)


# ----------------------------------------------------------------------------------------------- files
ROWS = [
    {"prompt": SKY, "chosen": " Blue.", "rejected": " Green."},
    {"prompt": FIRE, "chosen": " Yes.", "rejected": " No."},
]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_read_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(_jsonl(ROWS[:1]) + "\n" + _jsonl(ROWS[1:]) + '{"prompt": "x", "chosen": \n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:4: malformed JSON line"):
        read_jsonl(path)
    path.write_text(_jsonl(ROWS) + "[1, 2]\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text(_jsonl(ROWS[:1]) + "\n\n" + _jsonl(ROWS[1:]))  # blank lines are skipped
    assert read_jsonl(path) == ROWS


def _rows(ds):
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ds]


def test_load_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(_jsonl(ROWS))
    assert _rows(load_preference_dataset(str(path))) == ROWS


def test_load_json_list_and_split_dict(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS))
    assert _rows(load_preference_dataset(str(path))) == ROWS
    path.write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert _rows(load_preference_dataset(str(path), split="test")) == ROWS[:1]


def test_load_json_with_json_lines_content(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(_jsonl(ROWS))
    assert _rows(load_preference_dataset(str(path))) == ROWS


def test_load_json_with_a_single_json_line(tmp_path):
    # One row in JSON-lines form is also a valid JSON document (an object): still a one-row dataset.
    path = tmp_path / "pairs.json"
    path.write_text(_jsonl(ROWS[:1]))
    assert _rows(load_preference_dataset(str(path))) == ROWS[:1]


def test_load_parquet(tmp_path):
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert _rows(load_preference_dataset(str(path))) == ROWS


def test_load_saved_dataset_directories(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert _rows(load_preference_dataset(str(tmp_path / "single"))) == ROWS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[1:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert _rows(load_preference_dataset(str(tmp_path / "dict"), split="test")) == ROWS[1:]


def test_load_unsupported_file_type(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"pairs\.csv: unsupported file type '\.csv'"):
        load_preference_dataset(str(path))


def test_loaded_file_prepares_end_to_end(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(_jsonl(ROWS))
    ds, stats = prepare_dataset(load_preference_dataset(str(path)), tiny_tokenizer)
    assert stats.kept == 2
    assert_pair(tiny_tokenizer, ds[1], FIRE, " Yes.", " No.")


def test_pairs_identical_after_truncation_are_dropped(tiny_tokenizer):
    from orpo_plugin.data import DROP_IDENTICAL_TRUNCATED, prepare_dataset

    rows = [
        {"prompt": "hi", "chosen": " apple banana cherry", "rejected": " apple banana plum"},
        {"prompt": "hi", "chosen": " dog", "rejected": " cat"},
    ]
    prompt_len = len(tiny_tokenizer("hi", add_special_tokens=False)["input_ids"]) + 1  # + BOS
    first = tiny_tokenizer(" apple", add_special_tokens=False)["input_ids"]
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=prompt_len + len(first))
    assert stats.dropped[DROP_IDENTICAL_TRUNCATED] == 1 and stats.kept == 1


def test_pretokenized_pair_without_prompt_and_one_token_response_is_dropped():
    from orpo_plugin.data import DROP_UNSCORED, prepare_dataset

    rows = [
        {"prompt_input_ids": [], "chosen_input_ids": [5], "rejected_input_ids": [6, 7]},
        {"prompt_input_ids": [], "chosen_input_ids": [5, 8], "rejected_input_ids": [6, 7]},
    ]
    ds, stats = prepare_dataset(rows, tokenizer=None)
    assert stats.dropped[DROP_UNSCORED] == 1 and stats.kept == 1


# ----------------------------------------------------------------------------------------------- long prompts
TURNS = [user(SKY), assistant("Blue."), user(FIRE), assistant("Yes."), user("one two three four five six")]


def long_prompt_row():
    return {"prompt": TURNS, "chosen": [assistant("seven eight")], "rejected": [assistant("nine ten")]}


def full_prompt_ids(tok):
    return [tok.bos_token_id] + enc(tok, chat_prompt(*TURNS))


def test_long_prompt_keep_end_keeps_the_latest_turns_and_bos(tiny_tokenizer):
    full = full_prompt_ids(tiny_tokenizer)
    max_length, keep = 24, 12
    assert len(full) >= max_length, "test precondition: the prompt alone fills max_length"
    ds, stats = prepare_dataset([long_prompt_row()], tiny_tokenizer, max_length=max_length, max_prompt_length=keep)
    prompt = ds[0]["prompt_input_ids"]
    assert prompt == [tiny_tokenizer.bos_token_id] + full[len(full) - (keep - 1) :]
    text = tiny_tokenizer.decode(prompt[1:])
    assert text.endswith("five six<|end|><|assistant|>") and SKY not in text  # the last turn kept, the first cut
    assert stats.kept == 1 and not stats.dropped and stats.truncated_prompts == 1
    assert "prompts truncated: 1" in stats.summary()
    for name in ("chosen_input_ids", "rejected_input_ids"):  # the responses fit after the prompt was cut
        assert len(prompt) + len(ds[0][name]) <= max_length
        assert tiny_tokenizer.decode(ds[0][name][-1:]) == "<|end|>"  # the template's end of turn, no EOS after


def test_long_prompt_keep_start(tiny_tokenizer):
    full = full_prompt_ids(tiny_tokenizer)
    ds, stats = prepare_dataset(
        [long_prompt_row()], tiny_tokenizer, max_length=24, max_prompt_length=12, truncation_mode="keep_start"
    )
    assert ds[0]["prompt_input_ids"] == full[:12]
    assert stats.truncated_prompts == 1


def test_prompt_of_a_pair_that_fits_is_not_cut(tiny_tokenizer):
    full = full_prompt_ids(tiny_tokenizer)
    ds, stats = prepare_dataset([long_prompt_row()], tiny_tokenizer, max_length=len(full) + 40, max_prompt_length=4)
    assert ds[0]["prompt_input_ids"] == full and stats.truncated_prompts == 0


def test_long_prompt_with_drop_long_pairs_is_dropped_not_cut(tiny_tokenizer):
    rows = [
        long_prompt_row(),
        {"prompt": [user(SKY)], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
    ]
    ds, stats = prepare_dataset(rows, tiny_tokenizer, max_length=24, max_prompt_length=12, drop_long_pairs=True)
    assert len(ds) == 1 and stats.dropped == {DROP_TOO_LONG: 1} and stats.truncated_prompts == 0


def test_long_pretokenized_prompt_is_cut_like_text(tiny_tokenizer):
    pair = {"prompt_input_ids": [1] + list(range(10, 40)), "chosen_input_ids": [5, 6, 2], "rejected_input_ids": [7, 2]}
    ds, stats = prepare_dataset([pair], tiny_tokenizer, max_length=16, max_prompt_length=8)
    assert ds[0]["prompt_input_ids"] == [1] + list(range(33, 40))
    assert ds[0]["chosen_input_ids"] == [5, 6, 2] and stats.truncated_prompts == 1
    ds, _ = prepare_dataset([pair], tiny_tokenizer, max_length=16, max_prompt_length=8, truncation_mode="keep_start")
    assert ds[0]["prompt_input_ids"] == [1] + list(range(10, 17))


def test_unknown_truncation_mode_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        prepare_dataset(
            [long_prompt_row()], tiny_tokenizer, max_length=24, max_prompt_length=12, truncation_mode="middle"
        )


# ----------------------------------------------------------------------------------------------- empty datasets
@pytest.mark.parametrize(
    "empty",
    [[], datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), datasets.Dataset.from_dict({})],
    ids=["list", "dataset", "dataset-without-columns"],
)
def test_empty_dataset_is_the_no_usable_pairs_error(tiny_tokenizer, empty):
    with pytest.raises(ValueError, match=r"eval dataset: no usable pairs left \(the dataset has no rows\)"):
        prepare_dataset(empty, tiny_tokenizer, name="eval")


# One check for every way rows arrive: a file read by the command line (`train`, `eval`) or a list given to the
# trainer. A field whose format differs between rows is named with its row (0-based) and, from a file, its line.
def _mixed_rows():
    conv = {
        "chosen": [{"role": "user", "content": SKY}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": SKY}, {"role": "assistant", "content": "Green."}],
    }
    rows = [conv] * 8
    rows[7] = {**conv, "rejected": "Green."}
    return rows


def test_a_jsonl_row_of_another_format_is_named_with_its_line_before_arrow(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = _mixed_rows()
    path.write_text(_jsonl(rows[:3]) + "\n" + _jsonl(rows[3:]))  # a blank line: row 7 is on line 9
    with pytest.raises(TypeError) as err:
        load_preference_dataset(str(path))
    assert str(err.value) == (
        "row 7 (0-based), line 9 of prefs.jsonl: field 'rejected' is a string but row 0 (0-based), line 1 of "
        "prefs.jsonl has a message list; each column must hold one format in every row"
    )


def test_a_json_list_row_of_another_format_is_named(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(_mixed_rows()))
    with pytest.raises(
        TypeError,
        match=r"^row 7 \(0-based\) of prefs\.json: field 'rejected' is a string but row 0 "
        r"\(0-based\) has a message list",
    ):
        load_preference_dataset(str(path))


def test_a_list_row_of_another_format_gets_the_same_check(tiny_tokenizer):
    with pytest.raises(
        TypeError,
        match=r"^train dataset, row 7 \(0-based\): field 'rejected' is a string but row 0 "
        r"\(0-based\) has a message list",
    ):
        prepare_dataset(_mixed_rows(), tiny_tokenizer)


@pytest.mark.parametrize("name", ["my_prefs", "prefs.jsonl", "data/prefs.jsonl", "./my_prefs", "~/nowhere/prefs"])
def test_a_missing_local_path_says_it_does_not_exist(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(name)}: no such file or directory \(looked in "):
        load_preference_dataset(name)


def test_pairs_that_lose_most_of_their_response_are_warned_about(tiny_tokenizer, caplog):
    long = " one two three four five six seven eight nine ten"
    rows = [{"prompt": SKY, "chosen": long, "rejected": " ten nine eight seven six five four three two one"}] * 4
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        _, stats = prepare_dataset(rows, tiny_tokenizer, max_length=12)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert stats.mostly_cut == 4 and stats.truncated_responses == 8
    assert said[0].startswith("train dataset: 4/4 pairs kept; dropped: none; prompts truncated: 0; responses truncated")
    assert said[0].endswith("(4 pairs lost more than half of a response)")
    assert said[1].startswith(
        "train dataset: 4 of 4 pairs (100%) lost more than half of a response to max_length=12; "
        "before cutting, prompt + longer response was "
    )
    assert "raise max_length" in said[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):  # cut a little: the summary only
        _, stats = prepare_dataset(rows, tiny_tokenizer, max_length=stats.full_lengths[0] - 1)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert stats.mostly_cut == 0 and stats.truncated_responses >= 1 and len(said) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):  # nothing cut: nothing said
        prepare_dataset(rows, tiny_tokenizer, max_length=256)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("column", ["images", "image"])
def test_rows_with_images_are_refused_not_trained_as_text(tiny_tokenizer, column):
    """Vision preference rows (TRL's `images` column beside the prompt): the images would never reach the model, so
    the dataset is refused with the column named, as a list of rows and as a datasets.Dataset."""
    rows = [
        {"prompt": SKY, "chosen": " Blue.", "rejected": " Green.", column: ["sky.png"]},
        {"prompt": FIRE, "chosen": " Yes.", "rejected": " No.", column: ["fire.png"]},
    ]
    for given in (rows, datasets.Dataset.from_list(rows)):
        with pytest.raises(ValueError, match=rf"train dataset has the column '{column}': .*text only"):
            prepare_dataset(given, tiny_tokenizer, name="train")
    ds, _ = prepare_dataset([{k: v for k, v in r.items() if k != column} for r in rows], tiny_tokenizer)
    assert len(ds) == 2  # the same rows without the column train on their text


def test_image_parts_in_a_message_are_refused_with_the_row(tiny_tokenizer):
    """A conversational prompt with an {"type": "image"} part (TRL's vision format) names the row and the field."""
    image_prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SKY}]}]
    rows = [
        {"prompt": [user(SKY)], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
        {"prompt": image_prompt, "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
    ]
    with pytest.raises(
        ValueError, match=r"row 1 \(0-based\): field 'prompt\[0\]\.content' is a list of image, text parts"
    ):
        prepare_dataset(rows, tiny_tokenizer)
