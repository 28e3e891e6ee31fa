"""Chat-template rows tokenize to exactly what the template renders, on templates shaped like Llama 3, Gemma,
Mistral, Phi-3, ChatML with a <think> generation prompt, ChatML without BOS, and plain turns without an end-of-turn
token: one BOS, EOS only where the template has no end-of-turn token of its own (never `<|im_end|>\\n<|im_end|>`).

The same invariant on SmolLM2's real template and on Axolotl's argilla path: tests/real/test_real_templates.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.messages import assistant, system, user  # tests/helpers
from helpers.templates import CASES, assert_rendering, build_template_tokenizer  # tests/helpers

from orpo_plugin import data
from orpo_plugin.data import end_of_turn_ids, load_preference_dataset, prepare_dataset

SKY, FRUIT = "What color is the sky?", "Name a fruit."
HISTORY = [user("Is fire hot?"), assistant("Yes."), user(SKY)]


def row_formats():
    """(format, row, prompt messages, chosen messages, rejected messages) for every row format read."""
    chosen, rejected = [assistant("Blue.")], [assistant("Green.")]
    return [
        (
            "conversational",
            {"prompt": [user(SKY)], "chosen": chosen, "rejected": rejected},
            [user(SKY)],
            chosen,
            rejected,
        ),
        (
            "multi-turn prompt with system",
            {"prompt": [system("Be brief."), *HISTORY], "chosen": chosen, "rejected": rejected},
            [system("Be brief."), *HISTORY],
            chosen,
            rejected,
        ),
        (
            "implicit prompt",
            {"chosen": [user(FRUIT), assistant("apple banana.")], "rejected": [user(FRUIT), assistant("dog cat.")]},
            [user(FRUIT)],
            [assistant("apple banana.")],
            [assistant("dog cat.")],
        ),
        (
            "mixed: string prompt beside message lists",
            {
                "prompt": FRUIT,
                "chosen": [user(FRUIT), assistant("apple.")],
                "rejected": [user(FRUIT), assistant("dog.")],
            },
            [user(FRUIT)],
            [assistant("apple.")],
            [assistant("dog.")],
        ),
        (
            "argilla with a system column",
            {
                "system": "Be brief.",
                "chosen": [user(SKY), assistant("Blue.")],
                "rejected": [user(SKY), assistant("Green.")],
            },
            [system("Be brief."), user(SKY)],
            chosen,
            rejected,
        ),
    ]


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param, build_template_tokenizer(request.param)


def test_end_of_turn_is_read_off_the_template(case):
    spec, tok = case
    ends = {tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(tok)}
    assert ends == {spec.eos} | ({spec.end_of_turn} if spec.end_of_turn else set())


def test_a_template_that_hides_its_end_of_turn_is_said_once(caplog):
    """A template that refuses the [user, assistant] probe: only EOS is known to end a turn, and a warning says so
    (once per template), instead of silently training on EOS after the template's own end of turn."""
    tok = build_template_tokenizer(CASES[0])
    tok.chat_template = "{{ raise_exception('a template of its own rules') }}"
    with caplog.at_level("WARNING", logger="orpo_plugin"):
        assert end_of_turn_ids(tok) == {tok.eos_token_id}
        assert end_of_turn_ids(tok) == {tok.eos_token_id}
    said = [r.getMessage() for r in caplog.records if "end-of-turn token is unknown" in r.getMessage()]
    assert len(said) == 1 and "a template of its own rules" in said[0], said


@pytest.mark.parametrize("fmt", [f[0] for f in row_formats()])
def test_rows_tokenize_to_the_template_rendering(case, fmt):
    spec, tok = case
    _, row, prompt, chosen, rejected = next(f for f in row_formats() if f[0] == fmt)
    ds, stats = prepare_dataset([row], tok)
    assert stats.kept == 1
    assert_rendering(tok, ds[0], prompt, chosen, rejected, spec.appends_eos)
    first = ds[0]["prompt_input_ids"][0]
    assert (first == tok.bos_token_id) == (tok.bos_token_id is not None)
    for name in ("chosen_input_ids", "rejected_input_ids"):
        text = tok.decode(ds[0][name])
        if spec.name.startswith("chatml"):  # the shape of the bug: `<|im_end|>\n<|im_end|>`
            assert text.endswith(".<|im_end|>\n"), text
        elif spec.appends_eos:
            assert text.endswith("\n" + spec.eos), text


