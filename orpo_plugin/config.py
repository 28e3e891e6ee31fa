"""ORPOConfig: every `TrainingArguments` field plus the ORPO ones, each documented where it is declared, grouped by
purpose (objective, data, layout, memory, model, evaluation), and checked once in `__post_init__`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import attention
from ._compat import BaseConfig, bf16_left_unset
from .data import TRUNCATION_MODES

logger = logging.getLogger("orpo_plugin")


@dataclass
class ORPOConfig(BaseConfig):
    r"""Configuration of [`ORPOTrainer`]: every `TrainingArguments` field plus the ORPO ones below.

    Field names and defaults match `trl.experimental.orpo.ORPOConfig` where both have them, so a TRL script runs
    by changing its import.
    """

    # ---- objective
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    beta: float = field(
        default=0.1,
        metadata={"help": "Weight of the odds-ratio term (the paper's lambda): L = NLL(chosen) + beta * L_OR."},
    )
    nll_on_prompt: bool = field(
        default=True,
        metadata={
            "help": "Compute the NLL over prompt and chosen tokens (True, as TRL does) or over the chosen "
            "completion only (False, the ORPO paper code's completion-only option)."
        },
    )

    # ---- data
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt + one response. A longer pair has its prompt cut to max_prompt_length "
            "first, then its responses."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompt tokens kept when a pair exceeds max_length (as TRL's DPO did); pairs that fit are never "
            "cut. Default (None): as TRL's ORPO, only responses are cut, except that a prompt that alone fills "
            "max_length is cut to max_length // 2 instead of leaving nothing to score. Encoder-decoder models: the "
            "encoder input's limit (default: none)."
        },
    )
    truncation_mode: str = field(
        default="keep_end",
        metadata={
            "help": "Which part of a long prompt is kept: 'keep_end' (the latest tokens, e.g. the last turns; a "
            "leading BOS stays first) or 'keep_start'.",
            "choices": ["keep_end", "keep_start"],
        },
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens of one response (after max_length truncation)."}
    )
    drop_long_pairs: bool = field(
        default=False,
        metadata={"help": "Drop (and count) pairs that would need truncation instead of truncating them."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes used to tokenize the dataset."}
    )
    padding_value: int | None = field(
        default=None, metadata={"help": "Pad token id. If None, the tokenizer's pad token (or eos) is used."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each micro-batch (or packed row) to a multiple of this many tokens."}
    )

    # ---- layout
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Lay all chosen and rejected sequences of a micro-batch end to end in one row, with no pad "
            "tokens; position_ids restart per sequence and flash-attention varlen arguments are supplied."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Implies padding_free. Group whole pairs into micro-batches of at most packing_max_tokens "
            "tokens (first-fit-decreasing in a shuffled window) instead of a fixed number of pairs."
        },
    )
    packing_max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Hard token budget of a packed micro-batch. Default: max_length * per_device_train_batch_size, "
            "and at least 2 * max_length so any pair fits."
        },
    )
    packing_window: int | None = field(
        default=None, metadata={"help": "Pairs shuffled together before first-fit-decreasing (default 1024)."}
    )
    prefix_sharing: bool = field(
        default=False,
        metadata={
            "help": "Lay each pair out once as [prompt][chosen][rejected] so the prompt is computed once. Implies a "
            "padding-free row; combines with packing."
        },
    )
    varlen_attention: bool = field(
        default=True,
        metadata={
            "help": "For padding-free rows on sdpa/eager models, run attention per sequence (exact, cost sum(len^2)) "
            "instead of transformers' dense block-diagonal mask."
        },
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "Kernel for padding-free/packed/prefix-shared rows on a CUDA sdpa/eager model. 'auto' takes the "
            "first that runs and honours the model's attention features (sliding window, soft-capping, sinks): "
            "'flash_attn' (the flash-attn package), 'torch_varlen' (torch.nn.attention.varlen.varlen_attn, no "
            "flash-attn build), 'flex' (compiled flex_attention with a BlockMask), 'sdpa' (orpo_sdpa buckets). A "
            "named one is used or refused at start. On a CPU only 'sdpa' runs.",
            "choices": ["auto", "flash_attn", "torch_varlen", "flex", "sdpa"],
        },
    )

    # ---- loss
    loss_type: str = field(
        default="odds_ratio",
        metadata={
            "help": "The preference term: 'odds_ratio' (ORPO, -log sigmoid of the log odds ratio) or 'prob_ratio' "
            "(the ORPO paper's ablation, section 7.1: -log sigmoid(log P(chosen) - log P(rejected)), same beta).",
            "choices": ["odds_ratio", "prob_ratio"],
        },
    )

    # ---- memory
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute log-probs from the hidden states and the output-layer weight in chunks of tokens, so "
            "[tokens x vocab] logits never exist at once. Falls back (with a notice) where the output layer is "
            "not a plain Linear."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the chunked loss. Default: as many as keep one chunk of float32 logits "
            "within 512 MiB (1024 tokens at a 128k vocabulary, 4096 at 32k). A micro-batch whose predictions fit "
            "in one chunk keeps that chunk's gradient for backward instead of recomputing its logits."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Whether to offload the activations to the CPU (as in TRL's SFT and DPO configs, through TRL's "
            "own context manager, `trl.models.get_act_offloading_ctx_manager`). Saved activations move to pinned "
            "CPU memory during forward and back during backward: less accelerator memory for longer pairs, at the "
            "cost of host transfers. Needs an accelerator (refused at start on a CPU)."
        },
    )

    # ---- model
    disable_dropout: bool = field(default=True, metadata={"help": "Whether to disable dropout in the model."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a string."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models that ship custom code (passed to from_pretrained)."}
    )

    # ---- accepted for TRL compatibility
    # ---- evaluation
    generate_during_eval: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation, generate completions (greedy) for a fixed sample of per_device_eval_batch_size "
            "eval prompts, at most max_completion_length new tokens; write them to output_dir/generations/step-N.jsonl "
            "and log them as a table to wandb, comet_ml or trackio when those are in report_to."
        },
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={"help": "Whether the model is an encoder-decoder (read from the model; checked against it if set)."},
    )

    _VALID_DICT_FIELDS = list(getattr(BaseConfig, "_VALID_DICT_FIELDS", [])) + ["model_init_kwargs"]

    def __post_init__(self):
        check_no_sequence_split(self.parallelism_config)
        if bf16_left_unset(self) and not self.fp16:
            self.bf16 = self._default_bf16()
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.loss_type not in ("odds_ratio", "prob_ratio"):
            raise ValueError(f"loss_type must be 'odds_ratio' or 'prob_ratio', got {self.loss_type!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.packing_max_tokens is not None and self.packing_max_tokens < 2:
            raise ValueError(f"packing_max_tokens must be >= 2, got {self.packing_max_tokens}")
        if self.attention_backend not in attention.BACKEND_CHOICES:
            raise ValueError(
                f"attention_backend must be one of {attention.BACKEND_CHOICES}, got {self.attention_backend!r}"
            )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.max_prompt_length is not None:
            if self.max_prompt_length < 1:
                raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
            if self.max_length is not None and self.max_prompt_length >= self.max_length:
                raise ValueError(
                    f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length}) to leave "
                    "room for the responses"
                )

    def _default_bf16(self) -> bool:
        """bf16 left unset: on where training runs on an accelerator with bf16 (TRL's default), else float32.

        transformers refuses `bf16=True` on a machine without such an accelerator unless `use_cpu=True`, and bf16
        autocast on a CPU is an explicit choice (`bf16=True, use_cpu=True`), so a CPU run trains in float32.
        """
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        if not self.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            return True
        where = "use_cpu=True" if self.use_cpu else "no accelerator with bf16 on this machine"
        logger.warning(
            "bf16 left unset and %s: training in float32. Set bf16=True (with use_cpu=True on a CPU) for bf16 mixed "
            "precision, or bf16=False to silence this notice.",
            where,
        )
        return False

    @property
    def layout(self) -> str:
        if self.prefix_sharing:
            return "prefix_sharing"
        return "padding_free" if (self.padding_free or self.packing) else "padded"

    def packing_budget(self) -> int:
        if self.packing_max_tokens is not None:
            return self.packing_max_tokens
        max_length = self.max_length or 1024
        return max(max_length * self.per_device_train_batch_size, 2 * max_length)


# ParallelismConfig sizes that cut a sequence, or a layer's weights, across ranks, and are not supported
SPLITTING_SIZES = {
    "cp_size": "context parallelism splits each sequence across ranks",
    "tp_size": "tensor parallelism splits each layer's weights and the output layer across ranks",
}


def check_no_sequence_split(parallelism_config) -> None:
    """Refuse an accelerate `ParallelismConfig` that splits sequences or layers in a way orpo_plugin does not reduce.

    ORPO's log-probabilities are per-sequence means and its NLL a sum over every response token: computed on a shard of
    a sequence they would be silently wrong. Supported: data parallelism (DDP, FSDP2's `dp_shard_size`, DeepSpeed)
    and Ulysses sequence parallelism (`sp_size` with `sp_backend="deepspeed"`, whose sums orpo_plugin reduces over the
    group: sequence_parallel.py; what it cannot run is refused when the trainer starts). Raises ValueError naming the
    size that is set.
    """
    if parallelism_config is None:
        return
    for name, what in SPLITTING_SIZES.items():
        size = getattr(parallelism_config, name, None) or 1
        if size > 1:
            raise ValueError(
                f"parallelism_config.{name}={size}: {what}, and orpo_plugin does not reduce its per-sequence "
                f"log-probabilities over such a split. Set {name}=1 (data parallelism: DDP, FSDP2, DeepSpeed ZeRO; "
                "sequence parallelism: sp_size with sp_backend='deepspeed'; docs/distributed.md)"
            )
