"""A test-only Axolotl plugin that records what orpo_plugin's trainer received: `record_plugin.RecordTrainData`.

Listed after `orpo_plugin.axolotl.ORPOPlugin` under `plugins:` (with this folder on PYTHONPATH), it changes nothing:
once `axolotl train` has built the trainer, the main process writes <output_dir>/received.jsonl, the trainer's
tokenized training pairs in order (prompt/chosen/rejected ids, as orpo_plugin's data module made them from the rows
Axolotl's dataset types produced), and <output_dir>/received_tokens.json, the tokenizer's BOS/EOS, end-of-turn and
whitespace-only ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from axolotl.integrations.base import BasePlugin

COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


class RecordTrainData(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        if int(os.environ.get("RANK", "0")) != 0:
            return
        from orpo_plugin.data import end_of_turn_ids

        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "received.jsonl", "w", encoding="utf-8") as f:
            for row in trainer.train_dataset.select_columns(list(COLUMNS)):
                f.write(json.dumps([list(row[c]) for c in COLUMNS]) + "\n")
        tokenizer = trainer.processing_class
        whitespace = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
        tokens = {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "end_of_turn": sorted(end_of_turn_ids(tokenizer)),
            "whitespace": whitespace,
            "trainer": type(trainer).__name__,
        }
        (out / "received_tokens.json").write_text(json.dumps(tokens))


class RecordSeen(BasePlugin):
    """Records, on the main process, every training pair the collator receives (<output_dir>/seen.jsonl: one line
    per micro-batch, its pairs' [prompt, chosen, rejected] ids) and every log (<output_dir>/logs.jsonl)."""

    def post_trainer_create(self, cfg, trainer):
        if int(os.environ.get("RANK", "0")) != 0:
            return
        from transformers import TrainerCallback

        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        collator = trainer.data_collator

        def recording(features):
            with open(out / "seen.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps([[list(p[c]) for c in COLUMNS] for p in features]) + "\n")
            return collator(features)

        trainer.data_collator = recording

        class Logs(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                with open(out / "logs.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

        trainer.add_callback(Logs())
