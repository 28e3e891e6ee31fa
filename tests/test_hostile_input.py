"""Hostile dataset rows and config files: every row is tokenized correctly, dropped and counted, or refused with a
ValueError/TypeError naming the row and the field. Nothing else escapes, and a YAML config never runs code."""

from __future__ import annotations

import os
import re

import pytest
from helpers.stubs import StubTokenizer  # tests/helpers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orpo_plugin.data import COLUMNS, end_of_turn_ids, prepare_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_LENGTH = 32
FIELDS = ("prompt", "chosen", "rejected", "system")
FIELD_NAMES = re.compile(r"'(prompt|chosen|rejected|system)[\[.'\]]|columns")

# ---- strategies: text that can be anything a JSON file holds (lone surrogates included), and junk around it
text = st.one_of(
    st.text(max_size=12),  # unicode, empty, whitespace, control characters
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=6).map(lambda s: s * 400),  # huge
    st.sampled_from(["</s>", "<pad>", "<s>", "<|end|>", " \n\t", "\x00", "\ud800", "a\udfff b", "é" * 50]),
    st.sampled_from(["Blue.", " Blue.", "What color is the sky?", " one two three four five"]),
)
scalar_junk = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.binary(max_size=4))
junk = st.recursive(
    st.one_of(scalar_junk, text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), text, scalar_junk)
message = st.one_of(
    st.fixed_dictionaries({"role": role, "content": st.one_of(text, junk)}),
    st.fixed_dictionaries({"role": role}),  # missing content
    st.fixed_dictionaries({"content": text}),  # missing role
    st.fixed_dictionaries({"role": role, "content": text, "extra": junk}),
)
messages = st.lists(message, max_size=3)
value = st.one_of(text, text, text, messages, junk)


@st.composite
def rows(draw):
    """A row: any subset of the known fields with any values, extra keys, sometimes chosen == rejected."""
    row = {}
    for name in FIELDS:
        if draw(st.integers(0, 9)) < (2 if name == "system" else 8):
            row[name] = draw(value)
    if "chosen" in row and draw(st.integers(0, 5)) == 0:
        row["rejected"] = row["chosen"]  # identical pair
    row.update(draw(st.dictionaries(st.sampled_from(["id", "score", "meta", "tags"]), junk, max_size=2)))
    return row


any_row = st.one_of(rows(), rows(), rows(), junk)  # now and then a row that is not a mapping at all


def check_kept(ds, stats, tok, n_rows):
    assert stats.rows == n_rows and stats.kept == len(ds) >= 1
    assert stats.kept + sum(stats.dropped.values()) == n_rows
    vocab, bos = len(tok), tok.bos_token_id
    # EOS, and the chat template's end of turn (a response that already ends a turn gets no EOS after it; that rule
    # is checked template by template in test_chat_templates.py)
    ends = end_of_turn_ids(tok)
    unterminated = 0
    for pair in ds:
        ids = {k: list(pair[k]) for k in COLUMNS}
        assert all(isinstance(i, int) and 0 <= i < vocab for k in COLUMNS for i in ids[k])
        assert ids["prompt_input_ids"][:1] == [bos]
        for name in ("chosen_input_ids", "rejected_input_ids"):
            assert ids[name], f"empty {name}"
            assert len(ids["prompt_input_ids"]) + len(ids[name]) <= MAX_LENGTH
            visible = [i for i in ids[name] if i in ends or tok.decode([i]).strip()]  # whitespace after an end
            unterminated += not visible or visible[-1] not in ends
    # a response lacks its final EOS (or end of turn) only when it was cut, and every cut response of a kept pair
    # is counted
    assert unterminated <= stats.truncated_responses <= 2 * stats.kept


def check_refusal(err, rows_in, tok):
    assert type(err) in (ValueError, TypeError), f"{type(err).__module__}.{type(err).__name__}: {err}"
    msg = str(err)
    if "no usable pairs left" in msg:  # every row was dropped: counted, not an error about a row
        return
    if "dataset needs 'chosen' and 'rejected' columns" in msg:  # no row has one of them at all
        assert not all(isinstance(r, dict) and "chosen" in r and "rejected" in r for r in rows_in)
        return
    match = re.search(r"\brow (\d+)\b", msg)
    assert match, f"the error does not name the row: {msg}"
    index = int(match.group(1))
    assert index < len(rows_in), msg
    assert FIELD_NAMES.search(msg) or "mapping" in msg, f"the error does not name the field: {msg}"
    if "each column must hold one format" in msg:  # the row is fine alone; it clashes with an earlier row
        return
    # the named row is bad on its own too (the error is not about another row)
    with pytest.raises((ValueError, TypeError)):
        prepare_dataset([rows_in[index]], tok, max_length=MAX_LENGTH)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows_in=st.lists(any_row, min_size=1, max_size=4))
