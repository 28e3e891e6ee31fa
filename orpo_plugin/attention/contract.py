"""The attention-keyword contract: what each keyword transformers passes to an attention function means, which
path honours it (`SUPPORTED_BY`, the source of the table in docs/layouts.md), and `read_features`, which every path calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_NAME = "orpo_sdpa"
FLEX_NAME = "orpo_flex"
FLASH_NAME = "orpo_flash"
VARLEN_NAME = "orpo_varlen"


# ---------------------------------------------------------------------------------------------------------------
# The keyword arguments transformers passes to an attention function. Each one is either honoured by a path, inert
# (does not change what attention computes), or refused: an unknown keyword with a value stops the forward, because
# dropping it silently is how a loss goes wrong without anyone noticing.

FEATURES = {
    "sliding_window": "a sliding attention window",
    "softcap": "attention-logit soft-capping",
    "s_aux": "attention sinks",
    "dropout": "attention dropout",
}
# Keywords that do not change attention (layout keywords are read by the paths themselves).
_INERT = {
    "position_ids",
    "cache_position",
    "use_cache",
    "output_attentions",
    "output_router_logits",
    "output_hidden_states",
    "return_dict",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "prefix_segments",
    "kernel_options",
}
# Where each feature can run with a padding-free row (shown in refusals and the table in docs/layouts.md).
SUPPORTED_BY = {
    "sliding_window": "orpo_sdpa (sdpa/eager models), orpo_flex (flex_attention), orpo_flash (flash-attn) and "
    "orpo_varlen (torch varlen_attn with window_size)",
    "softcap": "orpo_sdpa (eager models), orpo_flex (flex_attention), orpo_flash (flash-attn)",
    "s_aux": "orpo_sdpa (eager models) and orpo_flex on a GPU",
    "dropout": "orpo_sdpa (sdpa/eager models) and orpo_flash; or set disable_dropout=True",
}


@dataclass(frozen=True)
class Features:
    """What one attention call must compute beyond causal softmax attention inside each segment."""

    scaling: float | None = None
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    dropout: float = 0.0


def read_features(path: str, module, kwargs: dict, supported: tuple[str, ...]) -> Features:
    """Features of one call; raise for a feature `path` cannot honour or a keyword it does not know."""
    values = {}
    for name, value in kwargs.items():
        if name in _INERT or value is None:
            continue
        if name == "past_key_values":
            raise ValueError(f"{path} runs training forwards only (no KV cache); pass use_cache=False")
        if name == "is_causal":
            if value:
                continue
            raise ValueError(f"{path} implements causal attention; {_owner(module)} asks for is_causal=False")
        if name == "scaling":
            values["scaling"] = float(value)
            continue
        if name == "dropout" and not value:
            continue
        if name not in FEATURES:
            raise ValueError(
                f"{path} does not know the attention keyword {name!r} ({_owner(module)} passes {name}={value!r}); "
                "refusing rather than ignoring it. Use the padded layout (padding_free=False, packing=False, "
                "prefix_sharing=False)"
            )
        if name not in supported:
            raise ValueError(
                f"{_owner(module)} uses {FEATURES[name]} ({name}={_short(value)}), which {path} cannot honour. "
                f"Supported by: {SUPPORTED_BY[name]}; or use the padded layout"
            )
        values[name] = value
    return Features(
        scaling=values.get("scaling"),
        window=int(values["sliding_window"]) if "sliding_window" in values else None,
        softcap=float(values["softcap"]) if "softcap" in values else None,
        sinks=values.get("s_aux"),
        dropout=float(values.get("dropout", 0.0)),
    )


def _owner(module) -> str:
    config = getattr(module, "config", None)
    return f"{type(module).__name__}" + (f" ({config.model_type})" if getattr(config, "model_type", None) else "")


def _short(value) -> str:
    return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


# ---------------------------------------------------------------------------------------------------------------
# The layout keywords, as dense masks (the reference every kernel is tested against):
# - `prefix_segments` [S, 4] (start, prompt_len, chosen_len, rejected_len): chosen queries see the prompt and
#   earlier chosen keys; rejected queries see the prompt and earlier rejected keys, never chosen ones;
# - otherwise `cu_seq_lens_q` (sequence boundaries): causal attention inside each sequence.


# The collator's host copies of the layout tensors (`prefix_segments_host`, `cu_seq_lens_host`) of the batch being
# trained, so that attention plans read Python lists instead of the device tensors (a device-to-host copy, which
# waits for the device, once per micro-batch).
HOST_LAYOUT_KEYS = {"prefix_segments": "prefix_segments_host", "cu_seq_lens_q": "cu_seq_lens_host"}
_host_layouts: dict = {}


def register_host_layout(batch: dict) -> None:
    """Remember the host copies of `batch`'s layout tensors (see `host_list`); the previous batch's are dropped."""
    _host_layouts.clear()
    for key, host_key in HOST_LAYOUT_KEYS.items():
        if isinstance(batch.get(key), torch.Tensor) and batch.get(host_key) is not None:
            _host_layouts[key] = (batch[key], batch[host_key])


def host_list(layout: torch.Tensor) -> list:
    """`layout.tolist()`, from the collator's host copy when `layout` is the registered tensor (no device read)."""
    for tensor, host in _host_layouts.values():
        if tensor is layout:
            return host
    return layout.tolist()


def _lower_right_causal(lq: int, lk: int, device, window: int | None = None) -> torch.Tensor:
    """[lq, lk] boolean mask: query i (at key position p = lk - lq + i) sees keys j <= p, and p - j < window."""
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
    if window is not None:
        mask &= torch.ones(lq, lk, dtype=torch.bool, device=device).triu(diagonal=lk - lq - window + 1)
    return mask


def prefix_sharing_mask(segments: torch.Tensor, total: int, device=None, window: int | None = None) -> torch.Tensor:
    """Dense [total, total] boolean mask (True = may attend) of a prefix-shared row (the reference layout).

    With a window, distances are positions in the unshared sequence ([prompt][rejected] for a rejected token).
    """
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    for start, prompt_len, chosen_len, rejected_len in host_list(segments):
        a, b, e = start, start + prompt_len + chosen_len, start + prompt_len + chosen_len + rejected_len
        mask[a:b, a:b] = _lower_right_causal(b - a, b - a, device, window)
        if rejected_len:
            allowed = _lower_right_causal(rejected_len, prompt_len + rejected_len, device, window)
            mask[b:e, a : a + prompt_len] = allowed[:, :prompt_len]
            mask[b:e, b:e] = allowed[:, prompt_len:]
    return mask
