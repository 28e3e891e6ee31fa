"""SmolLM2's real ChatML template: every row format tokenizes to exactly what the template renders, one
`<|im_end|>` per turn (its BOS is `<|im_start|>`, which the rendering starts with); the same rule on the text
Axolotl's `chat_template.argilla` transform renders with it (Axolotl's own code, in its virtualenv)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers.messages import assistant, system, user  # tests/helpers
from helpers.templates import assert_rendering  # tests/helpers

from orpo_plugin.data import end_of_turn_ids, prepare_dataset

REPO = Path(__file__).resolve().parents[2]


Q = "What is the capital of France?"
FORMATS = {
    "conversational": (
        {"prompt": [user(Q)], "chosen": [assistant("Paris.")], "rejected": [assistant("Rome.")]},
        [user(Q)],
        [assistant("Paris.")],
        [assistant("Rome.")],
    ),
    "with system and history": (
        {
            "prompt": [system("Be brief."), user("Hi."), assistant("Hello."), user(Q)],
            "chosen": [assistant("Paris.")],
            "rejected": [assistant("Rome.")],
        },
        [system("Be brief."), user("Hi."), assistant("Hello."), user(Q)],
        [assistant("Paris.")],
        [assistant("Rome.")],
    ),
    "implicit prompt": (
        {"chosen": [user(Q), assistant("Paris.")], "rejected": [user(Q), assistant("Rome.")]},
        [user(Q)],
        [assistant("Paris.")],
        [assistant("Rome.")],
    ),
    "mixed": (
        {"prompt": Q, "chosen": [user(Q), assistant("Paris.")], "rejected": [user(Q), assistant("Rome.")]},
        [user(Q)],
        [assistant("Paris.")],
        [assistant("Rome.")],
    ),
    "argilla": (
        {"system": "Be brief.", "chosen": [user(Q), assistant("Paris.")], "rejected": [user(Q), assistant("Rome.")]},
        [system("Be brief."), user(Q)],
        [assistant("Paris.")],
        [assistant("Rome.")],
    ),
}


def test_pretrained_models_chat_flags_match_their_tokenizers(smollm2_tok, gemma3_tok):
    """orpo_plugin.pretrained's `chat` (the demo refuses a model without one) says what each tokenizer has."""
    from orpo_plugin import pretrained

    assert pretrained.MODELS["smollm2"].chat and smollm2_tok.chat_template
    assert not pretrained.MODELS["gemma3"].chat and getattr(gemma3_tok, "chat_template", None) is None


def test_end_of_turn_of_smollm2(smollm2_tok):
    assert smollm2_tok.bos_token == "<|im_start|>" and smollm2_tok.eos_token == "<|im_end|>"
    assert {smollm2_tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(smollm2_tok)} == {"<|im_end|>"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_smollm2_rows_tokenize_to_the_template_rendering(smollm2_tok, fmt):
    row, prompt, chosen, rejected = FORMATS[fmt]
    ds, _ = prepare_dataset([row], smollm2_tok)
    assert_rendering(smollm2_tok, ds[0], prompt, chosen, rejected, appends_eos=False)
    for name in ("chosen_input_ids", "rejected_input_ids"):
        text = smollm2_tok.decode(ds[0][name])
        assert text.endswith(".<|im_end|>\n") and text.count("<|im_end|>") == 1


AXOLOTL_CHECK = r"""
import json, sys
from transformers import AutoTokenizer
from axolotl.prompt_strategies.orpo.chat_template import argilla
from axolotl.utils.dict import DictDefault
from orpo_plugin.data import prepare_dataset

tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = json.loads(sys.argv[2])
cfg = DictDefault({"chat_template": "tokenizer_default", "datasets": [{"type": "chat_template.argilla"}]})
transform = argilla(cfg)
texts = [transform(dict(r), tokenizer=tok) for r in rows]
ds, _ = prepare_dataset([{k: t[k] for k in ("prompt", "chosen", "rejected")} for t in texts], tok)
print(json.dumps({"texts": texts, "ids": [{k: list(r[k]) for k in ("prompt_input_ids", "chosen_input_ids",
      "rejected_input_ids")} for r in ds]}))
"""


def test_axolotl_argilla_text_tokenizes_to_the_template_rendering(smollm2_path, smollm2_tok):
    """Axolotl's ORPO argilla transform renders rows to text with the chat template; the trainer then tokenizes
    that text. Run in Axolotl's virtualenv (integration/axolotl/run.sh --venv), on SmolLM2's tokenizer."""
    build = subprocess.run(
        ["bash", str(REPO / "integration" / "axolotl" / "run.sh"), "--venv"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    python = build.stdout.strip().splitlines()[-1]
    rows = [
        {"system": "Be brief.", "chosen": [user(Q), assistant("Paris.")], "rejected": [user(Q), assistant("Rome.")]},
        {
            "chosen": [user("Name a fruit."), assistant("An apple.")],
            "rejected": [user("Name a fruit."), assistant("A hammer.")],
        },
    ]
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [python, "-c", AXOLOTL_CHECK, str(smollm2_path), json.dumps(rows)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    expected = [
        ([system("Be brief."), user(Q)], [assistant("Paris.")], [assistant("Rome.")]),
        ([user("Name a fruit.")], [assistant("An apple.")], [assistant("A hammer.")]),
    ]
    assert len(out["ids"]) == len(out["texts"]) == len(expected), out  # every row kept, none dropped
    for ids, text, (prompt, chosen, rejected) in zip(out["ids"], out["texts"], expected):
        assert text["chosen"].endswith("<|im_end|>\n")  # Axolotl's text ends the turn as the template does
        assert_rendering(smollm2_tok, ids, prompt, chosen, rejected, appends_eos=False)
