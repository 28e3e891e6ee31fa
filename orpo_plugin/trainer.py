"""ORPOTrainer, a drop-in for TRL's: the training loop's wiring (datasets, loader, attention choice, loss and its
normalisation, metric logging). Apart: config.py, model_setup.py, generation.py (during eval), model_card.py,
startup_checks.py (run in __init__) and bnb_cpu.py (the bitsandbytes CPU guard, a mixin).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from transformers import AutoProcessor, AutoTokenizer, TrainerCallback, set_seed

from . import attention, sequence_parallel, vision
from ._compat import BaseTrainer
from .bnb_cpu import CPU4BitGuardMixin, cpu_4bit_layers, training_weight_layout
from .chunked import default_chunk_size
from .collators import PreferenceCollator, pair_cost
from .config import ORPOConfig
from .data import prepare_dataset
from .generation import EvalGenerationsMixin
from .kernels import activation_offloading_context, check_activation_offloading, liger_kernel_config
from .model_card import ModelCardMixin
from .model_setup import apply_peft, disable_dropout_in_model, load_model
from .modeling import metrics_from_sums, orpo_forward
from .packing import PackedBatchSampler
from .sharded_head import OutputHead, sharded_head_owner, unwrap
from .startup_checks import check_layout, verify_head

logger = logging.getLogger("orpo_plugin")


class _EpochSetter(TrainerCallback):
    """Tell the packed sampler which epoch it is (also after a resume), on every transformers version."""

    def __init__(self, sampler: PackedBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(math.floor(state.epoch or 0)))


def _columns(dataset) -> set[str]:
    """The column names of a Dataset, or the keys of a list of row dicts."""
    if isinstance(dataset, list):
        return {k for row in dataset if isinstance(row, dict) for k in row}
    return set(getattr(dataset, "column_names", None) or ())


def _eval_sets(eval_dataset) -> list:
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def packing_summary(stats: dict, args) -> str:
    """What packing makes of the batch size: pairs per micro-batch and per optimizer step, steps per epoch."""
    accumulation = args.gradient_accumulation_steps
    per_step = min(stats["mean_pairs_per_group"] * accumulation * stats["num_replicas"], stats["num_pairs"])
    steps = max(math.ceil(stats["groups_per_rank"] / accumulation), 1)
    text = (
        f"packing: {stats['num_pairs']} pairs in micro-batches of up to {stats['budget']} tokens (packing_max_tokens; "
        f"per_device_train_batch_size does not count pairs here), {stats['mean_pairs_per_group']:.1f} pairs per "
        f"micro-batch on average: about {per_step:.0f} pairs per optimizer step, {steps} optimizer "
        f"step{'s' if steps != 1 else ''} per epoch"
    )
    if args.max_steps and args.max_steps > 0:
        text += f"; max_steps={args.max_steps} is {args.max_steps / steps:.1f} epochs"
    return text


class _WithPairIndex:
    """An eval collator that also returns the batch's dataset row indices as `pair_index` ([P], long)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator([{k: v for k, v in f.items() if k != "pair_index"} for f in features])
        if all("pair_index" in f for f in features):
            batch["pair_index"] = torch.tensor([int(f["pair_index"]) for f in features], dtype=torch.long)
        return batch


