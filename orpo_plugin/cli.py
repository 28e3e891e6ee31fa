"""`orpo-plugin train|demo|eval`: the command line, following TRL's TrlParser conventions (`--config x.yaml`)."""

from __future__ import annotations

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

    train = load_preference_dataset(
        script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config
    )
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = load_preference_dataset(
            script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config
        )

    from transformers import AutoProcessor, AutoTokenizer

    from .vision import has_images

    # pairs with images: the model's processor (its tokenizer, image processor and chat template)
    auto = AutoProcessor if has_images(train.column_names) else AutoTokenizer
    tokenizer = auto.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
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
    from .demo import cli as demo_cli

    return demo_cli.main(argv)


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
