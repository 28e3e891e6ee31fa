"""Chat templates shaped like real model families', written for the tests, on tokenizers trained on the spot.

Each `TemplateCase` holds a Jinja template, the special tokens it uses, the tokenizer's BOS/EOS/pad, and what a
correct tokenization must do with it: whether BOS is prepended (the template does not write it) and whether EOS is
appended (the template ends a turn with no end-of-turn token of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'system' %}{{ '[SYS] ' + m['content'] + ' [/SYS]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHATML_THINK = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
)
CHATML_NO_BOS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAIN_TURNS = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class TemplateCase:
    name: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    end_of_turn: str | None  # the special token the template closes a turn with (None: none)
    prepends_bos: bool  # the tokenizer has a BOS the template does not write
    appends_eos: bool  # no end-of-turn token: EOS is appended to each response
    added: tuple[str, ...] = field(default=())  # added tokens that are not special (e.g. <think>)


CASES = [
    TemplateCase(
        "llama3",
        LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|pad|>",
        "<|eot_id|>",
        prepends_bos=False,
        appends_eos=False,
    ),
    TemplateCase(
        "gemma",
        GEMMA,
        ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        prepends_bos=False,
        appends_eos=False,
    ),
    TemplateCase(
        "mistral",
        MISTRAL,
        ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"),
        "<s>",
        "</s>",
        "<unk>",
        "</s>",
        prepends_bos=False,
        appends_eos=False,
    ),
    TemplateCase(
        "phi3",
        PHI3,
        ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|end|>",
        prepends_bos=True,
        appends_eos=False,
    ),
    TemplateCase(
        "chatml-think",
        CHATML_THINK,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        prepends_bos=False,
        appends_eos=False,
        added=("<think>", "</think>"),
    ),
    TemplateCase(
        "chatml-no-bos",
        CHATML_NO_BOS,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|im_end|>",
        prepends_bos=False,
        appends_eos=False,
    ),
    TemplateCase(
        "plain-turns", PLAIN_TURNS, ("</s>", "<pad>"), None, "</s>", "<pad>", None, prepends_bos=False, appends_eos=True
    ),
]

CORPUS = [
    "What color is the sky? Blue. Green. The sky is blue. Name a fruit. apple banana dog cat.",
    "Be brief. Answer the question. Is fire hot? Yes. No. Fire is hot. system user assistant model",
    "one two three four five six seven eight nine ten. Tell me a colour. Blue. Loud.",
] * 4


def build_template_tokenizer(case: TemplateCase):
    """A byte-level BPE trained on CORPUS with the case's special tokens, BOS/EOS/pad and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(case.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if case.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in case.added])
    named = {"bos_token": case.bos, "eos_token": case.eos, "pad_token": case.pad}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        additional_special_tokens=[t for t in case.specials if t not in named.values()],
    )
    fast.chat_template = case.template
    assert (fast.bos_token_id is None) == (case.bos is None)
    return fast


def _common_chars(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def rendered_ids(tok, messages: list[dict], appends_eos: bool) -> list[int]:
    """What a correct tokenization of a whole conversation is: the template's rendering tokenized as is (no special
    tokens added), one BOS first when the tokenizer has one the rendering lacks, and EOS last only when the template
    closes turns with no end-of-turn token."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
        ids = [tok.bos_token_id] + ids
    return ids + [tok.eos_token_id] if appends_eos else ids


def assert_rendering(tok, got: dict, prompt: list[dict], chosen: list[dict], rejected: list[dict], appends_eos: bool):
    """prompt_input_ids + <response>_input_ids is exactly the rendering of prompt + response (see rendered_ids), and
    the prompt ends where the template's generation prompt does (`add_generation_prompt=True`; where a template
    renders that prompt differently from a finished turn, e.g. an empty `<think>` block, where the two agree), so
    the generation prompt is never trained as part of a response."""
    generation_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    agreed = min(
        _common_chars(generation_prompt, tok.apply_chat_template(prompt + r, tokenize=False))
        for r in (chosen, rejected)
    )
    want = tok(generation_prompt[:agreed], add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and want[:1] != [tok.bos_token_id]:
        want = [tok.bos_token_id] + want
    assert list(got["prompt_input_ids"]) == want, (
        f"prompt: {tok.decode(got['prompt_input_ids'])!r} != {tok.decode(want)!r}"
    )
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        ids = list(got["prompt_input_ids"]) + list(got[f"{name}_input_ids"])
        assert ids == rendered_ids(tok, prompt + response, appends_eos), (
            f"{name}: {tok.decode(ids)!r} != {tok.decode(rendered_ids(tok, prompt + response, appends_eos))!r}"
        )
        if tok.bos_token_id is not None:  # one BOS first (SmolLM2's BOS, <|im_start|>, also opens every turn)
            assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, f"{name}: {ids[:3]}"
        assert len(got[f"{name}_input_ids"]) > 0
