"""Every layout against the padded one, and the padded one against TRL, on pretrained SmolLM2 and Gemma 3.

One real training step each (`trainer.train()`, gradient checkpointing on: the default), float32 on CPU: the loss,
TRL's metrics and every gradient. SmolLM2 trains on conversational rows through its own ChatML template (TRL is
handed our ids there, since TRL appends a second end of turn: tests/helpers/trl_ref.py); Gemma 3 on plain text with
one pair longer than its 512-token sliding window, so that the window decides the result (checked by running the
same forward without it).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers.messages import assistant, user  # tests/helpers
from helpers.pairs import METRICS  # tests/helpers
from helpers.real import args, grad_diff, load, one_step  # tests/helpers
from helpers.trl_ref import pretokenized_trl_trainer, trl_rows  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.data import prepare_dataset

LAYOUTS = {
    "padding_free": dict(padding_free=True),
    "packing": dict(packing=True),
    "prefix_sharing": dict(prefix_sharing=True),
    "packing+prefix_sharing": dict(packing=True, prefix_sharing=True),
}


SYSTEM = {"role": "system", "content": "Be brief."}  # shorter than the template's default system message
CHAT_ROWS = [
    {
        "prompt": [SYSTEM, user("What is the capital of France?")],
        "chosen": [assistant("The capital of France is Paris.")],
        "rejected": [assistant("France is a country in Europe with many cities.")],
    },
    {
        "prompt": [user("Answer in one word: what color is a clear daytime sky?")],
        "chosen": [assistant("Blue.")],
        "rejected": [assistant("The sky can look many different colors depending on the time of day.")],
    },
    {"prompt": [SYSTEM, user("What is 7 times 6?")], "chosen": [assistant("42")], "rejected": [assistant("48")]},
    {
        "prompt": [user("Reply in all capital letters: say hello.")],
        "chosen": [assistant("HELLO!")],
        "rejected": [assistant("Hello! How can I help you today?")],
    },
]


def long_text(n_sentences: int) -> str:
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
    things = ["house", "car", "door", "kite", "boat", "lamp", "chair", "book"]
    return " ".join(f"The {things[i % 8]} number {i} is {colours[(3 * i) % 8]}." for i in range(n_sentences))


# one pair, past the window (a second, short one would double the padded runs' positions on 2 cores)
TEXT_ROWS = [
    {
        "prompt": long_text(60) + " Which colour is the house number 8?",
        "chosen": " The house number 8 is black.",
        "rejected": " It is a very nice house.",
    },
]

WINDOW_MIN = {"gemma3": 512}


def model_for(path):
    model = load(path)
    if model.config.vocab_size > 200_000:
        # Gemma 3: its tied 262,144 x 640 embedding stays frozen here (a third of the step's time on 2 cores); the
        # output layer's gradient at that vocabulary is checked in test_real_vocab.py
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def run(trainer_cls, config_cls, path, tok, rows, out, **kw):
    return one_step(
        trainer_cls,
        model=model_for(path),
        args=args(config_cls, out, max_length=1024, **kw),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )


def assert_same(t, ref, what, rel=2e-4):
    assert t.loss == pytest.approx(ref.loss, rel=1e-5, abs=1e-5), what
    for k in METRICS:
        assert t.logged[k] == pytest.approx(ref.logged[k], rel=1e-4, abs=1e-5), f"{what}: {k}"
    worst, where = grad_diff(t.grads, ref.grads)
    assert worst < rel, f"{what}: gradient of {where} differs by {worst:.2e} of its largest entry"


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model_case(request, smollm2_path, gemma3_path, smollm2_tok, gemma3_tok, tmp_path_factory):
    name = request.param
    path, tok = (smollm2_path, smollm2_tok) if name == "smollm2" else (gemma3_path, gemma3_tok)
    rows = CHAT_ROWS if name == "smollm2" else TEXT_ROWS
    out = tmp_path_factory.mktemp(name)
    padded = run(ORPOTrainer, ORPOConfig, path, tok, rows, out)
    return name, path, tok, rows, out, padded


def test_pairs_are_as_intended(model_case):
    name, _, tok, rows, _, padded = model_case
    ds = padded.train_dataset
    longest = max(
        len(p) + max(len(c), len(r))
        for p, c, r in zip(ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"])
    )
    if name == "gemma3":
        assert longest > WINDOW_MIN[name] + 20  # past the sliding window
        assert padded.config.sliding_window == WINDOW_MIN[name]
    else:  # the real ChatML template: every response ends `<|im_end|>\n`, once
        for c in list(ds["chosen_input_ids"]) + list(ds["rejected_input_ids"]):
            assert tok.decode(c).endswith("<|im_end|>\n") and tok.decode(c).count("<|im_end|>") == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_padded(model_case, layout):
    name, path, tok, rows, out, padded = model_case
    ours = run(ORPOTrainer, ORPOConfig, path, tok, rows, out, **LAYOUTS[layout])
    assert ours.gradient_checkpointing
    # the layout really ran: no padding where sequences lie end to end, each prompt computed once where shared
    assert padded.logged["tokens/padding_fraction"] > 0, padded.logged
    if layout != "prefix_sharing":
        assert ours.logged["tokens/padding_fraction"] == 0, ours.logged
    if "prefix_sharing" in layout:
        assert ours.logged["tokens/computed_per_trained"] < 0.9, ours.logged
    else:
        assert "tokens/computed_per_trained" not in ours.logged, ours.logged
    assert_same(ours, padded, f"{name} {layout}")


def test_padded_equals_trl(model_case):
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    name, path, tok, rows, out, padded = model_case
    if name == "smollm2":  # chat rows: TRL on our ids (TRL's own add `<|im_end|>` after `<|im_end|>\n`)
        prepared, _ = prepare_dataset(rows, tok, max_length=1024)
        theirs = run(pretokenized_trl_trainer(), TRLConfig, path, tok, trl_rows(prepared), out)
    else:  # plain text: TRL's own tokenization, which ours equals there
        theirs = run(TRLTrainer, TRLConfig, path, tok, rows, out)
        for key in ("chosen", "rejected"):
            ours_ids = [
                p + r
                for p, r in zip(padded.train_dataset["prompt_input_ids"], padded.train_dataset[f"{key}_input_ids"])
            ]
            assert sorted(ours_ids) == sorted(theirs.train_dataset[f"{key}_input_ids"])
    assert_same(padded, theirs, f"{name} padded vs TRL")


def test_the_sliding_window_decides_gemma3s_result(gemma3_path, gemma3_tok):
    """The long pair's log-probs change when the window is lifted: the parity above was tested where it matters."""
    model = load(gemma3_path).eval()
    ids = gemma3_tok(TEXT_ROWS[0]["prompt"] + TEXT_ROWS[0]["chosen"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 512 + 20
    with torch.no_grad():
        windowed = model(input_ids=ids, use_cache=False).logits[0, -30:].log_softmax(-1)
        model.config.sliding_window = 4096
        lifted = model(input_ids=ids, use_cache=False).logits[0, -30:].log_softmax(-1)
    assert (windowed - lifted).abs().max() > 1e-2
