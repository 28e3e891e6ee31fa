"""The toy demo (`orpo-plugin demo --model tiny`): a tiny Llama learns a content preference with ORPO on CPU in a
minute or two (`orpo_plugin.demo.main` runs the real-model demo, `demo.real`, for any other --model).

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

from .real import logps_history

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
    from ..toy import build_model, build_tokenizer

    tokenizer = build_tokenizer(_corpus(), vocab_size=400)
    model = build_model(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=4, seed=seed)
    return tokenizer, model


def held_out_accuracy(model, tokenizer, rows) -> dict[str, float]:
    from ..data import prepare_dataset
    from ..evaluation import pair_logps, preference_metrics

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

    from ..callbacks import LogpsPlotCallback, MetricsFileCallback
    from ..config import ORPOConfig
    from ..trainer import ORPOTrainer

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
        use_cpu=True,  # the demo is the offline CPU run; bf16 and gradient checkpointing stay at their defaults
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


def plot_compare(histories: dict[str, list[dict]], path: str) -> str:
    """Chosen (solid) and rejected (dashed) mean log-prob per step for each run, and their margins below."""
    from ..callbacks import plot_logps

    colors = {"sft": "tab:orange", "orpo": "tab:blue"}
    runs = [(mode.upper(), rows, colors.get(mode)) for mode, rows in histories.items()]
    return plot_logps(runs, path, "SFT on chosen vs ORPO: same model, same data")


def compare_sft(
    output_dir: str = "orpo-demo-compare", steps: int = 60, seed: int = 0, packing: bool = False, quiet: bool = False
) -> dict:
    """Train the demo model twice on the same data, SFT on chosen only and ORPO; compare their log-prob curves.

    Runs go to `<output_dir>/sft` and `<output_dir>/orpo` (each with its metrics.jsonl); writes
    `compare_sft.png` (chosen/rejected log-prob per step for both) and `compare_sft.json` (held-out accuracy,
    first/last logged log-probs, final margins). The default demo's data, model and hyperparameters, but 60 steps
    of padded batches: on CPU that is a quarter of the demo's packed-batch time for the pair of runs, and already
    shows the effect (SFT lifts rejected along with chosen; ORPO holds it down).
    """
    os.makedirs(output_dir, exist_ok=True)
    result = {"steps": steps, "seed": seed, "runs": {}}
    histories = {}
    for mode in ("sft", "orpo"):
        run_dir = os.path.join(output_dir, mode)
        run = run_demo(output_dir=run_dir, steps=steps, seed=seed, packing=packing, mode=mode, quiet=quiet)
        rows = logps_history(os.path.join(run_dir, "metrics.jsonl"))
        histories[mode] = rows
        first, last = rows[0], rows[-1]
        result["runs"][mode] = {
            "dir": run_dir,
            "before": run["before"],
            "after": run["after"],
            "train_seconds": run["train_seconds"],
            "first": {"step": first["step"], "chosen": first["logps/chosen"], "rejected": first["logps/rejected"]},
            "last": {"step": last["step"], "chosen": last["logps/chosen"], "rejected": last["logps/rejected"]},
            "final_margin": last["logps/chosen"] - last["logps/rejected"],
        }
    result["plot"] = plot_compare(histories, os.path.join(output_dir, "compare_sft.png"))
    with open(os.path.join(output_dir, "compare_sft.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def format_compare(result: dict) -> str:
    """The comparison table: held-out accuracy and margin, training log-probs first -> last."""
    header = (
        f"{'':5} {'held-out acc':>12} {'log-odds margin':>15} {'chosen logp':>17} {'rejected logp':>17} "
        f"{'final margin':>12}"
    )
    lines = [header, "-" * len(header)]
    for mode, run in result["runs"].items():
        a, f, la = run["after"], run["first"], run["last"]
        lines.append(
            f"{mode.upper():5} {a['accuracy']:>12.3f} {a['log_odds_margin']:>+15.3f} "
            f"{f['chosen']:>7.2f} -> {la['chosen']:>6.2f} {f['rejected']:>7.2f} -> {la['rejected']:>6.2f} "
            f"{run['final_margin']:>+12.3f}"
        )
    return "\n".join(lines)


def compare_main(args) -> int:
    """`orpo-plugin demo --compare-sft`: SFT vs ORPO on the demo data; 0 when ORPO separates more than SFT.

    `args.steps` (steps of each run) defaults to 60 when None; batches are padded (see `compare_sft`).
    """
    logging.basicConfig(level=logging.WARNING)
    steps = getattr(args, "steps", None) or 60
    result = compare_sft(output_dir=args.output_dir, steps=steps, seed=args.seed)
    print()
    print(
        f"SFT on chosen vs ORPO, {steps} steps each on the same data "
        f"(held-out: {result['runs']['orpo']['after']['pairs']} pairs never seen in training):"
    )
    print(format_compare(result))
    sft, orpo = result["runs"]["sft"], result["runs"]["orpo"]
    for mode, run in (("SFT", sft), ("ORPO", orpo)):
        moved = "raised" if run["last"]["rejected"] > run["first"]["rejected"] else "lowered"
        print(
            f"{mode} {moved} the rejected log-prob ({run['first']['rejected']:.2f} -> {run['last']['rejected']:.2f}) "
            f"while the chosen one went {run['first']['chosen']:.2f} -> {run['last']['chosen']:.2f}."
        )
    print(f"wrote {result['plot']} and compare_sft.json to {args.output_dir}")
    return 0 if orpo["final_margin"] > sft["final_margin"] else 1


def main(args) -> int:
    """`orpo-plugin demo --model tiny`: train the toy model (or, with --compare-sft, compare SFT and ORPO on it)."""
    if getattr(args, "compare_sft", False):
        return compare_main(args)
    logging.basicConfig(level=logging.WARNING)
    steps = args.steps if getattr(args, "steps", None) is not None else 120
    result = run_demo(output_dir=args.output_dir, steps=steps, seed=args.seed, packing=not args.no_packing)
    b, a = result["before"], result["after"]
    print()
    print(f"held-out preference accuracy (log odds chosen > rejected), {a['pairs']} pairs never seen in training:")
    print(f"  before ORPO: {b['accuracy']:.3f}   (log-odds margin {b['log_odds_margin']:+.3f})")
    print(f"  after  ORPO: {a['accuracy']:.3f}   (log-odds margin {a['log_odds_margin']:+.3f})")
    print(
        f"trained {result['steps']} steps in {result['train_seconds']:.0f} s; wrote model, metrics.jsonl and "
        f"logps.png to {args.output_dir}"
    )
    if a["accuracy"] < 0.9:
        print("warning: held-out accuracy after training is below 0.9")
        return 1
    return 0
