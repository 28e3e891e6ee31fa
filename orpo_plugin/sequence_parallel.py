"""Ulysses sequence parallelism (DeepSpeed's ALST, through accelerate's `ParallelismConfig(sp_backend="deepspeed")`)
for packed and padding-free ORPO rows.

What transformers' Trainer and accelerate do with `sp_size` N > 1 under DeepSpeed, and what orpo_plugin adds:

- accelerate initialises DeepSpeed's sequence-parallel groups (N consecutive ranks each) and transformers wraps the
  train loader in DeepSpeed's `UlyssesSPDataLoaderAdapter`: the N ranks of a group exchange their loaders' batches
  and, one batch after another, each takes its 1/N slice of the row along the sequence. The adapter shifts `labels`
  into `shift_labels` before it slices, so the target of the last position of a slice is the first token of the next
  one. It slices every tensor of shape [batch, seq] and copies every other value to all ranks.
- orpo_plugin's collator output (`to_sp_batch`) is given in that form: the row, padded to a multiple of N, its
  `position_ids`, `labels` (each predicted token at its own position) and one [1, seq] tensor per prediction field
  (`sp_seq`, `sp_nll`, `sp_in_logits_*`), all at the position that predicts; the sequence boundaries
  (`cu_seq_lens_host`) and the row's counts stay Python values, the same on every rank. `local_batch` turns a slice
  back into the trainer's prediction fields (`pred_pos`, ...), on the host.
- Attention (`register_attention`): DeepSpeed's `UlyssesSPAttentionHF` around orpo_plugin's packed-row kernel. Its
  all-to-all gives each rank the whole row for 1/N of the heads; the kernel then attends inside each sequence of the
  whole row, from the full-row boundaries.
- The loss (`group_sum`): each rank computes the log-prob sums, response-token counts and NLL sum of the
  predictions in its slice; one all-reduce over the group gives the whole row's, so every rank computes the same
  loss and metrics as one process. The gradient of a rank is its own share only (`t + (sum - t).detach()`, as
  transformers' `deepspeed_sp_compute_loss` does): DeepSpeed's ZeRO-1/2 sums gradients over the group and averages
  them over data-parallel groups, which gives one process's gradient.

Refused at start (`check_supported`), each with a message: the padded layout (its rows are not one packed row) and
prefix sharing (one position predicts both branches' first tokens, which a per-position slice cannot hold), ZeRO-3
(DeepSpeed < 0.20.2 averages its gradients over the group instead of summing them; untested here), attention heads
that the group cannot divide, a model whose own attention takes the packed row (no orpo_plugin kernel to wrap), a
packed-row kernel other than orpo_sdpa (the one verified under the split; `attention_backend='auto'` picks it:
`sp_attention`), a model whose logits are computed inside its forward, a process count the parallelism config does
not account for, a data collator other than orpo_plugin's, and pairs with images (their vision inputs are not split).
"""

from __future__ import annotations

import math

import torch

from .attention.contract import ATTENTION_NAME

NO_PREDICTION = -2  # `sp_seq` at a position that predicts nothing (-1: a prompt token, counted in the NLL only)
_PRED = {  # prediction field -> its per-position field
    "pred_seq": "sp_seq",
    "pred_nll": "sp_nll",
    "pred_in_logits_chosen": "sp_in_logits_chosen",
    "pred_in_logits_rejected": "sp_in_logits_rejected",
}
# Python values of the row that every rank of the group keeps whole (the adapter copies non-tensors)
HOST_KEYS = (
    "cu_seq_lens_host",
    "max_length_q",
    "max_length_k",
    "num_pairs",
    "real_tokens",
    "total_tokens",
    "nll_tokens",
    "in_logits_chosen_count",
    "in_logits_rejected_count",
)
SUFFIX = "_ulysses"


def text_config(model):
    """The config holding the attention shapes of `model` (a PEFT or DeepSpeed wrapper, or a multimodal config)."""
    from .sharded_head import unwrap

    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sp_size(accelerator) -> int:
    """The sequence-parallel size accelerate trains with (1: none)."""
    pc = getattr(accelerator, "parallelism_config", None)
    if pc is None or not getattr(pc, "sp_enabled", False):
        return 1
    return int(pc.sp_size)