def test_rendered_text_rows_get_the_same_ids_as_message_rows(case):
    """Rows already rendered to text by the template (Axolotl's chat_template.argilla hands these to the trainer)
    tokenize to the same ids as the message rows they were rendered from: no EOS after the end-of-turn token."""
    spec, tok = case
    prompt, chosen, rejected = [user(SKY)], [assistant("Blue.")], [assistant("Green.")]
    rendered_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = [tok.apply_chat_template(prompt + r, tokenize=False) for r in (chosen, rejected)]
    n = min(data._common_prefix(rendered_prompt, f) for f in full)
    text_row = {"prompt": full[0][:n], "chosen": full[0][n:], "rejected": full[1][n:]}
    ds_text, _ = prepare_dataset([text_row], tok)
    ds_msgs, _ = prepare_dataset([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tok)
    assert {k: ds_text[0][k] for k in data.COLUMNS} == {k: ds_msgs[0][k] for k in data.COLUMNS}
    assert_rendering(tok, ds_text[0], prompt, chosen, rejected, spec.appends_eos)


def test_plain_text_rows_keep_trls_eos(case):
    """Text that does not end a turn gets EOS, as TRL appends it; one BOS where the tokenizer has one."""
    _, tok = case
    ds, _ = prepare_dataset([{"prompt": FRUIT, "chosen": " apple", "rejected": " dog"}], tok)
    for name in ("chosen_input_ids", "rejected_input_ids"):
        assert ds[0][name][-1] == tok.eos_token_id and ds[0][name].count(tok.eos_token_id) == 1
    assert ds[0]["prompt_input_ids"].count(tok.bos_token_id) == (tok.bos_token_id is not None)


# ------------------------------------------------------------------------------------- mixed formats, row keys
def test_mixed_string_prompt_that_disagrees_is_an_error_naming_the_row(case):
    _, tok = case
    rows = [
        {"prompt": FRUIT, "chosen": [user(FRUIT), assistant("apple.")], "rejected": [user(FRUIT), assistant("dog.")]},
        {
            "prompt": "Name a tool.",
            "chosen": [user(FRUIT), assistant("apple.")],
            "rejected": [user(FRUIT), assistant("dog.")],
        },
    ]
    with pytest.raises(ValueError, match=r"row 1 \(0-based\): field 'prompt' is the string 'Name a tool.'"):
        prepare_dataset(rows, tok)


def test_mixed_string_prompt_beside_assistant_only_lists_is_the_user_turn(case):
    spec, tok = case
    row = {"prompt": FRUIT, "chosen": [assistant("apple.")], "rejected": [assistant("dog.")]}
    ds, _ = prepare_dataset([row], tok)
    assert_rendering(tok, ds[0], [user(FRUIT)], [assistant("apple.")], [assistant("dog.")], spec.appends_eos)


@pytest.mark.parametrize(
    "row",
    [
        # a string prompt beside conversations whose user turns differ (by one space): nothing is shared
        {
            "prompt": FRUIT,
            "chosen": [user(FRUIT), assistant("apple.")],
            "rejected": [user(FRUIT + " "), assistant("dog.")],
        },
        # no string prompt: the shared system message would be the prompt and the user turns part of the answers
        {
            "chosen": [system("Be brief."), user(FRUIT), assistant("apple.")],
            "rejected": [system("Be brief."), user(SKY), assistant("Blue.")],
        },
    ],
    ids=["string prompt", "implicit prompt"],
)
def test_a_user_turn_is_never_trained_as_the_answer(case, row):
    """Where the shared leading messages stop before the user's last turn, the rest is not the assistant's answer:
    an error naming the row and field, not a pair whose response holds the user's turn."""
    _, tok = case
    good = {"chosen": [user(FRUIT), assistant("apple.")], "rejected": [user(FRUIT), assistant("dog.")]}
    with pytest.raises(ValueError, match=r"row 1 \(0-based\): field 'chosen' goes on with a 'user' message"):
        prepare_dataset([good, row], tok)


def test_a_template_that_refuses_a_row_names_the_row(case):
    spec, tok = case
    refusing = build_template_tokenizer(spec)
    refusing.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    good = {"prompt": [user(FRUIT)], "chosen": [assistant("apple.")], "rejected": [assistant("dog.")]}
    bad = {"prompt": [user(FRUIT), user(SKY)], "chosen": [assistant("apple.")], "rejected": [assistant("dog.")]}
    with pytest.raises(
        ValueError, match=r"row 1 \(0-based\): the tokenizer's chat template refused .*roles must alternate"
    ):
        prepare_dataset([good, bad], refusing)


ROWS_WITH_DIFFERENT_KEYS = [
    {"chosen": "Name a fruit. apple", "rejected": "Name a fruit. dog"},  # implicit prompt: no 'prompt' key
    {"prompt": "Tell me a colour.", "chosen": " Blue.", "rejected": " Loud."},
    {"prompt": "Name a fruit.", "chosen": " apple", "rejected": " dog", "system": "ignored for text rows"},
]


def _check_keys_kept(ds, tok):
    texts = [tok.decode(r["prompt_input_ids"], skip_special_tokens=True) for r in ds]
    assert texts == ["Name a fruit.", "Tell me a colour.", "Name a fruit."]
    assert tok.decode(ds[1]["chosen_input_ids"], skip_special_tokens=True) == " Blue."


def test_rows_with_different_keys_keep_every_field_from_a_list(case):
    _, tok = case
    ds, stats = prepare_dataset(ROWS_WITH_DIFFERENT_KEYS, tok)
    assert stats.kept == 3
    _check_keys_kept(ds, tok)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_rows_with_different_keys_keep_every_field_from_a_file(case, tmp_path, suffix):
    _, tok = case
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS_WITH_DIFFERENT_KEYS))
    else:
        path.write_text(json.dumps(ROWS_WITH_DIFFERENT_KEYS))
    loaded = load_preference_dataset(str(path))
    assert set(loaded.column_names) == {"prompt", "chosen", "rejected", "system"}
    assert loaded[0]["prompt"] is None and loaded[1]["prompt"] == "Tell me a colour."
    ds, _ = prepare_dataset(loaded, tok)
    _check_keys_kept(ds, tok)


