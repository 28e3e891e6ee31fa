"""Multi-turn rows through Axolotl's preference types, checked on the host (no Axolotl needed): the row checks of
orpo_plugin/axolotl/dataset_types.py around stand-in transforms that read rows as Axolotl 0.19's do. The same rows
through the real transforms: tests/test_axolotl_integration.py (the `one-exchange-*` and `argilla-prompt-*` cases)."""

from __future__ import annotations

import functools
import re

import pytest
from helpers.messages import assistant, user  # tests/helpers

from orpo_plugin.axolotl.dataset_types import RowTransform, check_argilla_row, check_one_exchange
from orpo_plugin.data import DROP_IDENTICAL, DROP_TOO_LONG, prepare_dataset

WHERE = "datasets[0] (chats.jsonl, type: chatml.argilla_chat)"
CONVERSATION = [user("Hi"), assistant("Hello!"), user("What is 2+2?")]


def argilla_chat(sample):  # reads like Axolotl's chatml.argilla_chat: messages 0 and 1 only
    sample["prompt"] = f"<|im_start|>user\n{sample['chosen'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    sample["chosen"] = f"{sample['chosen'][1]['content']}<|im_end|>"
    sample["rejected"] = f"{sample['rejected'][1]['content']}<|im_end|>"
    return sample


def argilla(sample):  # reads like Axolotl's chat_template.argilla: a `prompt` replaces every user turn
    turns = [
        ({**m, "content": sample["prompt"]} if "prompt" in sample and m["role"] == "user" else m)
        for m in sample["chosen"][:-1]
    ]
    text = "".join(f"<{m['role']}>{m['content']}" for m in turns) + "<assistant>"
    return {"prompt": text, "chosen": sample["chosen"][-1]["content"], "rejected": sample["rejected"][-1]["content"]}


