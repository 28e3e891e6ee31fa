"""Evaluate one tiny model on a small eval set under each case of CASES, and write the eval metrics (and the
generations file of a case that generates) to a JSON file on the main process.

    accelerate launch --multi_gpu --num_processes 2 tests/helpers/eval_ranks.py FOLDER OUT.json   (2 processes)
    python tests/helpers/eval_ranks.py FOLDER OUT.json                                            (1 process)

FOLDER holds `model/` (a saved model and tokenizer) and `eval.jsonl` (explicit prompt/chosen/rejected rows).
"""

from __future__ import annotations

import json
import os
import sys

# name -> ORPOConfig fields; per_device_eval_batch_size 1 and 2 over 3 pairs on 2 ranks make accelerate repeat
# a whole batch (1) and one pair inside a batch (2)
CASES = {
    "padded_bs1": dict(per_device_eval_batch_size=1),
    "padded_bs2": dict(per_device_eval_batch_size=2),
    "packing_bs2": dict(per_device_eval_batch_size=2, packing=True, generate_during_eval=True, max_completion_length=4),
}


def run(folder: str, out: str) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_plugin import ORPOConfig, ORPOTrainer

    rows = load_dataset("json", data_files=os.path.join(folder, "eval.jsonl"), split="train")
    results = {}
    for name, fields in CASES.items():
        model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"))
        tok = AutoTokenizer.from_pretrained(os.path.join(folder, "model"))
        args = ORPOConfig(
            output_dir=os.path.join(folder, "out-" + name),
            bf16=False,
            use_cpu=True,
            report_to="none",
            max_length=48,
            seed=0,
            disable_tqdm=True,
            **fields,
        )
        trainer = ORPOTrainer(model, args, train_dataset=rows, eval_dataset=rows, processing_class=tok)
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            results[name] = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "_time"))}
            if fields.get("generate_during_eval"):
                with open(os.path.join(args.output_dir, "generations", "step-0.jsonl"), encoding="utf-8") as f:
                    results[name]["generations"] = [json.loads(line) for line in f]
            results[name]["world_size"] = trainer.accelerator.num_processes
    if results:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo sometimes aborts a finished worker at interpreter exit (see cli_runs.py)
