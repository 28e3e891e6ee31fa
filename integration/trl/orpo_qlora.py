"""A TRL user's ORPO script, unchanged but for one import line.

    python integration/trl/orpo_qlora.py --config configs/trl/tiny-cpu-orpo.yaml \
        --model_name_or_path PATH --dataset_name data.jsonl --output_dir out
"""

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

# from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from orpo_plugin import ORPOConfig, ORPOTrainer

if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, ORPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

    quantization_config = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
        device_map={"": "cpu"} if training_args.use_cpu else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = datasets.load_dataset("json", data_files=script_args.dataset_name, split="train")

    trainer = ORPOTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
