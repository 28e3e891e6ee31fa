"""ORPO on a vision-language model in a TRL-style script: pairs with images, LoRA on the language model, train,
evaluate on held-out pairs, save.

    python examples/vision_quickstart.py HuggingFaceTB/SmolVLM-256M-Instruct     # a hub model (downloads it)
    python examples/vision_quickstart.py path/to/model_folder                    # any local folder with a processor
    python examples/vision_quickstart.py path/to/llava --packing --prefix_sharing  # LLaVA, Idefics3, SmolVLM

The data is drawn here: a colored square on a grey background, the question "What color is the square?", the right
color as the chosen answer and another color as the rejected one. The rows are in TRL's vision preference format
(docs/vision.md): an `images` column, a prompt whose user message holds a `{"type": "image"}` part, the answers as
assistant messages. The vision tower runs once per pair; it is not given a LoRA adapter here (only the language
model's attention projections are), so only the language model learns.
"""

from __future__ import annotations

import argparse
import json
import random

# orpo_plugin first: importing it silences dependency notices nobody can act on (orpo_plugin/_quiet.py)
from orpo_plugin import ORPOConfig, ORPOTrainer  # isort: skip

from peft import LoraConfig
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

COLORS = {"Red.": (220, 30, 30), "Green.": (30, 180, 60), "Blue.": (40, 60, 220), "Yellow.": (240, 220, 40)}
QUESTION = "What color is the square? Answer in one word."


def square(color: tuple[int, int, int], rng: random.Random, size: int = 64) -> Image.Image:
    """A square of `color` at a random place on a grey background."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    side = size // 2
    x, y = rng.randrange(size - side), rng.randrange(size - side)
    image.paste(color, (x, y, x + side, y + side))
    return image


def preference_rows(n: int, seed: int) -> list[dict]:
    """`n` pairs in TRL's vision preference format."""
    rng = random.Random(seed)
    names = list(COLORS)
    rows = []
    for i in range(n):
        right = names[i % len(names)]
        wrong = rng.choice([c for c in names if c != right])
        rows.append(
            {
                "images": [square(COLORS[right], rng)],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": right}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a vision-language model: a local folder or a hub name")
    p.add_argument("--output_dir", default="orpo-vision-quickstart")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--packing", action="store_true", help="pack pairs into rows (LLaVA, Idefics3, SmolVLM)")
    p.add_argument("--prefix_sharing", action="store_true", help="each prompt and its images computed once")
    args = p.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto")
    config = ORPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        beta=0.1,
        max_length=1024,  # a prompt with its image tokens is never cut: a longer one is dropped and counted
        packing=args.packing,
        prefix_sharing=args.prefix_sharing,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
    )
    # LoRA on the language model's attention only (Idefics3/SmolVLM call it text_model); the tower stays frozen
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=r".*(language_model|text_model).*\.(q|k|v|o)_proj")
    trainer = ORPOTrainer(
        model=model,
        args=config,
        train_dataset=preference_rows(32, seed=0),
        eval_dataset=preference_rows(8, seed=1),
        processing_class=processor,
        peft_config=lora,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(args.output_dir)
    summary = {
        "held-out accuracy before": before["eval_rewards/accuracies"],
        "held-out accuracy after": after["eval_rewards/accuracies"],
        "held-out margin before": before["eval_rewards/margins"],
        "held-out margin after": after["eval_rewards/margins"],
        "saved": args.output_dir,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