@example(rows_in=[{"prompt": "", "chosen": "0", "rejected": "<|end|>", "system": ""}])  # a response that ends a turn
def test_hostile_rows_are_kept_dropped_or_refused_by_name(tiny_tokenizer, rows_in):
    try:
        ds, stats = prepare_dataset(rows_in, tiny_tokenizer, max_length=MAX_LENGTH)
    except Exception as err:  # noqa: BLE001 - the point is which exceptions escape
        check_refusal(err, rows_in, tiny_tokenizer)
    else:
        check_kept(ds, stats, tiny_tokenizer, len(rows_in))


@pytest.mark.parametrize(
    "rows_in,field",
    [
        ([{"prompt": "a\ud800", "chosen": " b", "rejected": " c"}], "prompt"),  # lone surrogate (valid JSON escape)
        ([{"prompt": "a", "chosen": " b", "rejected": " c\udfff"}], "rejected"),
        ([{"prompt": "a", "chosen": " b", "rejected": " c"}, "not a row"], None),
        (
            [
                {"prompt": "Q", "chosen": " b", "rejected": " c"},
                {
                    "prompt": [{"role": "user", "content": "Q"}],
                    "chosen": [{"role": "assistant", "content": "b"}],
                    "rejected": [{"role": "assistant", "content": "c"}],
                },
            ],
            "prompt",
        ),  # each row fine alone, but one column mixes strings and message lists
    ],
    ids=["surrogate-prompt", "surrogate-response", "row-not-a-mapping", "mixed-formats"],
)
def test_known_hostile_rows_name_row_and_field(tiny_tokenizer, rows_in, field):
    with pytest.raises((ValueError, TypeError)) as info:
        prepare_dataset(rows_in, tiny_tokenizer, max_length=MAX_LENGTH)
    assert type(info.value) in (ValueError, TypeError)
    assert re.search(r"\brow \d+\b", str(info.value)), str(info.value)
    if field:
        assert f"'{field}'" in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------- YAML configs
def test_yaml_config_with_python_tag_is_refused_without_running_it(tmp_path):
    """`orpo-plugin train --config bad.yaml` (cli.main, what the console script and `python -m` call)."""
    import yaml

    from orpo_plugin import cli

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"model_name_or_path: !!python/object/apply:os.system ['touch {marker}']\n"
        f"dataset_name: x.jsonl\noutput_dir: {tmp_path / 'out'}\n"
    )
    with pytest.raises(yaml.constructor.ConstructorError, match="python/object/apply"):
        cli.main(["train", "--config", str(bad)])
    assert not marker.exists(), "the YAML tag was executed"


