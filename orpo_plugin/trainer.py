"""ORPOConfig and ORPOTrainer: drop-in replacements for `trl.experimental.orpo`, wiring only.

The math lives in `losses.py`/`chunked.py`, the layouts in `collators.py`, the grouping in `packing.py`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import random
import shutil
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

from . import attention
from ._compat import BaseConfig, BaseTrainer, bf16_left_unset
from .chunked import default_chunk_size
from .collators import PreferenceCollator, pair_cost
from .data import TRUNCATION_MODES, prepare_dataset
from .modeling import (
    OutputHead,
    cpu_4bit_layers,
    metrics_from_sums,
    orpo_forward,
    repacked_layers,
    training_weight_layout,
    unwrap,
    check_layout,
    sharded_head_owner,
    verify_head,
)
from .packing import PackedBatchSampler

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
        if bf16_left_unset(self) and not self.fp16:
            self.bf16 = self._default_bf16()
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.packing_max_tokens is not None and self.packing_max_tokens < 2:
            raise ValueError(f"packing_max_tokens must be >= 2, got {self.packing_max_tokens}")
        if self.attention_backend not in attention.BACKEND_CHOICES:
            raise ValueError(f"attention_backend must be one of {attention.BACKEND_CHOICES}, got {self.attention_backend!r}")
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
            "precision, or bf16=False to silence this notice.", where,
        )
        return False

    @property
    def layout(self) -> str:
        if self.prefix_sharing:
            return "prefix_sharing"
        return "padding_free" if (self.padding_free or self.packing) else "padded"

    def prompt_limit(self, encoder_decoder: bool = False) -> int | None:
        """max_prompt_length as set (None: the default rule of `data.fit_pair`)."""
        return self.max_prompt_length

    def packing_budget(self) -> int:
        if self.packing_max_tokens is not None:
            return self.packing_max_tokens
        max_length = self.max_length or 1024
        return max(max_length * self.per_device_train_batch_size, 2 * max_length)


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class _EpochSetter(TrainerCallback):
    """Tell the packed sampler which epoch it is (also after a resume), on every transformers version."""

    def __init__(self, sampler: PackedBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(math.floor(state.epoch or 0)))


def _package_version() -> str:
    try:
        return importlib.metadata.version("orpo-plugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


class ORPOTrainer(BaseTrainer):
    """ORPO without a reference model: NLL on chosen + beta * odds-ratio loss, packed and chunked when asked."""

    _tag_names = ["trl", "orpo", "orpo-plugin"]
    _name = "ORPO"
    _paper = {
        "title": "ORPO: Monolithic Preference Optimization without Reference Model",
        "id": "2403.07691",
        "citation": textwrap.dedent("""\
            @article{hong2024orpo,
                title        = {{ORPO: Monolithic Preference Optimization without Reference Model}},
                author       = {Jiwoo Hong and Noah Lee and James Thorne},
                year         = 2024,
                eprint       = {arXiv:2403.07691}
            }"""),
    }
    # compute_loss normalises by the totals of the whole accumulated batch (see get_batch_samples)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        args: ORPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
    ):
        if args is None:
            args = ORPOConfig(output_dir="orpo-output")
        elif not isinstance(args, ORPOConfig):
            raise TypeError(f"args must be an orpo_plugin.ORPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if model is None:
            raise ValueError("`model` is required (a model object or a name/path to load)")

        model_id = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = self._load_model(model, args)
        elif args.model_init_kwargs:
            raise ValueError("model_init_kwargs is set but the model is already instantiated")
        self.is_encoder_decoder = bool(getattr(getattr(unwrap(model), "config", None), "is_encoder_decoder", False))
        if args.is_encoder_decoder is not None and bool(args.is_encoder_decoder) != self.is_encoder_decoder:
            raise ValueError(
                f"is_encoder_decoder={args.is_encoder_decoder} but {type(unwrap(model)).__name__} is "
                f"{'an encoder-decoder' if self.is_encoder_decoder else 'a decoder-only'} model; leave it unset"
            )
        if self.is_encoder_decoder and args.layout != "padded":
            raise ValueError(
                f"{type(unwrap(model)).__name__} is an encoder-decoder model: it trains in the padded layout only "
                f"(got {args.layout}); set padding_free=False, packing=False and prefix_sharing=False"
            )
        if peft_config is not None:
            # the adapter's random init draws from the global RNG: seed it as Trainer seeds everything after it, so
            # the same seed gives the same adapter whatever ran before in the process
            set_seed(args.seed)
            model = self._apply_peft(model, peft_config, args)
        elif args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if args.disable_dropout:
            disable_dropout_in_model(model)

        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                model_id or unwrap(model).config._name_or_path, trust_remote_code=args.trust_remote_code
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
            logger.warning("the tokenizer has no pad token; using its eos token %r for padding", tokenizer.eos_token)

        self.attention_override = self._choose_attention(model, args)
        pad_id = args.padding_value if args.padding_value is not None else tokenizer.pad_token_id
        decoder_start = None
        max_completion_length = args.max_completion_length
        if self.is_encoder_decoder:
            decoder_start = unwrap(model).config.decoder_start_token_id
            if decoder_start is None:
                raise ValueError("model.config.decoder_start_token_id must be set for an encoder-decoder model")
            if max_completion_length is None:  # as TRL does
                logger.warning("encoder-decoder model and max_completion_length unset: responses are cut to 128 tokens")
                max_completion_length = 128
        self.max_completion_length = max_completion_length
        if data_collator is None:
            data_collator = PreferenceCollator(
                pad_id, args.layout, args.nll_on_prompt, args.pad_to_multiple_of, decoder_start_token_id=decoder_start
            )
        args.remove_unused_columns = False

        prep = dict(
            tokenizer=tokenizer,
            max_length=args.max_length,
            max_completion_length=max_completion_length,
            drop_long_pairs=args.drop_long_pairs,
            num_proc=args.dataset_num_proc,
            max_prompt_length=args.prompt_limit(self.is_encoder_decoder),
            truncation_mode=args.truncation_mode,
            encoder_decoder=self.is_encoder_decoder,
        )
        self.data_stats = {}
        with args.main_process_first(desc="preparing the ORPO dataset"):
            train_dataset, self.data_stats["train"] = prepare_dataset(train_dataset, name="train", **prep)
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: prepare_dataset(v, name=f"eval[{k}]", **prep)[0] for k, v in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset, self.data_stats["eval"] = prepare_dataset(eval_dataset, name="eval", **prep)

        self.beta = args.beta
        self._norm: tuple[float, float] | None = None
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._steps_since_log = 0
        self._packed_sampler: PackedBatchSampler | None = None
        self._generation_indices: dict[str, list[int]] = {}

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.head = OutputHead.of(self.model)
        self.chunk_size = None
        # Encoder-decoder models compute their own logits (encoder_decoder_logps).
        self.logits_in_forward = self.is_encoder_decoder
        # FSDP2 shards the model when training starts (it is whole here); ZeRO-3 may have partitioned it at load
        # time (zero.Init), and then the head is checked on the first step, through the same forward redirection
        # the loss uses (modeling.hidden_then_head).
        self._verify_head_on_first_step = self._partitioned() and not self.is_encoder_decoder
        if not (self._verify_head_on_first_step or self.logits_in_forward):
            try:
                # under the training's autocast: PEFT's 4-bit preparation may leave float32 norms before a
                # half-precision output layer, which only autocast multiplies
                with self.accelerator.autocast():
                    verify_head(self.model, self.head)
            except ValueError as err:
                logger.warning("%s; the model will compute the logits itself (no chunked loss)", err)
                self.logits_in_forward = True
            if args.layout != "padded":
                # a model feature the layout's attention cannot honour stops here, not at the first step; under the
                # training's autocast, since half-precision kernels take what autocast gives them
                with training_weight_layout(cpu_4bit_layers(self.model)), self.accelerator.autocast():
                    check_layout(self.model, args.layout, self.attention_override, pad_id)
        if args.chunked_loss and self.is_encoder_decoder:
            logger.info("chunked_loss: an encoder-decoder model computes its full logits (padded layout, as TRL)")
        if args.chunked_loss and not self.logits_in_forward:
            if self.head.chunkable:
                self.chunk_size = args.loss_chunk_size or default_chunk_size(self.head.vocab_size)
            else:
                logger.warning("chunked_loss: using full logits because %s", self.head.reason)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------------------------------ setup helpers
    @staticmethod
    def _load_model(name: str, args: ORPOConfig):
        kwargs = dict(args.model_init_kwargs or {})
        dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", "auto"))
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"model_init_kwargs.dtype: unknown dtype {dtype!r}")
            dtype = getattr(torch, dtype)
        kwargs["dtype"] = dtype
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)

    @staticmethod
    def _apply_peft(model, peft_config, args: ORPOConfig):
        from peft import PeftConfig, get_peft_model, prepare_model_for_kbit_training

        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a peft.PeftConfig, got {type(peft_config).__name__}")
        if hasattr(model, "peft_config"):
            raise ValueError("the model already has a PEFT adapter; pass the base model with peft_config")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
            dtypes = [m.weight.dtype for m in embeddings]
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
            if args.bf16 or args.fp16:
                # PEFT upcasts every non-quantized weight to float32, the frozen input and output embeddings too
                # (2 GiB more at a 128k x 4096 vocabulary). Under mixed precision they are only read in half
                # precision, so their loaded dtype is restored exactly; norms stay float32 (as in TRL).
                for module, dtype in zip(embeddings, dtypes):
                    if module.weight.dtype != dtype and not module.weight.requires_grad:
                        module.to(dtype)
        elif args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return get_peft_model(model, peft_config)

    @staticmethod
    def _choose_attention(model, args: ORPOConfig) -> str | None:
        """The attention implementation used during our forwards (None: the model's own), or a clear refusal.

        Logs one line naming the kernel chosen for a padding-free/packed/prefix-shared layout.
        """
        layout = args.layout
        if layout == "padded":
            return None
        name, why = ORPOTrainer._pick_attention(model, args)
        logger.info("attention for the %s layout: %s (%s)", layout, name or "the model's own", why)
        return name

    @staticmethod
    def _pick_attention(model, args: ORPOConfig) -> tuple[str | None, str]:
        layout = args.layout
        base = unwrap(model)
        impl = getattr(base.config, "_attn_implementation", None) or "eager"
        if not getattr(base, "_supports_attention_backend", False) and not str(impl).startswith("flash"):
            raise ValueError(
                f"{type(base).__name__} does not use transformers' attention interface, so it cannot take the "
                f"{layout} layout; use the padded layout (padding_free=False, packing=False, prefix_sharing=False)"
            )
        forced = args.attention_backend != "auto"
        cuda = attention.on_cuda(base, args.use_cpu)
        picks_kernel = impl in ("sdpa", "eager", attention.ATTENTION_NAME) and (
            layout == "prefix_sharing" or args.varlen_attention
        )
        if forced or (cuda and picks_kernel):
            backend, name, why = attention.choose_backend(base, args.attention_backend, cuda)
            return attention.register(name), f"attention_backend={backend}: {why}"
        if layout == "prefix_sharing":
            if impl in ("sdpa", "eager", attention.ATTENTION_NAME):
                return attention.register(), f"{impl} model"
            if impl in ("flex_attention", attention.FLEX_NAME):
                return attention.register(attention.FLEX_NAME), f"{impl} model"
            if impl in ("flash_attention_2", attention.FLASH_NAME):
                attention.varlen._flash_kernel()  # fail now, with a clear message, if flash-attn is missing
                return attention.register(attention.FLASH_NAME), f"{impl} model"
            raise ValueError(
                f"prefix_sharing runs on sdpa, eager (through orpo_plugin's '{attention.ATTENTION_NAME}'), "
                f"flex_attention (a prefix-sharing BlockMask) or flash_attention_2 (varlen, different cu_seqlens "
                f"for queries and keys) models; this model uses attn_implementation={impl!r}"
            )
        if impl in ("sdpa", "eager") and args.varlen_attention:
            return attention.register(), f"{impl} model"
        if impl in attention.NATIVE_PACKED or impl == attention.ATTENTION_NAME:
            return None, f"{impl} model, packed sequences from position_ids"
        raise ValueError(
            f"padding_free/packing needs attn_implementation in {attention.NATIVE_PACKED}; this model uses {impl!r}"
        )

    def _partitioned(self) -> bool:
        """Whether the model's parameters are already partitioned (ZeRO-3 zero.Init), so no forward can run yet."""
        return any(getattr(p, "ds_id", None) is not None for p in self.model.parameters())

    def _verify_head_now(self, model) -> None:
        """The start-of-training head check, for a model that was partitioned when the trainer was built."""
        self._verify_head_on_first_step = False
        try:
            verify_head(model, self.head, owner=sharded_head_owner(model, self.head))
        except ValueError as err:
            logger.warning("%s; the model will compute the logits itself (no chunked loss)", err)
            self.logits_in_forward, self.chunk_size = True, None

    # ------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        if not self.args.packing:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        layout = self.args.layout
        lengths = [
            pair_cost(f, layout)
            for f in dataset.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
        ]
        sampler = PackedBatchSampler(
            lengths,
            self.args.packing_budget(),
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            window=self.args.packing_window,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )
        if self._packed_sampler is None:
            self.add_callback(_EpochSetter(sampler))
        else:
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, _EpochSetter):
                    cb.sampler = sampler
        self._packed_sampler = sampler
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        # The sampler already gives every rank the same number of groups; accelerate (<= 1.13) refuses a
        # batch sampler without batch_size under several processes unless even_batches is off.
        even = self.accelerator.even_batches
        self.accelerator.even_batches = False
        try:
            loader = self.accelerator.prepare(loader)
        finally:
            self.accelerator.even_batches = even
        # Our sampler is already rank-aware: make accelerate's shard wrapper a pass-through.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

    # ------------------------------------------------------------------------------------------ loss
    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """Collect the micro-batches of one optimizer step and the totals that normalise their losses."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        totals = torch.tensor(
            [
                float(sum(int(b["num_pairs"]) for b in batches)),
                float(sum(int(b["pred_nll"].sum()) for b in batches)),
            ],
            device=self.accelerator.device,
        )
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        world = self.accelerator.num_processes
        # DDP averages gradients over ranks, so each rank normalises by (global total / world size)
        self._norm = (totals[0].item() / world, totals[1].item() / world)
        self._steps_since_log += 1
        return batches, totals[1]

    def _check_batch(self, inputs):
        if "pred_pos" not in inputs:
            raise ValueError(
                "the batch lacks orpo_plugin's prediction fields: the data_collator must be "
                "orpo_plugin.PreferenceCollator (or produce the same keys)"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._check_batch(inputs)
        total_pairs, total_tokens = self._norm if (self._norm and model.training) else (None, None)
        if self._verify_head_on_first_step:
            self._verify_head_now(model)
        # autocast around the whole computation, not only the model's forward (where accelerate puts it): the
        # output layer applied to the hidden states runs in the precision the model's own head would
        with attention.attention_implementation(model, self.attention_override), self.accelerator.autocast():
            result = orpo_forward(
                model, inputs, self.head, self.beta, self.chunk_size, total_pairs, total_tokens, self.logits_in_forward
            )
        mode = "train" if model.training else "eval"
        for k, v in result.sums.items():
            self._metric_sums[mode][k] = self._metric_sums[mode][k] + v
        loss = result.output.loss
        return (loss, result.sums) if return_outputs else loss

    # ------------------------------------------------------------------------------------------ 4-bit on CPU
    def _4bit_layers(self) -> list:
        if getattr(self, "_cpu_4bit", None) is None:
            self._cpu_4bit = cpu_4bit_layers(self.model)
        return self._cpu_4bit

    def training_step(self, model, inputs, *args, **kwargs):
        layers = self._4bit_layers()
        repacked = repacked_layers(layers) if layers else 0
        if repacked:
            raise RuntimeError(
                f"{repacked} bitsandbytes 4-bit layers of the model were repacked for CPU inference (bitsandbytes does "
                "this on the first eval-mode forward without grad on CPUs with AVX512-BF16, here before training "
                "started). Training through them backpropagates wrong gradients, and bitsandbytes' inverse does not "
                "restore the weights exactly: reload the model, and run any inference before training in train mode"
            )
        # Forward and backward under one attention override: gradient checkpointing recomputes the layers during
        # backward, and the recomputation must run the same attention as the forward did.
        with attention.attention_implementation(model, self.attention_override):
            return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        # covers evaluation steps and any callback that runs the model in eval mode during training
        with training_weight_layout(self._4bit_layers()):
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with training_weight_layout(self._4bit_layers()):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with training_weight_layout(self._4bit_layers()):
            return super().predict(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ generations
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
        at most max_completion_length new tokens, each cut after its first EOS."""
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
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            # eval mode without grad: keep bitsandbytes' 4-bit training layout (see modeling.training_weight_layout)
            with torch.no_grad(), training_weight_layout(self._4bit_layers()), self.compute_loss_context_manager():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=pad,
                )
        finally:
            model.train(was_training)
        out = out.cpu() if self.is_encoder_decoder else out[:, width:].cpu()
        eos = tokenizer.eos_token_id
        completions = []
        for row in out.tolist():
            if self.is_encoder_decoder and row and row[0] == unwrap(model).config.decoder_start_token_id:
                row = row[1:]
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            completions.append(row)
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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """TRL's return: the batch's mean chosen and rejected logits as "predictions" and zero labels, so that
        `compute_metrics(EvalPrediction)` runs (one pair of values per evaluation batch)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, sums = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        if ignore_keys is None:
            ignore_keys = getattr(getattr(unwrap(model), "config", None), "keys_to_ignore_at_inference", None) or []
        metrics = metrics_from_sums(sums, self.beta, prefix="eval_")
        logits = [metrics[k] for k in ("eval_logits/chosen", "eval_logits/rejected") if k not in ignore_keys]
        logits = torch.tensor(logits, device=self.accelerator.device)
        labels = torch.zeros(logits.shape[0], device=self.accelerator.device)
        return loss.detach(), logits, labels

    # ------------------------------------------------------------------------------------------ model card
    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (base model, ORPO citation, tags incl. `orpo-plugin`) plus the ORPO options used."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            text = f.read()
        marker = "### Framework versions"
        section = self._model_card_options()
        text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
        text = text.replace(f"{marker}\n\n", f"{marker}\n\n- orpo-plugin: {_package_version()}\n", 1)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def _model_card_options(self) -> str:
        args = self.args
        options = {
            "layout": args.layout,
            "packing": args.packing,
            "packing_max_tokens": args.packing_budget() if args.packing else None,
            "prefix_sharing": args.prefix_sharing,
            "chunked_loss": self.chunk_size is not None,
            "beta": args.beta,
            "nll_on_prompt": args.nll_on_prompt,
            "max_length": args.max_length,
            "max_prompt_length": args.prompt_limit(self.is_encoder_decoder),
            "truncation_mode": args.truncation_mode,
            "max_completion_length": self.max_completion_length,
            "encoder_decoder": self.is_encoder_decoder,
        }
        rows = "".join(f"| `{k}` | `{v}` |\n" for k, v in options.items() if v is not None)
        return (
            "### ORPO options\n\n"
            "Trained with the `ORPOTrainer` of `orpo-plugin` (a drop-in for TRL's `trl.experimental.orpo`) and these "
            "options:\n\n| option | value |\n|---|---|\n" + rows + "\n"
        )

    def _save_checkpoint(self, model, trial):
        # as TRL's trainers: the model card is refreshed with every checkpoint
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else Path(self.args.output_dir).name
        self.create_model_card(model_name=name)
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if _internal_call:  # checkpoints and push_to_hub write the card themselves
            return
        output_dir = output_dir or self.args.output_dir
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else Path(output_dir).name
        self.create_model_card(model_name=name)
        card = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.exists(card) and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            shutil.copyfile(card, os.path.join(output_dir, "README.md"))

    # ------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else ("eval" if "eval_loss" in logs else None)
        if mode is not None and self._metric_sums[mode]:
            sums = dict(self._metric_sums[mode])
            if self.accelerator.num_processes > 1:
                keys = sorted(sums)
                stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]).to(
                    self.accelerator.device
                )
                stacked = self.accelerator.reduce(stacked, reduction="sum").cpu()
                sums = dict(zip(keys, stacked))
            metrics = metrics_from_sums(sums, self.beta, prefix="eval_" if mode == "eval" else "")
            if mode == "train":
                steps = max(self._steps_since_log, 1)
                metrics["tokens/real"] = metrics["tokens/real"] / steps
                self._steps_since_log = 0
            else:
                metrics.pop("eval_tokens/real", None)
            logs.update(metrics)
            self._metric_sums[mode] = defaultdict(float)
        return super().log(logs, start_time)
