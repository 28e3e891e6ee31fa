"""The offline demo: a tiny Llama learns a content preference with ORPO on CPU in a minute or two.

The data: "Name three fruits." -> chosen names three fruits, rejected names three words of another category.
The model has to read the prompt to prefer the chosen response; held-out pairs use word combinations never
seen in training. Everything (tokenizer, model, data) is built locally; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "animals": ["dog", "cat", "horse", "tiger", "zebra", "mouse", "eagle", "shark", "whale", "camel"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "pliers", "axe", "ladder"],
}
TEMPLATES = ["Name three {c}.", "List three {c}, please.", "Give me three {c}:", "Which three {c} come to mind?"]


def make_pairs(n: int, seed: int, held_out: bool = False) -> list[dict[str, str]]:
    """Preference pairs; training uses the first two templates, held-out pairs the last two."""
    rng = random.Random(seed)
    templates = TEMPLATES[2:] if held_out else TEMPLATES[:2]
    names = list(CATEGORIES)
    rows = []
    for _ in range(n):
        cat, other = rng.sample(names, 2)
        rows.append(
            {
                "prompt": rng.choice(templates).format(c=cat),
                "chosen": " " + " ".join(rng.sample(CATEGORIES[cat], 3)) + ".",
                "rejected": " " + " ".join(rng.sample(CATEGORIES[other], 3)) + ".",
            }
        )
    return rows


def _corpus() -> list[str]:
    words = [w for ws in CATEGORIES.values() for w in ws]
    texts = [t.format(c=c) for t in TEMPLATES for c in CATEGORIES] + [" " + w + "." for w in words]
    return texts * 4 + [" ".join(words)]


def build(seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    from .toy import build_model, build_tokenizer

    tokenizer = build_tokenizer(_corpus(), vocab_size=400)
    model = build_model(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=4, seed=seed)
    return tokenizer, model


def held_out_accuracy(model, tokenizer, rows) -> dict[str, float]:
    from .data import prepare_dataset
    from .evaluation import pair_logps, preference_metrics

    pairs, _ = prepare_dataset(rows, tokenizer, max_length=64, name="held-out")
    chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id)
    return preference_metrics(chosen, rejected)


def run_demo(
    output_dir: str = "orpo-demo",
    steps: int = 120,
    seed: int = 0,
    train_pairs: int = 480,
    eval_pairs: int = 200,
    beta: float = 0.5,
    learning_rate: float = 3e-3,
    packing: bool = True,
    mode: str = "orpo",
    quiet: bool = False,
) -> dict:
    """Train the demo model (ORPO, or SFT on chosen only when mode='sft'); return before/after held-out metrics."""
    import torch

    from .callbacks import LogpsPlotCallback, MetricsFileCallback
    from .trainer import ORPOConfig, ORPOTrainer

    torch.manual_seed(seed)
    os.makedirs(output_dir, exist_ok=True)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    tokenizer, model = build(seed)
    train_rows = make_pairs(train_pairs, seed)
    eval_rows = make_pairs(eval_pairs, seed + 1, held_out=True)
    before = held_out_accuracy(model, tokenizer, eval_rows)

    args = ORPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
        beta=0.0 if mode == "sft" else beta,
        max_length=64,
        packing=packing,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        seed=seed,
        disable_tqdm=quiet,
        dataloader_num_workers=0,
    )
    trainer = ORPOTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(), LogpsPlotCallback()],
    )
    start = time.time()
    trainer.train()
    elapsed = time.time() - start
    after = held_out_accuracy(trainer.model, tokenizer, eval_rows)
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    result = {"mode": mode, "before": before, "after": after, "train_seconds": elapsed, "steps": steps}
    with open(os.path.join(output_dir, "demo_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    result = run_demo(output_dir=args.output_dir, steps=args.steps, seed=args.seed, packing=not args.no_packing)
    b, a = result["before"], result["after"]
    print()
    print(f"held-out preference accuracy (log odds chosen > rejected), {a['pairs']} pairs never seen in training:")
    print(f"  before ORPO: {b['accuracy']:.3f}   (log-odds margin {b['log_odds_margin']:+.3f})")
    print(f"  after  ORPO: {a['accuracy']:.3f}   (log-odds margin {a['log_odds_margin']:+.3f})")
    print(f"trained {result['steps']} steps in {result['train_seconds']:.0f} s; wrote model, metrics.jsonl and "
          f"logps.png to {args.output_dir}")
    if a["accuracy"] < 0.9:
        print("warning: held-out accuracy after training is below 0.9")
        return 1
    return 0