def check_supported(trainer, sp: int) -> None:
    """ValueError naming what sequence parallelism cannot run here (see the module docstring)."""
    from .collators import PreferenceCollator
    from .vision import VisionPreferenceCollator

    args = trainer.args
    layout = args.layout
    where = f"sequence parallelism (sp_size={sp})"
    if layout not in ("padding_free", "packing"):
        why = (
            "its rows are chosen and rejected sequences padded side by side, not one row split along the sequence"
            if layout == "padded"
            else "one position predicts the first token of both branches, which a slice of the row cannot hold"
        )
        raise ValueError(
            f"{where} trains one packed row split across ranks; the {layout} layout cannot be split ({why}). "
            "Set packing=True (or padding_free=True) and prefix_sharing=False"
        )
    if not trainer.is_deepspeed_enabled:
        raise ValueError(f"{where} runs through DeepSpeed (sp_backend='deepspeed'): launch with a DeepSpeed config")
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    if stage == 3:
        raise ValueError(
            f"{where} with ZeRO stage 3: DeepSpeed < 0.20.2 averages ZeRO-3 gradients over the sequence-parallel group "
            "where ZeRO-1/2 sum them, and orpo_plugin is tested with ZeRO-1/2 only. Use zero_stage 2 "
            "(configs/accelerate/deepspeed-ulysses.yaml)"
        )
    pc, world = trainer.accelerator.parallelism_config, trainer.accelerator.num_processes
    if pc.total_size != world:
        raise ValueError(
            f"{where}: {world} processes, but the parallelism config accounts for {pc.total_size} "
            f"(sp_size {sp} x dp_replicate_size {pc.dp_replicate_size} x dp_shard_size {pc.dp_shard_size}). Set "
            f"parallelism_config_dp_replicate_size to {world // sp} (accelerate launch "
            f"--parallelism_config_dp_replicate_size {world // sp}): the data-parallel groups of sp_size ranks each"
        )
    config = text_config(trainer.model)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % sp or not (kv % sp == 0 or sp % kv == 0):
        raise ValueError(
            f"{where}: the model has {heads} attention heads and {kv} key/value heads; Ulysses gives each rank "
            f"heads/sp_size of them, so sp_size must divide the attention heads ({heads}) and divide or be a "
            f"multiple of the key/value heads ({kv})"
        )
    if trainer.attention_override is None:
        raise ValueError(
            f"{where}: the model's own attention ({config._attn_implementation}) would take the packed row; "
            "orpo_plugin splits rows only through its own packed-row kernels. Load the model with "
            "attn_implementation='sdpa'"
        )
    if trainer.attention_override != ATTENTION_NAME:
        raise ValueError(
            f"{where}: attention_backend={trainer.args.attention_backend!r} gives {trainer.attention_override}, which "
            f"is not verified under sequence parallelism yet; {ATTENTION_NAME} is (tests/distributed/"
            "test_sequence_parallel.py). Set attention_backend='sdpa'"
        )
    if trainer.logits_in_forward:
        raise ValueError(f"{where}: this model computes its logits inside its forward, which a row slice cannot use")
    if not isinstance(trainer.data_collator, PreferenceCollator):
        raise ValueError(f"{where} needs orpo_plugin's PreferenceCollator, got {type(trainer.data_collator).__name__}")
    if isinstance(trainer.data_collator, VisionPreferenceCollator):
        raise ValueError(
            f"{where} splits a row's tokens across ranks but not its images' vision inputs: pairs with images train "
            "without sequence parallelism (sp_size 1)"
        )


def sp_attention(trainer) -> str | None:
    """The packed-row kernel to wrap under sequence parallelism: `attention_backend='auto'` picks orpo_sdpa (the one
    verified under the split) where the model's features allow it; a backend named by the user stays as chosen
    (and `check_supported` refuses it unless it is sdpa)."""
    from . import attention
    from .sharded_head import unwrap

    args = trainer.args
    if args.attention_backend != "auto" or trainer.attention_override in (None, ATTENTION_NAME):
        return trainer.attention_override
    name, _ = attention.pick_attention(unwrap(trainer.model), args.layout, "sdpa", args.use_cpu, args.varlen_attention)
    return name


def init_deepspeed_comm() -> None:
    """Give DeepSpeed's communication layer the process group torch already has.

    accelerate builds DeepSpeed's sequence-parallel groups before `deepspeed.initialize` (which would initialise its
    communication layer), and only initialises that layer itself when DeepSpeed runs on an accelerator; on CPU
    processes (`use_cpu`, gloo) the group creation would fail with a bare assertion."""
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)


class SPCollator:
    """The trainer's collator, with its rows padded to a multiple of `sp` and given in the adapter's form.

    `row_length`: pad every row to this length too. gloo (CPU processes) gathers only tensors of one size, and
    DeepSpeed's adapter gathers the rows of the group's ranks: on gloo every row must have the same length."""

    def __init__(self, collator, sp: int, row_length: int | None = None):
        self.collator, self.sp, self.row_length = collator, sp, row_length

    def __call__(self, features):
        batch = self.collator(features)
        if self.row_length is not None:
            batch = pad_row(batch, self.row_length, self.collator.pad_token_id)
        return to_sp_batch(batch, self.sp)


