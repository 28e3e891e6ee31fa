"""ORPOConfig and ORPOTrainer: drop-in replacements for `trl.experimental.orpo`, wiring only.

The math lives in `losses.py`/`chunked.py`, the layouts in `collators.py`, the grouping in `packing.py`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

from . import attention
from ._compat import BaseConfig, BaseTrainer, bf16_left_unset
from .chunked import default_chunk_size
from .collators import PreferenceCollator, pair_cost
from .data import prepare_dataset
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
        metadata={"help": "Maximum tokens of prompt + one response. Responses are truncated, never the prompt."},
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum tokens of one response (after max_length truncation)."}
    )
    drop_long_pairs: bool = field(
        default=False,
        metadata={"help": "Drop (and count) pairs that would need truncation instead of truncating their responses."},
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
    generate_during_eval: bool = field(
        default=False, metadata={"help": "Accepted for TRL compatibility; generation during eval is not supported."}
    )
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "Accepted for TRL compatibility; only decoder-only models are supported."}
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
        if self.is_encoder_decoder:
            raise ValueError("orpo_plugin trains decoder-only (causal LM) models; is_encoder_decoder=True is not supported")
        if self.attention_backend not in attention.BACKEND_CHOICES:
            raise ValueError(f"attention_backend must be one of {attention.BACKEND_CHOICES}, got {self.attention_backend!r}")

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


class ORPOTrainer(BaseTrainer):
    """ORPO without a reference model: NLL on chosen + beta * odds-ratio loss, packed and chunked when asked."""

    _tag_names = ["trl", "orpo", "orpo-plugin"]
    _name = "ORPO"
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
        if args.generate_during_eval:
            warnings.warn("generate_during_eval is not supported by orpo_plugin and is ignored", stacklevel=2)

        model_id = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = self._load_model(model, args)
        elif args.model_init_kwargs:
            raise ValueError("model_init_kwargs is set but the model is already instantiated")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError("orpo_plugin trains decoder-only (causal LM) models; got an encoder-decoder model")
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
        if data_collator is None:
            data_collator = PreferenceCollator(pad_id, args.layout, args.nll_on_prompt, args.pad_to_multiple_of)
        args.remove_unused_columns = False

        prep = dict(
            tokenizer=tokenizer,
            max_length=args.max_length,
            max_completion_length=args.max_completion_length,
            drop_long_pairs=args.drop_long_pairs,
            num_proc=args.dataset_num_proc,
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
        self.logits_in_forward = False
        # FSDP2 shards the model when training starts (it is whole here); ZeRO-3 may have partitioned it at load
        # time (zero.Init), and then the head is checked on the first step, through the same forward redirection
        # the loss uses (modeling.hidden_then_head).
        self._verify_head_on_first_step = self._partitioned()
        if not self._verify_head_on_first_step:
            try:
                verify_head(self.model, self.head)
            except ValueError as err:
                logger.warning("%s; the model will compute the logits itself (no chunked loss)", err)
                self.logits_in_forward = True
            if args.layout != "padded":
                # a model feature the layout's attention cannot honour stops here, not at the first step; under the
                # training's autocast, since half-precision kernels take what autocast gives them
                with training_weight_layout(cpu_4bit_layers(self.model)), self.accelerator.autocast():
                    check_layout(self.model, args.layout, self.attention_override, pad_id)
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
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            )
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
                attention._flash_kernel()  # fail now, with a clear message, if flash-attn is missing
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
        with attention.attention_implementation(model, self.attention_override):
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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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