def test_a_one_exchange_type_refuses_a_longer_conversation_naming_the_row_and_the_types_that_take_it():
    wrapped = RowTransform(
        argilla_chat,
        "chatml.argilla_chat",
        WHERE,
        frozenset(),
        functools.partial(check_one_exchange, type_="chatml.argilla_chat"),
    )
    single = {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")]}
    assert wrapped(dict(single), 0)["chosen"] == "A<|im_end|>"
    multi = {"chosen": [*CONVERSATION, assistant("4")], "rejected": [*CONVERSATION, assistant("5")]}
    with pytest.raises(ValueError) as err:
        wrapped(multi, 7)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: row 7: field 'chosen' is a conversation of 4 messages"), message
    assert "reads only its first exchange" in message
    assert "chat_template.argilla_chat" in message and "chat_template.default" in message
    # without the check the pair is the first exchange twice: dropped under a reason that hides the cause
    out = argilla_chat(dict(multi))
    assert out["chosen"] == out["rejected"] == "Hello!<|im_end|>"


def _argilla_transform():
    return RowTransform(argilla, "chat_template.argilla", "datasets[0]", frozenset({"system"}), check_argilla_row)


def test_an_argilla_prompt_that_disagrees_with_the_conversation_names_the_row():
    chosen = [*CONVERSATION, assistant("4")]
    row = {"prompt": "Tell me a joke", "chosen": chosen, "rejected": [assistant("5")]}
    with pytest.raises(ValueError, match=re.escape("datasets[0]: row 3: field 'prompt' is 'Tell me a joke' but")):
        _argilla_transform()(row, 3)


@pytest.mark.parametrize("prompt", ["What is 2+2?", "Hi\nWhat is 2+2?"])
def test_an_argilla_prompt_that_agrees_keeps_every_user_turn(prompt):
    chosen = [*CONVERSATION, assistant("4")]
    out = _argilla_transform()({"prompt": prompt, "chosen": chosen, "rejected": [assistant("5")]}, 0)
    # Axolotl's transform alone would have written the prompt over "Hi" too
    assert out["prompt"] == "<user>Hi<assistant>Hello!<user>What is 2+2?<assistant>"
    single = _argilla_transform()(
        {"prompt": "Q", "chosen": [user("Q"), assistant("A")], "rejected": [assistant("B")]}, 0
    )
    assert single["prompt"] == "<user>Q<assistant>"


def test_no_usable_pairs_names_each_reason_with_its_count_and_first_row(tiny_tokenizer):
    rows = [
        {"prompt": "Q", "chosen": " same", "rejected": " same"},
        {"prompt": "a b c d e f g h i j k l m n o p", "chosen": " x", "rejected": " y"},
        {"prompt": "Q", "chosen": " again", "rejected": " again"},
    ]
    with pytest.raises(ValueError) as err:
        prepare_dataset(rows, tiny_tokenizer, max_length=8, drop_long_pairs=True)
    message = str(err.value)
    assert message.startswith("train dataset: no usable pairs left (0/3 pairs kept")
    assert f"2 ({DROP_IDENTICAL}, first row 0)" in message
    assert f"1 ({DROP_TOO_LONG}, first row 1)" in message


def _chatml_intel(sample):  # reads like Axolotl's chatml.intel: `system` when the row has one
    system = f"<|im_start|>system\n{sample['system']}<|im_end|>\n" if sample.get("system") else ""
    return {
        "prompt": f"{system}<|im_start|>user\n{sample['question']}<|im_end|>\n<|im_start|>assistant\n",
        "chosen": sample["chosen"],
        "rejected": sample["rejected"],
    }


def test_default_system_message_fills_rows_without_a_system_message():
    wrapped = RowTransform(_chatml_intel, "chatml.intel", "datasets[0]", frozenset({"system"}), None, "Be brief.")
    row = {"question": "Q", "chosen": "A", "rejected": "B"}
    assert wrapped(dict(row), 0)["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert wrapped({**row, "system": ""}, 1)["prompt"].startswith("<|im_start|>system\nBe brief.")
    assert wrapped({**row, "system": "Mine."}, 2)["prompt"].startswith("<|im_start|>system\nMine.<|im_end|>")


def test_default_system_message_needs_a_template_with_a_system_turn(tiny_tokenizer):
    import copy

    def argilla_with_template(sample, tokenizer=None):
        messages = [{"role": "system", "content": sample["system"]}] if sample.get("system") else []
        text = tokenizer.apply_chat_template(
            [*messages, *sample["chosen"][:-1]], tokenize=False, add_generation_prompt=True
        )
        return {
            "prompt": text,
            "chosen": sample["chosen"][-1]["content"],
            "rejected": sample["rejected"][-1]["content"],
        }

    row = {"chosen": [user("Q"), assistant("A")], "rejected": [assistant("B")]}
    wrapped = RowTransform(
        argilla_with_template,
        "chat_template.argilla",
        "datasets[0]",
        frozenset({"system"}),
        check_argilla_row,
        "Be brief.",
    )
    assert wrapped(dict(row), 0, tokenizer=tiny_tokenizer)["prompt"].startswith("<|system|>Be brief.<|end|><|user|>Q")
    no_system = copy.deepcopy(tiny_tokenizer)
    no_system.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    wrapped = RowTransform(
        argilla_with_template,
        "chat_template.argilla",
        "datasets[0]",
        frozenset({"system"}),
        check_argilla_row,
        "Be brief.",
    )
    with pytest.raises(
        ValueError,
        match=r"datasets\[0\]: default_system_message is set but the chat template renders "
        r"no system turn",
    ):
        wrapped(dict(row), 0, tokenizer=no_system)


def test_default_system_message_is_refused_for_a_type_without_a_system_field():
    from orpo_plugin.axolotl.dataset_types import check_default_system

    cfg = {
        "default_system_message": "Be brief.",
        "datasets": [{"path": "a.jsonl", "type": "chatml.intel"}, {"path": "b.jsonl", "type": "chatml.argilla_chat"}],
    }
    with pytest.raises(ValueError, match=re.escape("datasets[1] (b.jsonl, type: chatml.argilla_chat) has no system")):
        check_default_system(cfg)
    check_default_system({**cfg, "datasets": cfg["datasets"][:1]})
    check_default_system({"datasets": cfg["datasets"]})  # not set: nothing to honour