def pad_row(batch: dict, length: int, pad_token_id: int) -> dict:
    """A padding-free/packed row padded to `length` tokens with one more filler sequence (never predicted)."""
    width = batch["input_ids"].shape[1]
    if width > length:
        raise ValueError(
            f"sequence parallelism on gloo (CPU processes): a row of {width} tokens is longer than the fixed row "
            f"length {length}; raise packing_max_tokens"
        )
    extra = length - width
    if not extra:
        return batch
    batch = dict(batch)
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), pad_token_id, dtype=torch.long)], 1)
    batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra)[None]], 1)
    batch["cu_seq_lens_host"] = list(batch["cu_seq_lens_host"]) + [length]
    batch["max_length_q"] = batch["max_length_k"] = max(int(batch["max_length_q"]), extra)
    batch["total_tokens"] = length
    return batch


def row_length(args, multiple: int) -> int | None:
    """The fixed row length `SPCollator` pads to on gloo (None on other backends): the packing budget (or
    2 x max_length x the micro-batch without packing) rounded up to `multiple`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return None
    budget = args.packing_budget() if args.packing else 2 * (args.max_length or 1024) * args.per_device_train_batch_size
    return -(-budget // multiple) * multiple


def pad_multiple(current: int | None, sp: int) -> int:
    """The collator's `pad_to_multiple_of` that also makes every row divisible by `sp`."""
    return sp if not current else current * sp // math.gcd(current, sp)


def to_sp_batch(batch: dict, sp: int) -> dict:
    """A padding-free/packed batch of `PreferenceCollator` in the form DeepSpeed's adapter slices (module docstring).

    ValueError when the row is not a multiple of `sp` or a prediction is not of the next token (a layout that
    sequence parallelism cannot express)."""
    ids = batch["input_ids"]
    width = ids.shape[1]
    if ids.shape[0] != 1 or width % sp:
        raise ValueError(
            f"sequence parallelism needs one row whose length is a multiple of {sp}, got {tuple(ids.shape)}"
        )
    pos, target = batch["pred_pos"], batch["pred_target"]
    nxt = pos + 1
    if bool((nxt >= width).any()) or bool((ids[0, nxt.clamp(max=width - 1)] != target).any()):
        raise ValueError("sequence parallelism: a prediction is not of the next token in the row")
    labels = torch.full((1, width), -100, dtype=torch.long)
    labels[0, nxt] = target
    out = {"input_ids": ids, "position_ids": batch["position_ids"], "labels": labels}
    for pred, field in _PRED.items():
        fill = NO_PREDICTION if field == "sp_seq" else 0
        values = torch.full((1, width), fill, dtype=torch.long)  # long: gloo gathers no bool tensors
        values[0, pos] = batch[pred].long()
        out[field] = values
    for key in HOST_KEYS:
        out[key] = batch[key]
    return out


def local_batch(shard: dict) -> dict:
    """This rank's slice from the adapter, as the trainer's prediction fields (computed on the host)."""
    seq = shard["sp_seq"][0].cpu()
    pos = torch.nonzero(seq != NO_PREDICTION).squeeze(1)
    batch = {k: shard[k] for k in ("input_ids", "position_ids")}
    batch["pred_pos"] = pos
    batch["pred_target"] = shard["shift_labels"][0].cpu()[pos]
    for pred, field in _PRED.items():
        values = shard[field][0].cpu()[pos]
        batch[pred] = values if pred == "pred_seq" else values.bool()
    cu = torch.tensor(shard["cu_seq_lens_host"], dtype=torch.int32)
    batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone())  # the whole row's: attention sees the whole row
    for key in HOST_KEYS:
        batch[key] = shard[key]
    batch["sp_local"] = True
    return batch


def group_sum(t: torch.Tensor, group) -> torch.Tensor:
    """The sum of `t` over the sequence-parallel group, differentiable towards this rank's own `t` only."""
    import torch.distributed as dist

    total = t.detach().clone()
    dist.all_reduce(total, group=group)
    return t + (total - t.detach())


def register_attention(name: str, model) -> str:
    """Register DeepSpeed's Ulysses attention around the orpo_plugin kernel `name`; returns the wrapped name."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from deepspeed.utils import groups
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    wrapped = name + SUFFIX
    if wrapped in AttentionInterface._global_mapping:
        return wrapped
    config = text_config(model)
    heads = config.num_attention_heads
    ulysses = UlyssesSPAttentionHF(
        attn=AttentionInterface._global_mapping[name],
        batch_size=1,
        attn_head_count=heads,
        attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
        kv_head_count=getattr(config, "num_key_value_heads", None) or heads,
        num_hidden_layers=config.num_hidden_layers,
        process_group=groups._get_sequence_parallel_group(),
        seq_length_is_variable=True,
        disable_in_eval=True,
    )

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # orpo_plugin's kernels take no mask (the row's boundaries are in the kwargs)
        return ulysses(module, query, key, value, None, *args, **kwargs)

    AttentionInterface.register(wrapped, attention)
    AttentionMaskInterface.register(wrapped, AttentionMaskInterface._global_mapping[name])
    return wrapped
