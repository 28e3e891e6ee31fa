"""One ORPO forward: model -> final hidden states -> log-probs of the predicted tokens -> loss and metric sums.

The model is called as a whole (so DDP/FSDP/DeepSpeed wrappers and PEFT hooks run) with `logits_to_keep=1`;
the final hidden states are taken from its decoder by a forward hook, and only the positions the loss needs
go through the output layer: in chunks (`chunked.py`) or as one logits tensor. Under FSDP2 and DeepSpeed ZeRO-3 the
output layer runs inside the forward of the module that shards it (`sharded_head.py`). Apart: the checks run once at
start (`startup_checks.py`) and the bitsandbytes CPU guard (`bnb_cpu.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ._compat import forward_accepts
from .chunked import chunked_target_logps, full_target_logps
from .losses import ORPOOutput, orpo_loss, sequence_sums
from .sequence_parallel import group_sum
from .sharded_head import OutputHead, hidden_then_head, sharded_head_owner, unwrap
from .vision import mrope_position_ids, tower_once

# OutputHead and unwrap live in sharded_head.py; they are re-exported here, where the forward's callers look
__all__ = [
    "ForwardResult",
    "OutputHead",
    "metrics_from_sums",
    "model_inputs",
    "orpo_forward",
    "predicted_logps",
    "unwrap",
]

logger = logging.getLogger("orpo_plugin")

MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "prefix_segments",
)


def model_inputs(batch: dict) -> dict:
    """The batch's model inputs: the layout's, and the processor's vision inputs a vision batch names."""
    keys = MODEL_INPUT_KEYS + tuple(batch.get("vision_keys", ()))
    return {k: batch[k] for k in keys if k in batch}


def _logps_from_model_logits(model, batch: dict, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model computes the logits of the needed positions inside its own forward (`logits_to_keep`).

    For sharded engines (FSDP, ZeRO-3), whose output-layer weight only exists whole inside the forward, and
    for models whose logits are not plain `lm_head(hidden)`.
    """
    positions = batch["pred_pos"]
    rows, width = batch["input_ids"].shape
    unique, inverse = torch.unique(positions, return_inverse=True)  # sorted flat positions
    if rows == 1:
        logits = model(**kwargs, logits_to_keep=unique, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[inverse]  # [N, V]
    else:  # padded rows: all positions (a 2D logits_to_keep needs a newer transformers than we support)
        logits = model(**kwargs, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    return full_target_logps(logits, batch["pred_target"])


def encoder_decoder_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder-decoder forward (T5, BART): prompts into the encoder, shifted responses into the decoder.

    The model's own logits are used (T5 rescales the hidden states and BART adds a bias before its output layer).
    """
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        use_cache=False,
    ).logits  # [2P, T_dec, V]
    logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["pred_pos"])
    return full_target_logps(logits, batch["pred_target"])