# ------------------------------------------------------------------------------------- generation stops
def test_generation_stops_at_the_end_of_turn_it_trained(case, tmp_path, monkeypatch):
    """Generated answers (generate_during_eval, the demo) end where orpo_plugin trains a response to end: at the
    template's end-of-turn token (ChatML's `<|im_end|>` when EOS is `<|endoftext|>`), EOS, or the model's configured
    EOS; `generate` is asked to stop there and each completion is cut after the first one."""
    from orpo_plugin import ORPOConfig, ORPOTrainer
    from orpo_plugin.generation import stop_token_ids
    from orpo_plugin.toy import build_model

    spec, tok = case
    model = build_model(len(tok), hidden_size=32)
    model.generation_config.eos_token_id = tok.pad_token_id  # a model's own extra stop token
    stops = stop_token_ids(model, tok)
    assert set(stops) == set(end_of_turn_ids(tok)) | {tok.pad_token_id}
    if spec.end_of_turn:
        assert tok.convert_tokens_to_ids(spec.end_of_turn) in stops

    rows = [{"prompt": [user(FRUIT)], "chosen": [assistant("apple.")], "rejected": [assistant("dog.")]}] * 2
    trainer = ORPOTrainer(
        model=model,
        args=ORPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_completion_length=6),
        train_dataset=rows,
        processing_class=tok,
    )
    word = tok("apple", add_special_tokens=False)["input_ids"][0]
    last = stops[-1]
    asked = {}

    def fake_generate(input_ids, **kw):  # what a model that answers `word word <stop> word ...` would return
        asked.update(kw)
        tail = torch.tensor([word, word, last, word, word, word])
        return torch.cat([input_ids, tail.expand(len(input_ids), -1)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    got = trainer.generate_completions([[word, word], [word]])
    assert sorted(asked["eos_token_id"]) == stops
    assert got == [[word, word, last]] * 2