def test_trl_parser_reads_configs_with_the_safe_loader(tmp_path, monkeypatch):
    """What the CLI relies on: TrlParser loads `--config` with yaml.safe_load (checked in-process, no subprocess)."""
    import yaml
    from trl import ModelConfig, ScriptArguments, TrlParser

    from orpo_plugin import ORPOConfig

    calls = []
    real_load = yaml.load

    def guarded_load(stream, Loader):  # yaml.safe_load is yaml.load(stream, SafeLoader)
        assert issubclass(Loader, yaml.SafeLoader), f"YAML read with {Loader.__name__}"
        calls.append(Loader)
        return real_load(stream, Loader)

    monkeypatch.setattr(yaml, "load", guarded_load)
    monkeypatch.setattr(yaml, "unsafe_load", lambda *a, **k: pytest.fail("yaml.unsafe_load used"))
    monkeypatch.setattr(yaml, "full_load", lambda *a, **k: pytest.fail("yaml.full_load used"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: !!python/object/apply:os.getcwd []\n")
    parser = TrlParser((ScriptArguments, ORPOConfig, ModelConfig))
    with pytest.raises(yaml.constructor.ConstructorError):
        parser.parse_args_and_config(["--config", str(bad)])
    assert calls


# ----------------------------------------------------------------------------------------------- oversized pairs
def _trainer(tmp_path, tok, rows, **kw):
    from orpo_plugin import ORPOConfig, ORPOTrainer
    from orpo_plugin.toy import build_model

    base = dict(
        output_dir=str(tmp_path),
        packing=True,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(kw)
    vocab = len(tok) if hasattr(tok, "__len__") else 300
    return ORPOTrainer(
        model=build_model(vocab, hidden_size=32, num_layers=2),
        args=ORPOConfig(**base),
        train_dataset=rows,
        processing_class=tok,
    )


def _assert_within(trainer, budget):
    lengths = [
        len(p["prompt_input_ids"]) + max(len(p["chosen_input_ids"]), len(p["rejected_input_ids"]))
        for p in trainer.train_dataset
    ]
    assert max(lengths) <= MAX_LENGTH, "a pair longer than max_length reached the trainer"
    sizes = [int(b["real_tokens"]) for b in trainer.get_train_dataloader()]
    assert sizes and max(sizes) <= budget
    assert all(b["input_ids"].shape[-1] <= budget for b in trainer.get_train_dataloader())


def test_text_pairs_longer_than_max_length_never_make_an_oversized_packed_row(tiny_tokenizer, tmp_path):
    long = " one two three four five six seven eight nine ten" * 20
    rows = [
        {"prompt": "What color is the sky?", "chosen": long, "rejected": " Blue."},
        {"prompt": "Q: Is fire hot?" * 3, "chosen": " Yes.", "rejected": long + long},
        {"prompt": "hello world", "chosen": long, "rejected": long + " one"},
        {"prompt": "Be brief.", "chosen": " Blue.", "rejected": " Green."},
    ] * 3
    t = _trainer(tmp_path, tiny_tokenizer, rows)
    budget = t.args.packing_budget()
    assert budget == 2 * MAX_LENGTH  # the default: max_length x batch size, at least 2 x max_length
    assert t.data_stats["train"].truncated_responses > 0
    _assert_within(t, budget)
    t.train()
    logged = [h for h in t.state.log_history if "loss" in h]
    assert all(h["tokens/real"] <= budget for h in logged)


def test_pretokenized_pairs_longer_than_max_length_are_truncated_and_counted(tmp_path):
    rows = [
        {"prompt_input_ids": [1, 5, 6], "chosen_input_ids": list(range(3, 200)), "rejected_input_ids": [7, 2]},
        {"prompt_input_ids": [1, 8], "chosen_input_ids": [9, 2], "rejected_input_ids": [10] * 100},
        {"prompt_input_ids": [1, 8], "chosen_input_ids": [9, 2], "rejected_input_ids": [11, 2]},
    ]
    # a generous explicit budget: only max_length can keep these pairs short
    t = _trainer(tmp_path, StubTokenizer(), rows, packing_max_tokens=1000)
    assert t.data_stats["train"].truncated_responses == 2
    _assert_within(t, 1000)
    assert list(t.train_dataset[0]["chosen_input_ids"]) == list(range(3, 3 + MAX_LENGTH - 3))
    t2 = _trainer(tmp_path, StubTokenizer(), rows, drop_long_pairs=True)
    assert len(t2.train_dataset) == 1 and sum(t2.data_stats["train"].dropped.values()) == 2


def test_pair_over_an_explicit_budget_is_refused_by_name(tiny_tokenizer, tmp_path):
    long = " one two three four five six seven eight nine ten" * 20
    rows = [{"prompt": "Be brief.", "chosen": " Blue.", "rejected": " Green."}] * 3
    rows.insert(2, {"prompt": "What color is the sky?", "chosen": long, "rejected": " zero" + long})
    t = _trainer(tmp_path, tiny_tokenizer, rows, packing_max_tokens=40)
    cost = (
        2 * len(t.train_dataset[2]["prompt_input_ids"])
        + len(t.train_dataset[2]["chosen_input_ids"])
        + len(t.train_dataset[2]["rejected_input_ids"])
    )
    assert cost > 40
    with pytest.raises(ValueError, match=rf"pair 2 needs {cost} tokens but packing_max_tokens is 40"):
        t.get_train_dataloader()
