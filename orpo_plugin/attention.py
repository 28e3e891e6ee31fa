"""Attention for rows that hold several sequences: per-sequence (varlen) and prefix-shared.

Registered with transformers' AttentionInterface as "orpo_sdpa" (and "orpo_flex" for prefix sharing on
flex_attention models, with a BlockMask), so every model built on that interface can use
it. It reads the layout from the keyword arguments the collator supplies:
- `prefix_segments` [S, 4] (start, prompt_len, chosen_len, rejected_len): chosen queries see the prompt and
  earlier chosen keys; rejected queries see the prompt and earlier rejected keys, never chosen ones;
- otherwise `cu_seq_lens_q` (sequence boundaries): causal attention inside each sequence.
Segments of similar length are gathered into padded buckets and each bucket is one batched
`scaled_dot_product_attention` call, so the cost grows as sum(len^2), not (sum len)^2 as with a dense
block-diagonal mask, without one kernel call per sequence.

`prefix_sharing_mask` builds the same pattern as a dense boolean mask (the reference, and the sdpa/eager path).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

ATTENTION_NAME = "orpo_sdpa"
FLEX_NAME = "orpo_flex"
FLASH_NAME = "orpo_flash"
# Implementations whose packed-sequence handling transformers provides from position_ids alone.
NATIVE_PACKED = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def _lower_right_causal(lq: int, lk: int, device) -> torch.Tensor:
    """[lq, lk] boolean mask: query i sees keys j <= lk - lq + i (queries are the last lq of lk positions)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _segments(kwargs) -> list[tuple[list[int], list[int]]]:
    """(query positions, key positions) of every attention segment of the row."""
    segments = kwargs.get("prefix_segments")
    if segments is not None:
        out = []
        for start, lp, lc, lr in segments.tolist():
            a, b, e = start, start + lp + lc, start + lp + lc + lr
            out.append((list(range(a, b)), list(range(a, b))))
            if lr:
                out.append((list(range(b, e)), list(range(a, a + lp)) + list(range(b, e))))
        return out
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"{ATTENTION_NAME} needs `cu_seq_lens_q` or `prefix_segments` from the collator")
    return [(list(range(a, b)), list(range(a, b))) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]


def _plan(kwargs, device, bucket_ratio: float = 0.9, max_bucket: int = 256):
    """Group segments of similar length into padded buckets: one batched sdpa call per bucket.

    A segment's queries are the last Lq of its Lk key positions (causal aligned bottom-right). Segments whose
    queries are their keys (Lq == Lk) are bucketed apart and run with `is_causal` and no mask: right padding
    is then invisible to real queries. The others (rejected branches of prefix-shared pairs) get an explicit
    mask; their padded query rows see every real key, so no softmax row is empty. Padded outputs are dropped.

    All buckets are gathered with one index per tensor (q, k/v), so backward scatters into one zero-filled
    gradient per tensor and layer, not one per bucket. Returns (shapes, masks, q_index, k_index, out_index):
    bucket n's queries are rows [sum of earlier n*mq, + n*mq) of `x.index_select(0, q_index)`, and
    `out_index[t]` is where row token t's output sits among the concatenated padded bucket outputs.
    """
    square, other = [], []
    for seg in _segments(kwargs):
        (square if len(seg[0]) == len(seg[1]) else other).append(seg)
    buckets = []
    for group in (square, other):
        group.sort(key=lambda s: -len(s[1]))
        current = []
        for seg in group:
            if current and (len(seg[1]) < bucket_ratio * len(current[0][1]) or len(current) >= max_bucket):
                buckets.append(current)
                current = []
            current.append(seg)
        if current:
            buckets.append(current)
    shapes, masks, q_parts, k_parts, valid_parts = [], [], [], [], []
    for bucket in buckets:
        mq, mk = max(len(q) for q, _ in bucket), len(bucket[0][1])
        q_idx = torch.zeros(len(bucket), mq, dtype=torch.long)
        k_idx = torch.zeros(len(bucket), mk, dtype=torch.long)
        q_valid = torch.zeros(len(bucket), mq, dtype=torch.bool)
        causal = all(len(q) == len(k) for q, k in bucket)
        mask = None if causal else torch.zeros(len(bucket), 1, mq, mk, dtype=torch.bool)
        for n, (q, k) in enumerate(bucket):
            lq, lk = len(q), len(k)
            q_idx[n, :lq], k_idx[n, :lk], q_valid[n, :lq] = torch.tensor(q), torch.tensor(k), True
            if mask is not None:
                mask[n, 0, :lq, :lk] = _lower_right_causal(lq, lk, None)
                mask[n, 0, lq:, :lk] = True
        shapes.append((len(bucket), mq, mk))
        masks.append(None if mask is None else mask.to(device))
        q_parts.append(q_idx.flatten())
        k_parts.append(k_idx.flatten())
        valid_parts.append(q_valid.flatten())
    q_index = torch.cat(q_parts)
    slots = torch.cat(valid_parts).nonzero().squeeze(1)  # padded-output rows that hold a real query
    out_index = torch.empty_like(slots)
    out_index[q_index[slots]] = slots
    return shapes, masks, q_index.to(device), torch.cat(k_parts).to(device), out_index.to(device)


_plan_cache: dict = {}


