"""Attention for rows that hold several sequences: per-sequence (varlen) and prefix-shared.

Registered with transformers' AttentionInterface as "orpo_sdpa" (and "orpo_flex" for prefix sharing on
flex_attention models, with a BlockMask), so every model built on that interface can use
it. It reads the layout from the keyword arguments the collator supplies:
- `prefix_segments` [S, 4] (start, prompt_len, chosen_len, rejected_len): chosen queries see the prompt and
  earlier chosen keys; rejected queries see the prompt and earlier rejected keys, never chosen ones;
- otherwise `cu_seq_lens_q` (sequence boundaries): causal attention inside each sequence.
Attention runs per sequence with `scaled_dot_product_attention`, so its cost grows as sum(len^2), not
(sum len)^2 as with a dense block-diagonal mask.

`prefix_sharing_mask` builds the same pattern as a dense boolean mask (the reference, and the sdpa/eager path).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

ATTENTION_NAME = "orpo_sdpa"
FLEX_NAME = "orpo_flex"
# Implementations whose packed-sequence handling transformers provides from position_ids alone.
NATIVE_PACKED = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def _sdpa(q, k, v, scaling, mask=None, is_causal=False):
    # q [B, H, Lq, D]; k, v [B, Hkv, Lk, D]
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling)


def _lower_right_causal(lq: int, lk: int, device) -> torch.Tensor:
    """[lq, lk] boolean mask: query i sees keys j <= lk - lq + i (queries are the last lq of lk positions)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def orpo_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query [B, H, T, D] -> output [B, T, H, D] (B must be 1)."""
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME} expects one packed row per batch, got batch size {query.shape[0]}")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} does not implement attention dropout (disable_dropout=True)")
    segments = kwargs.get("prefix_segments")
    pieces = []
    if segments is not None:
        for start, lp, lc, lr in segments.tolist():
            a, b, e = start, start + lp + lc, start + lp + lc + lr
            pieces.append(_sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling, is_causal=True))
            if lr:
                ks = torch.cat([key[:, :, a : a + lp], key[:, :, b:e]], dim=2)
                vs = torch.cat([value[:, :, a : a + lp], value[:, :, b:e]], dim=2)
                mask = _lower_right_causal(lr, lp + lr, query.device)
                pieces.append(_sdpa(query[:, :, b:e], ks, vs, scaling, mask=mask))
    else:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            raise ValueError(f"{ATTENTION_NAME} needs `cu_seq_lens_q` or `prefix_segments` from the collator")
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            pieces.append(_sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling, is_causal=True))
    out = torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def prefix_sharing_mask(segments: torch.Tensor, total: int, device=None) -> torch.Tensor:
    """Dense [total, total] boolean mask (True = may attend) of a prefix-shared row."""
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    for start, lp, lc, lr in segments.tolist():
        a, b, e = start, start + lp + lc, start + lp + lc + lr
        mask[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool, device=device).tril()
        if lr:
            allowed = _lower_right_causal(lr, lp + lr, device)
            mask[b:e, a : a + lp] = allowed[:, :lp]
            mask[b:e, b:e] = allowed[:, lp:]
    return mask


def _prefix_tables(segments: torch.Tensor, total: int, device):
    """Per token: pair id, branch (0 prompt, 1 chosen, 2 rejected) and position inside its pair's layout."""
    pair = torch.empty(total, dtype=torch.long)
    branch = torch.empty(total, dtype=torch.long)
    position = torch.empty(total, dtype=torch.long)
    for i, (start, lp, lc, lr) in enumerate(segments.tolist()):
        a, b, e = start, start + lp + lc, start + lp + lc + lr
        pair[a:e] = i
        branch[a : a + lp], branch[a + lp : b], branch[b:e] = 0, 1, 2
        position[a:b] = torch.arange(lp + lc)
        position[b:e] = torch.arange(lp, lp + lr)
    return pair.to(device), branch.to(device), position.to(device)


_flex_cache: dict = {}


def prefix_sharing_block_mask(segments: torch.Tensor, total: int, device):
    """flex_attention BlockMask of a prefix-shared row (built once per batch, reused by every layer)."""
    key = (segments.data_ptr(), tuple(segments.shape), total, str(device))
    cached = _flex_cache.get("mask")
    if cached is not None and cached[0] == key and cached[1] is segments:
        return cached[2]
    from torch.nn.attention.flex_attention import create_block_mask

    pair, branch, position = _prefix_tables(segments, total, device)

    def mask_mod(b, h, q, kv):
        same_pair = pair[q] == pair[kv]
        visible_branch = (branch[kv] == 0) | (branch[kv] == branch[q])
        return same_pair & visible_branch & (position[kv] <= position[q])

    mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)
    _flex_cache["mask"] = (key, segments, mask)
    return mask


def orpo_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: flex_attention with the prefix-sharing BlockMask (else the model's own mask)."""
    from transformers.integrations.flex_attention import flex_attention_forward

    segments = kwargs.pop("prefix_segments", None)
    if segments is None:
        raise ValueError(f"{FLEX_NAME} needs `prefix_segments` from the collator")
    mask = prefix_sharing_block_mask(segments, query.shape[2], query.device)
    return flex_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _no_mask(*args, **kwargs):
    return None


_registered = False


def register(name: str = ATTENTION_NAME) -> str:
    """Register "orpo_sdpa" and "orpo_flex" (and no-op mask builders) with transformers; return `name`."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, orpo_sdpa_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
        AttentionInterface.register(FLEX_NAME, orpo_flex_attention)
        AttentionMaskInterface.register(FLEX_NAME, _no_mask)
        _registered = True
    return name


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Temporarily run `model` with another attention implementation (its saved config never sees it)."""
    if name is None:
        yield
        return
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    previous = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = previous[k]
