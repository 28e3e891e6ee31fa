"""Generation: `generate`, the one generation loop (used by generation during evaluation, `orpo-plugin eval
--diversity` and the demo), and generation during evaluation (`generate_during_eval`): greedy completions for a
fixed sample of eval prompts, written to output_dir/generations/ and logged as a table to the reporters that take
tables."""

from __future__ import annotations

import contextlib
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


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    batch_size: int | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    temperature: float = 1.0,
    pad_token_id: int | None = None,
    context=None,
    desc: str = "Generating",
    progress: bool = False,
) -> list[list[list[int]]]:
    """Completions of tokenized prompts: greedy when `seed` is None, else `num_samples` samples per prompt drawn at
    `temperature` from the full distribution (no top-k/top-p, whatever the model's generation config says).

    Every completion ends at its first stop token (`stop_token_ids`: the tokenizer's EOS, the chat template's end of
    turn and the model's configured EOS), which it keeps, after at most `max_new_tokens` tokens. Prompts go
    `batch_size // num_samples` at a time (default: all at once), left-padded for a decoder-only model, right-padded
    into an encoder-decoder's encoder. `pad_token_id` defaults to the tokenizer's pad (else EOS); `context`: a
    callable returning a context manager to generate under (the trainer's autocast and 4-bit weight layout).
    Returns, per prompt, `num_samples` lists of token ids. The model's training mode and the caller's random state
    (CPU, and the model's CUDA device) are left as they were.
    """
    from tqdm.auto import tqdm

    if not prompts:
        return []
    base = unwrap(model)
    encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    pad = pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    sampling = seed is not None
    if sampling:
        options = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=num_samples)
    else:
        num_samples = 1
        options = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    per_batch = max(1, (batch_size or len(prompts) * num_samples) // num_samples)
    device = next(base.parameters()).device
    completions: list[list[list[int]]] = []
    was_training = base.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sampling:
            torch.manual_seed(seed)
        base.eval()
        try:
            for start in tqdm(range(0, len(prompts), per_batch), desc=desc, disable=not progress, leave=False):
                chunk = prompts[start : start + per_batch]
                width = max(len(p) for p in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, p in enumerate(chunk):  # decoder-only models continue left-padded prompts
                    span = slice(0, len(p)) if encoder_decoder else slice(width - len(p), width)
                    input_ids[row, span] = torch.tensor(p, dtype=torch.long)
                    attention_mask[row, span] = 1
                with torch.no_grad(), context() if context is not None else contextlib.nullcontext():
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        max_new_tokens=max_new_tokens,
                        pad_token_id=pad,
                        eos_token_id=stops or None,
                        use_cache=True,
                        **options,
                    )
                rows = (out if encoder_decoder else out[:, width:]).cpu().tolist()
                for i in range(len(chunk)):
                    group = []
                    for row in rows[i * num_samples : (i + 1) * num_samples]:
                        if encoder_decoder and row and row[0] == base.config.decoder_start_token_id:
                            row = row[1:]
                        end = next((j for j, t in enumerate(row) if t in stops), None)
                        group.append(row if end is None else row[: end + 1])
                    completions.append(group)
        finally:
            base.train(was_training)
    return completions


def decode_completions(tokenizer, completions: list[list[list[int]]], strip: bool = False) -> list[list[str]]:
    """`generate`'s token ids as text, special tokens (the stop token among them) removed; `strip`: outer spaces too."""
    texts = [tokenizer.batch_decode(group, skip_special_tokens=True) for group in completions]
    return [[t.strip() for t in group] if strip else group for group in texts]


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

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
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
        if self.max_completion_length is not None:
            max_new = self.max_completion_length
        elif self.args.max_length is not None and not self.is_encoder_decoder:
            max_new = max(self.args.max_length - width, 1)
        else:
            max_new = 128

        def context():
            # eval mode without grad: keep bitsandbytes' 4-bit training layout (see bnb_cpu.training_weight_layout)
            stack = contextlib.ExitStack()
            stack.enter_context(training_weight_layout(self._4bit_layers()))
            stack.enter_context(self.compute_loss_context_manager())
            return stack

        completions = generate(model, tokenizer, prompts, max_new, pad_token_id=pad, context=context)
        return [group[0] for group in completions]

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