def predicted_logps(
    model, batch: dict, head: OutputHead, chunk_size: int | None, logits_in_forward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), sum of logits) for every prediction of the batch; chunked when `chunk_size` is set.

    Under FSDP2/ZeRO-3 the output layer runs inside the forward of the module that shards it (`hidden_then_head`).
    """
    if "decoder_input_ids" in batch:
        return encoder_decoder_logps(model, batch)
    with tower_once(model, batch):  # a batch with images: the vision tower runs once per pair
        return _decoder_logps(model, batch, head, chunk_size, logits_in_forward)


def _decoder_logps(model, batch: dict, head: OutputHead, chunk_size: int | None, logits_in_forward: bool):
    kwargs = model_inputs(batch)
    positions = mrope_position_ids(model, batch)  # Qwen-VL with images in a padding-free or prefix-shared row
    if positions is not None:
        kwargs["position_ids"] = positions
    if logits_in_forward:
        return _logps_from_model_logits(model, batch, kwargs)
    if forward_accepts(type(unwrap(model)), "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    kwargs["use_cache"] = False
    targets = batch["pred_target"]

    def select(hidden):
        # index_select, not fancy indexing: on CPU its backward (index_add) is much cheaper than index_put
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["pred_pos"])  # [N, H]

    def apply(hidden):
        if chunk_size:
            module = head.module
            return chunked_target_logps(
                hidden, module.weight, targets, module.bias, chunk_size, scale=head.scale, softcap=head.softcap
            )
        return full_target_logps(logits(hidden), targets)

    owner = sharded_head_owner(model, head)
    logits = head.logits_by(owner)
    result, _ = hidden_then_head(model, kwargs, select, apply, owner, head.module)
    return result


def _host_count(batch: dict, key: str, mask: torch.Tensor | None) -> int:
    """A count the collator computed on the host (`PreferenceCollator` gives Python ints); a collator that gives a
    tensor, or only the `mask` to count, costs a device read (a synchronisation) here."""
    value = batch.get(key)
    if value is None:
        if mask is None:
            raise ValueError(f"the batch lacks '{key}' (orpo_plugin.PreferenceCollator gives it)")
        return int(mask.sum())
    return int(value)


@dataclass
class ForwardResult:
    output: ORPOOutput
    sums: dict  # metric numerators/denominators of this micro-batch: detached device tensors or host floats


def orpo_forward(
    model,
    batch: dict,
    head: OutputHead,
    beta: float,
    chunk_size: int | None = None,
    total_pairs: float | None = None,
    total_nll_tokens: float | None = None,
    logits_in_forward: bool = False,
    loss_type: str = "odds_ratio",
    sp_group=None,
    sp_size: int = 1,
) -> ForwardResult:
    """Loss of one micro-batch (normalised by the given totals) and the sums its metrics are made of.

    Under sequence parallelism (`sp_group`, `sp_size` ranks) the batch is this rank's slice of the row
    (sequence_parallel.local_batch): the per-sequence sums and counts, the NLL sum and the logit sums are summed over
    the group (one all-reduce), the gradient flowing to this rank's own share, and the metric sums are divided by
    `sp_size` so that the reduction over all ranks in `log` counts each row once.
    """
    token_logps, logit_sums = predicted_logps(model, batch, head, chunk_size, logits_in_forward)
    # No value is read back from the device here (see `_host_count`): masks select by `where`, not by indexing.
    pairs = _host_count(batch, "num_pairs", None)
    seq = batch["pred_seq"]
    # prompt predictions (sequence -1) go to an extra last slot, dropped
    slots = torch.where(seq >= 0, seq, torch.full_like(seq, 2 * pairs))
    seq_sums, seq_counts = sequence_sums(token_logps, slots, 2 * pairs + 1)
    nll_mask = batch["pred_nll"]
    nll_tokens = _host_count(batch, "nll_tokens", nll_mask)
    nll_sum = -torch.where(nll_mask, token_logps, torch.zeros_like(token_logps)).sum()
    in_logits_chosen, in_logits_rejected = batch["pred_in_logits_chosen"], batch["pred_in_logits_rejected"]
    zero = torch.zeros_like(logit_sums)
    logits_chosen_sum = torch.where(in_logits_chosen, logit_sums, zero).sum().detach()
    logits_rejected_sum = torch.where(in_logits_rejected, logit_sums, zero).sum().detach()
    if sp_group is not None:
        n, dtype = seq_sums.shape[0], seq_sums.dtype
        parts = [seq_sums, seq_counts, nll_sum[None].to(dtype)]
        parts += [logits_chosen_sum[None].to(dtype), logits_rejected_sum[None].to(dtype)]
        total = group_sum(torch.cat(parts), sp_group)  # one all-reduce per micro-batch
        seq_sums, seq_counts, nll_sum = total[:n], total[n : 2 * n], total[2 * n]
        logits_chosen_sum, logits_rejected_sum = total[2 * n + 1].detach(), total[2 * n + 2].detach()
    logps = (seq_sums / seq_counts.clamp(min=1))[: 2 * pairs]
    chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]
    out = orpo_loss(chosen_logps, rejected_logps, nll_sum, nll_tokens, beta, total_pairs, total_nll_tokens, loss_type)
    vocab = head.vocab_size
    with torch.no_grad():
        c, r = chosen_logps.detach().float(), rejected_logps.detach().float()
        # device tensors stay on the device (summed there over the steps, read once per log); counts are host floats
        sums = {
            "pairs": float(pairs),
            "chosen_logps": c.sum(),
            "rejected_logps": r.sum(),
            "accuracies": (c > r).float().sum(),
            "log_odds_ratio": out.log_sigmoid.detach().float().sum(),
            "log_odds_chosen": out.log_odds.detach().float().sum(),
            "nll_sum": nll_sum.detach().float(),
            "nll_tokens": float(nll_tokens),
            "logits_chosen_sum": logits_chosen_sum,
            "logits_chosen_count": float(_host_count(batch, "in_logits_chosen_count", in_logits_chosen)) * vocab,
            "logits_rejected_sum": logits_rejected_sum,
            "logits_rejected_count": float(_host_count(batch, "in_logits_rejected_count", in_logits_rejected)) * vocab,
            "real_tokens": float(batch["real_tokens"]),
            "total_tokens": float(batch["total_tokens"]),
        }
        if "unshared_tokens" in batch:
            sums["unshared_tokens"] = float(batch["unshared_tokens"])
        if sp_size > 1:  # every rank of the group holds the whole row's sums
            sums = {k: v / sp_size for k, v in sums.items()}
    return ForwardResult(out, sums)


def metrics_from_sums(sums: dict, beta: float, prefix: str = "") -> dict[str, float]:
    """TRL's ORPO metric names from accumulated sums (pair metrics averaged over pairs, NLL over tokens)."""
    p = max(float(sums["pairs"]), 1.0)
    c, r = float(sums["chosen_logps"]) / p, float(sums["rejected_logps"]) / p
    m = {
        "rewards/chosen": beta * c,
        "rewards/rejected": beta * r,
        "rewards/accuracies": float(sums["accuracies"]) / p,
        "rewards/margins": beta * (c - r),
        "logps/chosen": c,
        "logps/rejected": r,
        "logits/chosen": float(sums["logits_chosen_sum"]) / max(float(sums["logits_chosen_count"]), 1.0),
        "logits/rejected": float(sums["logits_rejected_sum"]) / max(float(sums["logits_rejected_count"]), 1.0),
        "nll_loss": float(sums["nll_sum"]) / max(float(sums["nll_tokens"]), 1.0),
        "log_odds_ratio": float(sums["log_odds_ratio"]) / p,
        "log_odds_chosen": float(sums["log_odds_chosen"]) / p,
        "tokens/real": float(sums["real_tokens"]),
        "tokens/padding_fraction": 1.0 - float(sums["real_tokens"]) / max(float(sums["total_tokens"]), 1.0),
    }
    if "unshared_tokens" in sums:
        m["tokens/computed_per_trained"] = float(sums["real_tokens"]) / max(float(sums["unshared_tokens"]), 1.0)
    return {prefix + k: v for k, v in m.items()}
