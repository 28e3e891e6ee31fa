"""orpo_flex: a packed or prefix-shared row through flex_attention with the row's BlockMask, built once per batch
and window.

Honours: scaling, sliding_window (in the BlockMask), softcap and s_aux (by transformers' flex_attention_forward;
sinks on a GPU only). Refuses: dropout, and any other keyword with a value.
"""

from __future__ import annotations

import torch

from .._compat import flex_attention_available
from .contract import FLEX_NAME, host_list, read_features

ORPO_FLEX_FEATURES = ("sliding_window", "softcap", "s_aux")


def flex_available() -> bool:
    """Whether this torch has flex_attention (`_compat.flex_attention_available`)."""
    return flex_attention_available()


def _prefix_tables(segments: torch.Tensor, total: int, device):
    """Per token: pair id, branch (0 prompt, 1 chosen, 2 rejected) and position inside its pair's layout."""
    pair = torch.empty(total, dtype=torch.long)
    branch = torch.empty(total, dtype=torch.long)
    position = torch.empty(total, dtype=torch.long)
    for i, (start, prompt_len, chosen_len, rejected_len) in enumerate(host_list(segments)):
        a, b, e = start, start + prompt_len + chosen_len, start + prompt_len + chosen_len + rejected_len
        pair[a:e] = i
        branch[a : a + prompt_len], branch[a + prompt_len : b], branch[b:e] = 0, 1, 2
        position[a:b] = torch.arange(prompt_len + chosen_len)
        position[b:e] = torch.arange(prompt_len, prompt_len + rejected_len)
    return pair.to(device), branch.to(device), position.to(device)


def _packed_tables(cu: torch.Tensor, total: int, device):
    """`_prefix_tables` of a padding-free row: one "pair" per sequence, all of one branch, positions restart."""
    pair = torch.empty(total, dtype=torch.long)
    position = torch.arange(total)
    bounds = host_list(cu)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pair[a:b] = i
        position[a:b] = torch.arange(b - a)
    pair[bounds[-1] :] = len(bounds)  # tokens past the last sequence (padding) only see each other
    position[bounds[-1] :] = torch.arange(total - bounds[-1])
    return pair.to(device), torch.ones(total, dtype=torch.long, device=device), position.to(device)


_flex_cache: dict = {}


def _block_mask(layout: torch.Tensor, prefix: bool, total: int, device, window: int | None):
    """flex_attention BlockMask of a row (built once per batch and window, reused by every layer and recomputation).

    Distances for the window are positions in the unshared sequence ([prompt][rejected] for a rejected token).
    """
    key = (layout.data_ptr(), tuple(layout.shape), prefix, total, str(device))
    cached = _flex_cache.get("masks")
    if cached is None or cached[0] != key or cached[1] is not layout:
        cached = (key, layout, {})
        _flex_cache["masks"] = cached
    masks = cached[2]
    if window in masks:
        return masks[window]
    from torch.nn.attention.flex_attention import create_block_mask

    tables = _prefix_tables if prefix else _packed_tables
    pair, branch, position = tables(layout, total, device)

    def mask_mod(b, h, q, kv):
        same_pair = pair[q] == pair[kv]
        visible_branch = (branch[kv] == 0) | (branch[kv] == branch[q])
        causal = position[kv] <= position[q]
        if window is not None:
            causal = causal & (position[q] - position[kv] < window)
        return same_pair & visible_branch & causal

    masks[window] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)
    return masks[window]


def prefix_sharing_block_mask(segments: torch.Tensor, total: int, device, window: int | None = None):
    """flex_attention BlockMask of a prefix-shared row."""
    return _block_mask(segments, True, total, device, window)


def packed_block_mask(cu_seq_lens: torch.Tensor, total: int, device, window: int | None = None):
    """flex_attention BlockMask of a padding-free row: causal inside each sequence of `cu_seq_lens`."""
    return _block_mask(cu_seq_lens, False, total, device, window)


def orpo_flex_attention(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface function: flex_attention with the row's BlockMask (softcap/sinks by transformers)."""
    from transformers.integrations.flex_attention import flex_attention_forward

    segments, cu = kwargs.get("prefix_segments"), kwargs.get("cu_seq_lens_q")
    if segments is None and cu is None:
        raise ValueError(f"{FLEX_NAME} needs `prefix_segments` or `cu_seq_lens_q` from the collator")
    f = read_features(FLEX_NAME, module, kwargs, ORPO_FLEX_FEATURES)
    if segments is not None:
        mask = prefix_sharing_block_mask(segments, query.shape[2], query.device, f.window)
    else:
        mask = packed_block_mask(cu, query.shape[2], query.device, f.window)
    return flex_attention_forward(
        module,
        query,
        key,
        value,
        mask,
        scaling=f.scaling,
        softcap=f.softcap,
        s_aux=f.sinks,
        kernel_options=kwargs.get("kernel_options"),
    )
