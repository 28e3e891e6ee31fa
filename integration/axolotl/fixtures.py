"""Write a tiny local Llama + tokenizer, a `chat_template.argilla` JSONL and one JSONL per preference dataset type
for the Axolotl end-to-end runs.

    python integration/axolotl/fixtures.py OUT_DIR      ->  OUT_DIR/model/ (save_pretrained), OUT_DIR/prefs.jsonl,
                                                            OUT_DIR/types/<name>.jsonl (see TYPE_ROWS)

Run it with the Axolotl venv's python, so the model is saved by the transformers version Axolotl loads it with.
Nothing is downloaded: the tokenizer is a BPE trained on the spot, the model is random-init (fixed seed). The tokenizer
also knows the special tokens of the ChatML and Llama 3 chat formats (TEMPLATE_TOKENS), so a config can give it the
BOS/EOS of either family with `special_tokens:` as it would for a real model of that family.
`configs/axolotl/tiny-cpu-orpo.yml` trains on `outputs/axolotl-tiny` as written by this script.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "the a river mountain cloud quick slow bright dark green blue stone tree light wind water fire road city "
    "garden window music paper story answer question simple careful honest helpful clear short long because "
    "therefore however first second finally explain describe list compare why how what when where small large"
).split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Argilla-style rows: `chosen`/`rejected` = [user, assistant] messages; some rows carry a `system` string."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(n):
        question = sentence(4, 30)
        chosen = sentence(3, 40)
        rejected = sentence(3, 40)
        while rejected == chosen:
            rejected = sentence(3, 40)
        row = {
            "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": rejected}],
        }
        if i % 3 == 0:
            row["system"] = "You are a careful and helpful assistant."
        rows.append(row)
    return rows


# ChatML's and Llama 3's turn markers, added to the tiny tokenizer as special tokens (one id each)
TEMPLATE_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def make_type_rows(name: str, n: int, seed: int) -> list[dict]:
    """`n` rows in the format Axolotl's preference dataset type `name` reads (its DPO strategies' own field names).

    Names are Axolotl types; `chat_template.default+fields` and `+mappings` are `chat_template.default` with its field
    options set as in TYPE_FIELD_OPTIONS.
    """
    rng = random.Random(f"{name}/{seed}")

    def sentence(lo: int = 3, hi: int = 14) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    def pair() -> tuple[str, str]:
        a, b = sentence(), sentence()
        while a == b:
            b = sentence()
        return a, b

    module, _, fn = name.partition(".")
    rows = []
    for i in range(n):
        question, (good, bad) = sentence(), pair()
        system = "You are a careful and helpful assistant." if i % 2 == 0 else ""
        user = {"role": "user", "content": question}
        turn = lambda answer, user=user: [user, {"role": "assistant", "content": answer}]  # noqa: E731
        if fn == "default" and module in ("chatml", "llama3"):
            # the prompt/chosen/rejected keys this strategy also accepts: question + *_response, or instruction
            keys = (
                ("question", "chosen_response", "rejected_response")
                if module == "chatml"
                else ("instruction", "chosen", "rejected")
            )
            row = dict(zip(keys, (question, good, bad)), system=system)
        elif fn in ("argilla_chat",):
            row = {"chosen": turn(good), "rejected": turn(bad)}
        elif fn == "icr":
            row = {"system": system, "input": question, "chosen": good, "rejected": bad}
        elif fn == "intel":
            row = {"system": system, "question": question, "chosen": good, "rejected": bad}
        elif fn == "prompt_pairs":
            row = {"system": system, "prompt": question, "chosen": good, "rejected": bad}
        elif fn == "ultra":
            row = {"prompt": question, "chosen": turn(good), "rejected": turn(bad)}
        elif name == "zephyr.nectar":
            worst = sentence()
            row = {
                "prompt": question,
                "answers": [
                    {"answer": good, "rank": 1.0},
                    {"answer": bad, "rank": 2.0},
                    {"answer": worst, "rank": 3.0},
                ],
            }
        elif name == "user_defined.default":
            row = {"sys": system, "instruction": question, "good": good, "bad": bad}
        elif name == "passthrough.default":
            row = {"prompt": f"Q: {question}\nA:", "chosen": f" {good}", "rejected": f" {bad}"}
        elif name == "chat_template.default":
            messages = ([{"role": "system", "content": system}] if system else []) + [user]
            row = {
                "messages": messages,
                "chosen": {"role": "assistant", "content": good},
                "rejected": {"role": "assistant", "content": bad},
            }
        elif name == "chat_template.default+fields":  # the messages/chosen/rejected columns named otherwise
            answer = {"role": "assistant", "content": bad}
            row = {"conversation": [user], "preferred": turn(good), "dispreferred": answer}
        elif name == "chat_template.default+mappings":  # the message keys and roles named otherwise
            said = lambda who, text: {"from": who, "value": text}  # noqa: E731
            row = {
                "messages": ([said("system", system)] if system else []) + [said("human", question)],
                "chosen": said("gpt", good),
                "rejected": said("gpt", bad),
            }
        elif name == "chat_template.argilla":
            row = {"chosen": turn(good), "rejected": turn(bad)}
            if system:
                row["system"] = system
        else:
            raise ValueError(f"no fixture rows for dataset type {name!r}")
        rows.append(row)
    return rows


# dataset keys for `chat_template.default+fields` and `+mappings`. Axolotl 0.19's config schema reads a dataset entry
# with DPO keys (field_chosen/field_rejected) or with SFT keys (ds_type, message_property_mappings, roles), never both:
# the other kind is dropped (the plugin stops when that happens, see ORPOPlugin.load_datasets). So: two entries.
TYPE_FIELD_OPTIONS = {
    "chat_template.default+fields": {
        "field_messages": "conversation",
        "field_chosen": "preferred",
        "field_rejected": "dispreferred",
    },
    "chat_template.default+mappings": {
        "ds_type": "json",
        "message_property_mappings": {"role": "from", "content": "value"},
        "roles": {"user": ["human"], "assistant": ["gpt"], "system": ["system"]},
    },
}
# user_defined.default: the mapping under `type:` for the rows above
USER_DEFINED_TYPE = {
    "field_prompt": "instruction",
    "field_system": "sys",
    "field_chosen": "good",
    "field_rejected": "bad",
    "prompt_format": "{system}\nQ: {prompt}\nA:",
    "chosen_format": " {chosen}",
    "rejected_format": " {rejected}",
}
TYPE_FIXTURES = (
    "chat_template.argilla",
    "chat_template.argilla_chat",
    "chat_template.default",
    "chat_template.default+fields",
    "chat_template.default+mappings",
    *(
        f"{m}.{f}"
        for m in ("chatml", "llama3")
        for f in ("default", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")
    ),
    "zephyr.nectar",
    "user_defined.default",
    "passthrough.default",
)


def write_type_fixtures(out: Path, rows: int = 4, seed: int = 0) -> dict[str, str]:
    """OUT/types/<name>.jsonl for every name in TYPE_FIXTURES."""
    folder = out / "types"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in TYPE_FIXTURES:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_type_rows(name, rows, seed)), encoding="utf-8")
        paths[name] = str(path)
    return paths


def write_fixtures(out: Path, rows: int = 32, seed: int = 0) -> dict[str, str]:
    from orpo_plugin.toy import build_model, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    data = make_rows(rows, seed)
    corpus = [m["content"] for r in data for m in r["chosen"] + r["rejected"]] + WORDS
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    tokenizer.add_tokens(TEMPLATE_TOKENS, special_tokens=True)
    model = build_model(
        len(tokenizer),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        seed=seed,
    )
    model_dir = out / "model"
    tokenizer.save_pretrained(model_dir)
    model.save_pretrained(model_dir)
    data_path = out / "prefs.jsonl"
    with open(data_path, "w", encoding="utf-8") as f:
        for row in data:
            f.write(json.dumps(row) + "\n")
    types = write_type_fixtures(out, seed=seed)
    return {"model": str(model_dir), "data": str(data_path), "types": types}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("outputs/axolotl-tiny"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(write_fixtures(args.out, args.rows, args.seed)))


if __name__ == "__main__":
    main()