class ORPOTrainer(EvalGenerationsMixin, ModelCardMixin, CPU4BitGuardMixin, BaseTrainer):
    """ORPO without a reference model: NLL on chosen + beta * odds-ratio loss, packed and chunked when asked."""

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

        # refused here, at start, where they cannot run, before the model is loaded or given an adapter
        check_activation_offloading(args)
        liger = liger_kernel_config(args)
        if liger is not None:
            args.liger_kernel_config = liger  # the base Trainer applies it when training starts

        # rows with images (TRL's vision format): a vision-language model, its processor, the padded layout
        with_images = vision.has_images(_columns(train_dataset)) or any(
            vision.has_images(_columns(d)) for d in _eval_sets(eval_dataset)
        )
        model_id = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = load_model(model, args, vision=with_images)
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
            model = apply_peft(model, peft_config, args)
        elif args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if args.disable_dropout:
            disable_dropout_in_model(model)

        if processing_class is None:
            auto = AutoProcessor if with_images else AutoTokenizer
            processing_class = auto.from_pretrained(
                model_id or unwrap(model).config._name_or_path, trust_remote_code=args.trust_remote_code
            )
        if with_images:
            vision.check_trainable(model, processing_class, args.layout)
            if args.generate_during_eval:
                raise ValueError(
                    "generate_during_eval does not pass images to generate yet: turn it off for pairs with images"
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
        if data_collator is None and with_images:
            data_collator = vision.VisionPreferenceCollator(
                processing_class,
                pad_id,
                vision.placeholder_ids(model),
                args.layout,
                args.nll_on_prompt,
                args.pad_to_multiple_of,
            )
        elif data_collator is None:
            data_collator = PreferenceCollator(
                pad_id, args.layout, args.nll_on_prompt, args.pad_to_multiple_of, decoder_start_token_id=decoder_start
            )
        args.remove_unused_columns = False
        if args.dataloader_pin_memory and not _has_accelerator():  # torch warns on every epoch and pins nothing
            args.dataloader_pin_memory = False

        prep = dict(
            max_length=args.max_length,
            max_completion_length=max_completion_length,
            max_prompt_length=args.max_prompt_length,
            drop_long_pairs=args.drop_long_pairs,
        )
        if with_images:  # a prompt holding images is never cut: no truncation_mode
            prepare = vision.prepare_vision_dataset
            prep.update(processor=processing_class)
        else:
            prepare = prepare_dataset
            prep.update(
                tokenizer=tokenizer,
                num_proc=args.dataset_num_proc,
                truncation_mode=args.truncation_mode,
                encoder_decoder=self.is_encoder_decoder,
            )
        self.data_stats = {}
        with args.main_process_first(desc="preparing the ORPO dataset"):
            train_dataset, self.data_stats["train"] = prepare(train_dataset, name="train", **prep)
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: prepare(v, name=f"eval[{k}]", **prep)[0] for k, v in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset, self.data_stats["eval"] = prepare(eval_dataset, name="eval", **prep)

        self.beta = args.beta
        # (pairs, NLL tokens) of the optimizer step's whole batch per rank: what each micro-batch's loss is divided by
        self._loss_totals: tuple[float, float] | None = None
        self._metric_sums: dict[str, dict[str, torch.Tensor]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }
        self._steps_since_log = 0
        self._packed_sampler: PackedBatchSampler | None = None
        self._generation_indices: dict[str, list[int]] = {}
        self._eval_rows = None  # the dataset of the evaluation running now (see get_eval_dataloader)
        self._eval_seen: set[int] = set()
        self._count_eval_sums = True

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
        self.activation_offload_context = activation_offloading_context(self.model, args)
        self.chunk_size = None
        # Encoder-decoder models compute their own logits (encoder_decoder_logps).
        self.logits_in_forward = self.is_encoder_decoder
        # FSDP2 shards the model when training starts (it is whole here); ZeRO-3 may have partitioned it at load
        # time (zero.Init), and then the head is checked on the first step, through the same forward redirection
        # the loss uses (sharded_head.hidden_then_head).
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
        # Ulysses sequence parallelism (accelerate's ParallelismConfig, DeepSpeed): refused at start where it cannot run
        self.sp_size = sequence_parallel.sp_size(self.accelerator)
        self._sp_attention: str | None = None  # registered at the first training step (DeepSpeed's groups exist then)
        if self.sp_size > 1:
            self.attention_override = sequence_parallel.sp_attention(self)
            sequence_parallel.check_supported(self, self.sp_size)
            sequence_parallel.init_deepspeed_comm()
            self.data_collator.pad_to_multiple_of = sequence_parallel.pad_multiple(
                self.data_collator.pad_to_multiple_of, self.sp_size
            )
            logger.warning("sequence parallelism: each row is split across %d ranks (DeepSpeed Ulysses)", self.sp_size)

    # ------------------------------------------------------------------------------------------ setup helpers
    @staticmethod
    def _choose_attention(model, args: ORPOConfig) -> str | None:
        """The attention implementation used during our forwards (None: the model's own), or a clear refusal.

        Logs one line naming the kernel chosen for a padding-free/packed/prefix-shared layout.
        """
        layout = args.layout
        if layout == "padded":
            return None
        name, why = attention.pick_attention(
            unwrap(model), layout, args.attention_backend, args.use_cpu, args.varlen_attention
        )
        logger.info("attention for the %s layout: %s (%s)", layout, name or "the model's own", why)
        return name

    def _partitioned(self) -> bool:
        """Whether the model's parameters are already partitioned (ZeRO-3 zero.Init), so no forward can run yet."""
        return any(getattr(p, "ds_id", None) is not None for p in self.model.parameters())

    def _verify_head_now(self, model) -> None:
        """The start-of-training head check, for a model that was partitioned when the trainer was built: on the first
        training step or evaluation, whichever comes first, in the training's precision as at start (see __init__)."""
        self._verify_head_on_first_step = False
        try:
            with self.accelerator.autocast():
                verify_head(model, self.head, owner=sharded_head_owner(model, self.head))
        except ValueError as err:
            logger.warning("%s; the model will compute the logits itself (no chunked loss)", err)
            self.logits_in_forward, self.chunk_size = True, None

    # ------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        collator = self.data_collator
        if self.sp_size > 1:  # rows in the form DeepSpeed's Ulysses loader adapter slices
            length = sequence_parallel.row_length(self.args, collator.pad_to_multiple_of)
            self.data_collator = sequence_parallel.SPCollator(collator, self.sp_size, length)
        try:
            return self._train_dataloader()
        finally:
            self.data_collator = collator

    def _sampler_rank(self) -> tuple[int, int]:
        """(replicas, rank) of this process's share of the packed groups.

        Under sequence parallelism the ranks of a group take turns: DeepSpeed's loader adapter trains, one after
        another, the batch of each rank of the group on the whole group. Rank j of data-parallel group d then takes
        the groups d + dp * j (mod world), so that group d trains groups d, d + dp, d + 2 dp, ... in order: the
        batches data-parallel rank d would train without sequence parallelism.
        """
        world, rank, sp = self.args.world_size, self.args.process_index, self.sp_size
        if sp == 1:
            return world, rank
        dp = world // sp
        return world, rank // sp + dp * (rank % sp)

    def _train_dataloader(self) -> DataLoader:
        if not self.args.packing:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        layout = self.args.layout
        replicas, rank = self._sampler_rank()
        lengths = [
            pair_cost(f, layout)
            for f in dataset.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
        ]
        sampler = PackedBatchSampler(
            lengths,
            self.args.packing_budget(),
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            window=self.args.packing_window,
            num_replicas=replicas,
            rank=rank,
        )
        if self._packed_sampler is None:
            self.add_callback(_EpochSetter(sampler))
            logger.warning(packing_summary(sampler.stats(), self.args))
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

    def get_eval_dataloader(self, eval_dataset=None):
        """The Trainer's loader over the eval rows, each batch carrying the rows' indices (`pair_index`), so that the
        pairs accelerate repeats to give every rank as many batches are not counted twice (see `_first_seen`)."""
        import datasets

        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = self.eval_dataset if dataset is None else dataset
        if isinstance(dataset, datasets.Dataset) and "pair_index" not in dataset.column_names:
            dataset = dataset.add_column("pair_index", list(range(len(dataset))))
        self._eval_rows = dataset
        collator = self.data_collator
        self.data_collator = _WithPairIndex(collator)
        try:
            return super().get_eval_dataloader(dataset)
        finally:
            self.data_collator = collator

    def evaluation_loop(self, *args, **kwargs):
        self._eval_seen = set()
        return super().evaluation_loop(*args, **kwargs)

    def _first_seen(self, index: torch.Tensor) -> list[bool]:
        """For each pair of this rank's eval batch, whether it is the first time the evaluation meets it, in the order
        (batch, rank, position); the same answer on every rank. A collective: every rank calls it once per batch."""
        index = index.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            width = torch.tensor([index.numel()], device=index.device)
            width = int(self.accelerator.gather(width).max())
            padded = torch.full((width,), -1, dtype=index.dtype, device=index.device)
            padded[: index.numel()] = index
            gathered = self.accelerator.gather(padded).view(self.accelerator.num_processes, width).tolist()
        else:
            gathered = [index.tolist()]
        mine = []
        for rank, row in enumerate(gathered):
            for i in row:
                first = i >= 0 and i not in self._eval_seen
                self._eval_seen.add(i)
                if rank == self.accelerator.process_index and i >= 0:
                    mine.append(first)
        return mine

    # ------------------------------------------------------------------------------------------ loss
    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """Collect the micro-batches of one optimizer step and the totals that normalise their losses."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.sp_size > 1:  # this rank's slices of the rows, as prediction fields
            batches = [sequence_parallel.local_batch(b) for b in batches]
        # host counts from the collator: no device read on one process (see modeling._host_count)
        totals = [
            float(sum(int(b["num_pairs"]) for b in batches)),
            float(sum(int(b["nll_tokens"]) if "nll_tokens" in b else int(b["pred_nll"].sum()) for b in batches)),
        ]
        world = self.accelerator.num_processes
        if world > 1:  # one reduction and one read per optimizer step
            reduced = self.accelerator.reduce(torch.tensor(totals, device=self.accelerator.device), reduction="sum")
            totals = reduced.tolist()
        # DDP averages gradients over ranks, so each rank normalises by (global total / world size)
        self._loss_totals = (totals[0] / world, totals[1] / world)
        self._steps_since_log += 1
        return batches, torch.tensor(totals[1])

    def _check_batch(self, inputs):
        if "pred_pos" not in inputs:
            raise ValueError(
                "the batch lacks orpo_plugin's prediction fields: the data_collator must be "
                "orpo_plugin.PreferenceCollator (or produce the same keys)"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._check_batch(inputs)
        total_pairs, total_tokens = self._loss_totals if (self._loss_totals and model.training) else (None, None)
        if self._verify_head_on_first_step:
            self._verify_head_now(model)
        attention.register_host_layout(inputs)  # attention plans read the collator's host lists, not the device
        split = bool(inputs.get("sp_local"))  # a slice of the row (sequence parallelism, training)
        sp_group = None
        if split:
            from deepspeed.utils import groups

            sp_group = groups._get_sequence_parallel_group()
        # autocast around the whole computation, not only the model's forward (where accelerate puts it): the
        # output layer applied to the hidden states runs in the precision the model's own head would
        with attention.attention_implementation(model, self._attention_for(split)), self.accelerator.autocast():
            result = orpo_forward(
                model,
                inputs,
                self.head,
                self.beta,
                self.chunk_size,
                total_pairs,
                total_tokens,
                self.logits_in_forward,
                getattr(self.args, "loss_type", "odds_ratio"),
                sp_group=sp_group,
                sp_size=self.sp_size if split else 1,
            )
        mode = "train" if model.training else "eval"
        counted = mode == "train" or self._count_eval_sums
        for k, v in result.sums.items():
            # an uncounted batch (pairs accelerate repeated) adds zeros: every rank then holds the same keys, and
            # `log` reduces the same tensor on every rank even where all of a rank's eval pairs were repeats
            if not counted:
                v = torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0.0
            self._metric_sums[mode][k] = self._metric_sums[mode][k] + v
        loss = result.output.loss
        return (loss, result.sums) if return_outputs else loss

    # ------------------------------------------------------------------------------------------ training step
    def training_step(self, model, inputs, *args, **kwargs):
        # CPU4BitGuardMixin.training_step (reached through super()) refuses 4-bit layers repacked for inference
        if self._verify_head_on_first_step:  # a plain input, so under the model's own attention, not the layout's
            self._verify_head_now(model)
        # Forward and backward under one attention override: gradient checkpointing recomputes the layers during
        # backward, and the recomputation must run the same attention as the forward did.
        split = bool(inputs.get("sp_local"))
        with attention.attention_implementation(model, self._attention_for(split)), self.activation_offload_context:
            return super().training_step(model, inputs, *args, **kwargs)

    def _attention_for(self, split: bool) -> str | None:
        """The attention of a forward: the layout's, wrapped in DeepSpeed's Ulysses all-to-all for a row slice."""
        if not split:
            return self.attention_override
        if self._sp_attention is None:
            self._sp_attention = sequence_parallel.register_attention(self.attention_override, self.model)
        return self._sp_attention

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """TRL's return: the batch's mean chosen and rejected logits as "predictions" and zero labels, so that
        `compute_metrics(EvalPrediction)` runs (one pair of values per evaluation batch)."""
        inputs = dict(inputs)
        index = inputs.pop("pair_index", None)
        keep = self._first_seen(index) if index is not None else []
        if not all(keep) and any(keep) and self._eval_rows is not None:
            # a pair accelerate repeated on this rank: the batch's other pairs, collated again
            rows = [self._eval_rows[i] for i, k in zip(index.tolist(), keep) if k]
            inputs = self.data_collator([{k: v for k, v in r.items() if k != "pair_index"} for r in rows])
        inputs = self._prepare_inputs(inputs)
        # a batch made only of repeated pairs still runs (sharded models need every rank's forward), uncounted
        self._count_eval_sums = any(keep) or not keep
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, sums = self.compute_loss(model, inputs, return_outputs=True)
        finally:
            self._count_eval_sums = True
        if prediction_loss_only:
            return loss.detach(), None, None
        if ignore_keys is None:
            ignore_keys = getattr(getattr(unwrap(model), "config", None), "keys_to_ignore_at_inference", None) or []
        metrics = metrics_from_sums(sums, self.beta, prefix="eval_")
        logits = [metrics[k] for k in ("eval_logits/chosen", "eval_logits/rejected") if k not in ignore_keys]
        logits = torch.tensor(logits, device=self.accelerator.device)
        labels = torch.zeros(logits.shape[0], device=self.accelerator.device)
        return loss.detach(), logits, labels

    # ------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else ("eval" if "eval_loss" in logs else None)
        if mode is not None and self._metric_sums[mode]:
            sums = dict(self._metric_sums[mode])
            if self.accelerator.num_processes > 1:
                keys = sorted(sums)
                stacked = torch.stack(
                    [torch.as_tensor(sums[k], dtype=torch.float32, device=self.accelerator.device) for k in keys]
                )
                stacked = self.accelerator.reduce(stacked, reduction="sum").cpu()
                sums = dict(zip(keys, stacked))
            else:  # the sums kept on the device are read in one copy: one synchronisation per log
                on_device = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
                if on_device:
                    values = torch.stack([sums[k].float() for k in on_device]).cpu()
                    sums.update(zip(on_device, values))
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