def _cached_plan(kwargs, device):
    layout = kwargs.get("prefix_segments")
    layout = layout if layout is not None else kwargs.get("cu_seq_lens_q")
    key = (None if layout is None else (layout.data_ptr(), tuple(layout.shape)), str(device))
    cached = _plan_cache.get("plan")
    if cached is not None and cached[0] == key and cached[1] is layout:
        return cached[2]
    plan = _plan(kwargs, device)
    _plan_cache["plan"] = (key, layout, plan)
    return plan


def orpo_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query [1, H, T, D] -> output [1, T, H, D], attention within segments."""
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME} expects one packed row per batch, got batch size {query.shape[0]}")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} does not implement attention dropout (disable_dropout=True)")
    # squeeze, not [0]: the backward of a view is a view, where select would zero-fill a full-size gradient
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    gqa = query.shape[1] != key.shape[1]
    shapes, masks, q_index, k_index, out_index = _cached_plan(kwargs, query.device)
    # index_select (not fancy indexing): its backward is one scatter-add per tensor on CPU
    qs = q.index_select(0, q_index).split([n * mq for n, mq, _ in shapes])
    ks = k.index_select(0, k_index).split([n * mk for n, _, mk in shapes])
    vs = v.index_select(0, k_index).split([n * mk for n, _, mk in shapes])
    pieces = []
    for (n, mq, mk), mask, qb, kb, vb in zip(shapes, masks, qs, ks, vs):
        res = F.scaled_dot_product_attention(
            qb.view(n, mq, *q.shape[1:]).transpose(1, 2),  # [n, H, Mq, D]
            kb.view(n, mk, *k.shape[1:]).transpose(1, 2),
            vb.view(n, mk, *v.shape[1:]).transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=gqa,
        ).transpose(1, 2)  # [n, Mq, H, D]
        pieces.append(res.reshape(n * mq, *res.shape[2:]))
    out = torch.cat(pieces).index_select(0, out_index)  # real outputs, back in row order
    return out[None], None


def varlen_layout(segments: torch.Tensor, device=None):
    """Flash-attention varlen arguments of a prefix-shared row.

    Queries stay in row order, one sequence per branch: chosen = [prompt + chosen], rejected = [rejected].
    Keys/values are gathered per branch: chosen = [prompt + chosen], rejected = [prompt + rejected]. With
    cu_seqlens_q != cu_seqlens_k, flash-attn (>= 2.1) aligns the causal mask bottom-right, which is exactly
    "rejected token i sees the prompt and rejected tokens <= i".
    Returns (kv_index, cu_seqlens_q, cu_seqlens_k, max_q, max_k).
    """
    kv_index, q_lens, k_lens = [], [], []
    for start, lp, lc, lr in segments.tolist():
        a, b, e = start, start + lp + lc, start + lp + lc + lr
        kv_index.extend(range(a, b))
        q_lens.append(b - a)
        k_lens.append(b - a)
        if lr:
            kv_index.extend(range(a, a + lp))
            kv_index.extend(range(b, e))
            q_lens.append(lr)
            k_lens.append(lp + lr)
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    index = torch.tensor(kv_index, dtype=torch.long)
    return index.to(device), cu_q.to(device), cu_k.to(device), max(q_lens), max(k_lens)


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True):
    """The flash-attention varlen contract on any device (q/k/v as [tokens, heads, dim]), causal bottom-right."""
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qa, qb = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ka, kb = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        mask = _lower_right_causal(qb - qa, kb - ka, q.device) if causal else None
        res = F.scaled_dot_product_attention(
            q[qa:qb].transpose(0, 1), k[ka:kb].transpose(0, 1), v[ka:kb].transpose(0, 1),
            attn_mask=mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        out.append(res.transpose(0, 1))
    return torch.cat(out)


def _flash_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:  # pragma: no cover - needs CUDA
        raise ImportError("prefix_sharing with flash_attention_2 needs the flash-attn package") from err
    return flash_attn_varlen_func


def orpo_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kernel=None, **kwargs):
    """AttentionInterface function: prefix-shared row through a flash-attention varlen kernel."""
    segments = kwargs.get("prefix_segments")
    if segments is None:
        raise ValueError(f"{FLASH_NAME} needs `prefix_segments` from the collator")
    if query.shape[0] != 1:
        raise ValueError(f"{FLASH_NAME} expects one packed row per batch, got batch size {query.shape[0]}")
    kernel = kernel or _flash_kernel()
    # squeeze, not [0]: the backward of a view is a view, where select would zero-fill a full-size gradient
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    index, cu_q, cu_k, max_q, max_k = varlen_layout(segments, query.device)
    out = kernel(
        q, k.index_select(0, index), v.index_select(0, index), cu_q, cu_k, max_q, max_k,
        softmax_scale=scaling, causal=True,
    )
    return out[None], None


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
        AttentionInterface.register(FLASH_NAME, orpo_flash_attention)
        AttentionMaskInterface.register(FLASH_NAME, _no_mask)
        _registered = True
    return name


_configs_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _configs_of(model) -> dict:
    """The distinct configs carrying an attention implementation in `model` (walked once per model)."""
    configs = _configs_cache.get(model)
    if configs is None:
        configs = {
            id(m.config): m.config
            for m in model.modules()
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
        }
        _configs_cache[model] = configs
    return configs


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Temporarily run `model` with another attention implementation (its saved config never sees it)."""
    if name is None:
        yield
        return
    configs = _configs_of(model)
    previous = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = previous[k]
