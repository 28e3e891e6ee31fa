"""Generation during evaluation (`generate_during_eval`): greedy completions for a fixed sample of eval prompts,
written to output_dir/generations/ and logged as a table to the reporters that take tables."""

from __future__ import annotations

import functools
import json
import logging
import os
import random

import torch

from .bnb_cpu import training_weight_layout
from .sharded_head import unwrap

logger = logging.getLogger("orpo_plugin")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generated answer: the tokenizer's EOS, the chat template's end-of-turn tokens (what
    orpo_plugin trains a response to end with, see `data.end_of_turn_ids`) and the model's generation-config EOS."""
    from .data import end_of_turn_ids

    ids = set(end_of_turn_ids(tokenizer))
    configured = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def _report_table(rows: list[dict], report_to: list[str], name: str) -> None:
    """Log generations as a table to the reporters that take tables (each one only when it is installed)."""
    wanted = [r for r in ("wandb", "comet_ml", "trackio") if r in report_to or "all" in report_to]
    if not wanted:
        return
    try:
        import pandas as pd
    except ImportError:
        logger.warning("generate_during_eval: pandas is not installed; the generations table is only written to file")
        return
    table = pd.DataFrame(rows, columns=["step", "prompt", "chosen", "rejected", "generated"])
    if "wandb" in wanted:
        try:
            import wandb
        except ImportError:
            wandb = None
        if wandb is not None and wandb.run is not None:
            wandb.log({name: wandb.Table(dataframe=table)})
    if "comet_ml" in wanted:
        from transformers import is_comet_available

        if is_comet_available():
            from trl.trainer.utils import log_table_to_comet_experiment

            log_table_to_comet_experiment(name=f"{name}.csv", table=table)
    if "trackio" in wanted:
        try:
            import trackio
        except ImportError:
            trackio = None
        if trackio is not None and hasattr(trackio, "Table"):
            trackio.log({name: trackio.Table(dataframe=table)})


class EvalGenerationsMixin:
    """ORPOTrainer's generation during evaluation (uses the trainer's args, model, tokenizer and accelerator)."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.args.generate_during_eval:
            self.log_generations(dataloader.dataset, metric_key_prefix)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def _generation_sample(self, dataset, key: str) -> list[dict]:
        """The same pairs at every evaluation: per_device_eval_batch_size of them, drawn once with the seed."""
        indices = self._generation_indices.get(key)
        if indices is None:
            k = min(self.args.per_device_eval_batch_size, len(dataset))
            indices = sorted(random.Random(self.args.seed).sample(range(len(dataset)), k))
            self._generation_indices[key] = indices
        return [dataset[i] for i in indices]

    def generate_completions(self, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy completions of tokenized prompts by the model with its own attention (no packed-layout override),
        at most max_completion_length new tokens, each cut after its first stop token (`stop_token_ids`)."""
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad = self.data_collator.pad_token_id if hasattr(self.data_collator, "pad_token_id") else tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):  # decoder-only models continue left-padded prompts
            span = slice(0, len(p)) if self.is_encoder_decoder else slice(width - len(p), width)
            input_ids[row, span] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, span] = 1
        if self.max_completion_length is not None:
            max_new = self.max_completion_length
        elif self.args.max_length is not None and not self.is_encoder_decoder:
            max_new = max(self.args.max_length - width, 1)
        else:
            max_new = 128
        stops = stop_token_ids(model, tokenizer)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            # eval mode without grad: keep bitsandbytes' 4-bit training layout (see bnb_cpu.training_weight_layout)
            with torch.no_grad(), training_weight_layout(self._4bit_layers()), self.compute_loss_context_manager():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=stops or None,
                )
        finally:
            model.train(was_training)
        out = out.cpu() if self.is_encoder_decoder else out[:, width:].cpu()
        completions = []
        for row in out.tolist():
            if self.is_encoder_decoder and row and row[0] == unwrap(model).config.decoder_start_token_id:
                row = row[1:]
            end = next((i for i, t in enumerate(row) if t in stops), None)
            completions.append(row if end is None else row[: end + 1])
        return completions

    def log_generations(self, dataset, metric_key_prefix: str = "eval") -> list[dict] | None:
        """Generate for the fixed sample of `dataset`, write output_dir/generations/step-N.jsonl (rank 0) and log
        the table to the reporters that take tables. Every rank generates (sharded models need all of them)."""
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or len(dataset) == 0:
            logger.warning("generate_during_eval: the %s dataset cannot be sampled; no generations", metric_key_prefix)
            return None
        pairs = self._generation_sample(dataset, metric_key_prefix)
        generated = self.generate_completions([list(p["prompt_input_ids"]) for p in pairs])
        if not self.is_world_process_zero():
            return None
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
        step = self.state.global_step
        rows = [
            {
                "step": step,
                "prompt": decode(p["prompt_input_ids"]),
                "chosen": decode(p["chosen_input_ids"]),
                "rejected": decode(p["rejected_input_ids"]),
                "generated": decode(g),
            }
            for p, g in zip(pairs, generated)
        ]
        suffix = "" if metric_key_prefix == "eval" else "-" + metric_key_prefix.removeprefix("eval_")
        path = os.path.join(self.args.output_dir, "generations", f"step-{step}{suffix}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        _report_table(rows, self.args.report_to or [], "game_log" + suffix)
        return rows
