"""`orpo-plugin eval`: preference accuracy and log-odds margin of a model on a preference dataset, and optionally
PID/AID diversity of its samples (ORPO paper §7.2). Writes a JSON report and prints a table."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("orpo_plugin")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orpo-plugin eval",
        description="Preference accuracy (log odds of chosen > rejected), mean log-odds margin and mean log-probs "
        "of a model on a preference dataset; with --diversity, PID/AID of sampled responses.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="local model directory (from save_pretrained)")
    g.add_argument("--adapter", default=None, help="local PEFT adapter directory to apply on --model")
    g.add_argument("--dataset", required=True, help="a .json/.jsonl/.parquet file or a dataset directory")
    g.add_argument("--split", default="test", help="split of a dataset dir or {split: rows} JSON (default test)")
    g.add_argument("--max_pairs", type=int, default=None, help="evaluate only the first N pairs")
    g.add_argument("--max_length", type=int, default=1024, help="pairs are truncated like in training (default 1024)")
    g.add_argument("--batch_size", type=int, default=16, help="pairs per forward (default 16)")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="model weights dtype (default: as saved)")
    g.add_argument("--output", default="eval_report.json", help="where to write the JSON report")
    d = p.add_argument_group("diversity (PID/AID)")
    d.add_argument("--diversity", action="store_true", help="also sample responses and report PID and AID")
    d.add_argument("--num_prompts", type=int, default=32, help="distinct prompts to sample for (N, default 32)")
    d.add_argument("--num_samples", type=int, default=5, help="samples per prompt (K, default 5)")
    d.add_argument("--max_new_tokens", type=int, default=128)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--embedder",
        default=None,
        help="local sentence-embedding model directory (default: all-MiniLM-L6-v2 of the [eval] extra)",
    )
    d.add_argument("--embed_batch_size", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_model(model_path: str, adapter: str | None, device: str, dtype: str):
    """The causal LM (PEFT adapter applied when given) and its tokenizer (the adapter's when saved with it)."""
    from .model_setup import load_causal_lm, load_tokenizer

    for name, path in (("--model", model_path), ("--adapter", adapter)):
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"{name} '{path}' is not a directory (pass a local save_pretrained directory)")
    model = load_causal_lm(model_path, dtype, device=device, adapter=adapter, what="--dtype")
    tokenizer_dir = model_path
    if adapter is not None and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        tokenizer_dir = adapter
    model.eval()
    return model, load_tokenizer(tokenizer_dir)


def evaluate(args) -> dict:
    """Run the evaluation described by parsed `args`; return the report (also written to args.output)."""
    import torch

    from .data import load_preference_dataset, prepare_dataset
    from .evaluation import (
        SentenceEmbedder,
        diversity,
        pair_logps,
        preference_metrics,
        resolve_embedder,
        sample_responses,
        unique_prompts,
    )

    if args.diversity:
        if args.num_samples < 2:
            raise ValueError(f"--num_samples must be at least 2 for PID, got {args.num_samples}")
        if args.num_prompts < 2:
            raise ValueError(f"--num_prompts must be at least 2 for AID, got {args.num_prompts}")
        embedder_path = resolve_embedder(args.embedder)  # fail before any model work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    model, tokenizer = load_model(args.model, args.adapter, device, args.dtype)
    try:
        rows = load_preference_dataset(args.dataset, args.split)
    except KeyError:
        raise ValueError(f"--dataset {args.dataset} has no split '{args.split}'; choose one with --split") from None
    if args.max_pairs is not None:
        rows = rows.select(range(min(args.max_pairs, len(rows))))
    pairs, stats = prepare_dataset(rows, tokenizer, max_length=args.max_length, name="eval")
    chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id, batch_size=args.batch_size)
    report = {
        "model": args.model,
        "adapter": args.adapter,
        "dataset": args.dataset,
        "max_length": args.max_length,
        "data": {
            "rows": stats.rows,
            "pairs": stats.kept,
            "dropped": dict(stats.dropped),
            "truncated_responses": stats.truncated_responses,
        },
        "preference": preference_metrics(chosen, rejected),
    }

    if args.diversity:
        prompts = unique_prompts(pairs, args.num_prompts)
        if len(prompts) < 2:
            raise ValueError(f"AID needs at least 2 distinct prompts; the dataset has {len(prompts)}")
        samples = sample_responses(
            model,
            tokenizer,
            prompts,
            args.num_samples,
            args.max_new_tokens,
            args.temperature,
            args.seed,
            progress=not args.quiet,
        )
        del model
        embedder = SentenceEmbedder(embedder_path, device=device)
        flat = [s for group in samples for s in group]
        emb = embedder.encode(flat, batch_size=args.embed_batch_size, progress=not args.quiet)
        emb = emb.view(len(prompts), args.num_samples, -1)  # [N, K, D]
        report["diversity"] = {
            **diversity(emb),
            "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "embedder": embedder_path,
            "prompts": tokenizer.batch_decode(prompts, skip_special_tokens=True),
            "samples": samples,
        }

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def format_table(report: dict) -> str:
    pref = report["preference"]
    lines = [
        ("pairs", f"{pref['pairs']}"),
        ("preference accuracy", f"{pref['accuracy']:.4f}"),
        ("log-odds margin (mean)", f"{pref['log_odds_margin']:+.4f}"),
        ("logps/chosen (mean)", f"{pref['logps_chosen']:.4f}"),
        ("logps/rejected (mean)", f"{pref['logps_rejected']:.4f}"),
    ]
    if "diversity" in report:
        div = report["diversity"]
        lines += [
            (f"PID ({div['num_samples']} samples x {div['num_prompts']} prompts)", f"{div['pid']:.4f}"),
            ("AID", f"{div['aid']:.4f}"),
        ]
    width = max(len(name) for name, _ in lines)
    rule = "-" * (width + 14)
    body = "\n".join(f"{name:<{width}}  {value:>12}" for name, value in lines)
    note = "\n(PID/AID: mean cosine similarity of samples; lower is more diverse)" if "diversity" in report else ""
    return f"{rule}\n{'metric':<{width}}  {'value':>12}\n{rule}\n{body}\n{rule}{note}"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        report = evaluate(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"orpo-plugin eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"report written to {args.output}")
    return 0
