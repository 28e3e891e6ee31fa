"""Write a tiny local Llama + tokenizer and a `chat_template.argilla` JSONL for the Axolotl end-to-end runs.

    python integration/axolotl/fixtures.py OUT_DIR      ->  OUT_DIR/model/ (save_pretrained), OUT_DIR/prefs.jsonl

Run it with the Axolotl venv's python, so the model is saved by the transformers version Axolotl loads it with.
Nothing is downloaded: the tokenizer is a BPE trained on the spot, the model is random-init (fixed seed).
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


def write_fixtures(out: Path, rows: int = 32, seed: int = 0) -> dict[str, str]:
    from orpo_plugin.toy import build_model, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    data = make_rows(rows, seed)
    corpus = [m["content"] for r in data for m in r["chosen"] + r["rejected"]] + WORDS
    tokenizer = build_tokenizer(corpus, vocab_size=512)
    model = build_model(
        len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=512,
        seed=seed,
    )
    model_dir = out / "model"
    tokenizer.save_pretrained(model_dir)
    model.save_pretrained(model_dir)
    data_path = out / "prefs.jsonl"
    with open(data_path, "w", encoding="utf-8") as f:
        for row in data:
            f.write(json.dumps(row) + "\n")
    return {"model": str(model_dir), "data": str(data_path)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("outputs/axolotl-tiny"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(write_fixtures(args.out, args.rows, args.seed)))


if __name__ == "__main__":
    main()
