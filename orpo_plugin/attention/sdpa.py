"""orpo_sdpa: a row's segments in padded buckets of similar length, one batched `scaled_dot_product_attention` call
per bucket: cost sum(len^2), not (sum len)^2 as with a block-diagonal mask, nor one call per sequence. Any device.

Honours: scaling, sliding_window, softcap, s_aux (sinks) and dropout (softcap and sinks by an explicit softmax, as
the eager kernels do). Refuses: any other keyword with a value, and a batch of more than one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .contract import ATTENTION_NAME, Features, _lower_right_causal, host_list, read_features

ORPO_SDPA_FEATURES = ("sliding_window", "softcap", "s_aux", "dropout")


def _segments(kwargs) -> list[tuple[list[int], list[int]]]:
    """(query positions, key positions) of every attention segment of the row.

    A segment's queries are the last of its keys, in order, and a key's index in the list is its position in the
    sequence the model would have seen without sharing: for a rejected branch, [prompt][rejected].
    """
    segments = kwargs.get("prefix_segments")
    if segments is not None:
        out = []
        for start, prompt_len, chosen_len, rejected_len in host_list(segments):
            a, b, e = start, start + prompt_len + chosen_len, start + prompt_len + chosen_len + rejected_len
            out.append((list(range(a, b)), list(range(a, b))))
            if rejected_len:
                out.append((list(range(b, e)), list(range(a, a + prompt_len)) + list(range(b, e))))
        return out
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"{ATTENTION_NAME} needs `cu_seq_lens_q` or `prefix_segments` from the collator")
    bounds = host_list(cu)
    return [(list(range(a, b)), list(range(a, b))) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class _Bucket:
    """`n` segments padded to `mq` queries and `mk` keys; `lengths[i]` = (queries, keys) of segment i."""

    n: int
    mq: int
    mk: int
    lengths: list
    square: bool  # every segment's queries are its keys: right padding is invisible under a causal mask
    device: torch.device | str | None = None
    masks: dict = field(default_factory=dict)  # window -> boolean mask, built once per layout

    def mask(self, window: int | None) -> torch.Tensor:
        """Boolean [n or 1, 1, mq, mk] (True = may attend). Padded query rows see every real key (no empty row)."""
        if window not in self.masks:
            if self.square:  # one pattern for all: real queries never reach the padded keys to their right
                mask = _lower_right_causal(self.mq, self.mk, None, window)[None, None]
            else:
                mask = torch.zeros(self.n, 1, self.mq, self.mk, dtype=torch.bool)
                for i, (lq, lk) in enumerate(self.lengths):
                    mask[i, 0, :lq, :lk] = _lower_right_causal(lq, lk, None, window)
                    mask[i, 0, lq:, :lk] = True
            self.masks[window] = mask.to(self.device)
        return self.masks[window]


@dataclass
class _Plan:
    buckets: list
    q_index: torch.Tensor  # bucket queries are rows of x.index_select(0, q_index), bucket after bucket
    k_index: torch.Tensor
    out_index: torch.Tensor  # out_index[t]: where row token t's output sits among the padded bucket outputs


def _plan(kwargs, device, bucket_ratio: float = 0.9, max_bucket: int = 256) -> _Plan:
    """Group segments of similar length into padded buckets: one batched attention call per bucket.

    Segments whose queries are their keys (Lq == Lk) are bucketed apart: with a plain causal mask they run with
    `is_causal` and no mask. The others (rejected branches of prefix-shared pairs) get an explicit mask. All buckets
    are gathered with one index per tensor (q, k/v), so backward scatters into one zero-filled gradient per tensor
    and layer, not one per bucket. Padded outputs are dropped.
    """
    square, other = [], []
    for seg in _segments(kwargs):
        (square if len(seg[0]) == len(seg[1]) else other).append(seg)
    groups = []
    for group in (square, other):
        group.sort(key=lambda s: -len(s[1]))
        current = []
        for seg in group:
            if current and (len(seg[1]) < bucket_ratio * len(current[0][1]) or len(current) >= max_bucket):
                groups.append(current)
                current = []
            current.append(seg)
        if current:
            groups.append(current)
    # built as host lists, then copied to the device once each (nothing is read back from the device)
    buckets, q_index, k_index, out_pairs = [], [], [], []
    for group in groups:
        mq, mk = max(len(q) for q, _ in group), len(group[0][1])
        for q, k in group:
            # padded-output row len(q_index) holds query q[j]; padding rows point at position 0 and are dropped
            out_pairs.extend((t, len(q_index) + j) for j, t in enumerate(q))
            q_index.extend(q + [0] * (mq - len(q)))
            k_index.extend(k + [0] * (mk - len(k)))
        lengths = [(len(q), len(k)) for q, k in group]
        buckets.append(_Bucket(len(group), mq, mk, lengths, all(a == b for a, b in lengths), device))
    out_index = [0] * len(out_pairs)
    for token, slot in out_pairs:
        out_index[token] = slot

    def to_device(values):
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    return _Plan(buckets, to_device(q_index), to_device(k_index), to_device(out_index))


_plan_cache: dict = {}


def _cached_plan(kwargs, device) -> _Plan:
    """The plan of this row's layout: built on the first layer, reused by the others and by recomputation.

    Keyed on the layout tensor itself (held, so its storage cannot be reused by another batch's tensor): a forward
    over another layout, or a checkpoint recomputation after it, rebuilds the same plan a fresh forward would.
    """
    layout = kwargs.get("prefix_segments")
    layout = layout if layout is not None else kwargs.get("cu_seq_lens_q")
    key = (None if layout is None else (layout.data_ptr(), tuple(layout.shape)), str(device))
    cached = _plan_cache.get("plan")
    if cached is not None and cached[0] == key and cached[1] is layout:
        return cached[2]
    plan = _plan(kwargs, device)
    _plan_cache["plan"] = (key, layout, plan)
    return plan


def _bucket_attention(q, k, v, bucket: _Bucket, f: Features, training: bool) -> torch.Tensor:
    """q [n, H, Mq, D], k/v [n, Hkv, Mk, D] -> [n, H, Mq, D] under the bucket's mask and the call's features."""
    gqa = q.shape[1] != k.shape[1]
    plain_causal = bucket.square and f.window is None
    dropout = f.dropout if training else 0.0
    if f.softcap is None and f.sinks is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if plain_causal else bucket.mask(f.window),
            is_causal=plain_causal,
            dropout_p=dropout,
            scale=f.scaling,
            enable_gqa=gqa,
        )
    # Soft-capping and sinks change the logits or the softmax: computed explicitly, as the eager kernels do.
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = f.scaling if f.scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [n, H, Mq, Mk]
    if f.softcap is not None:
        scores = f.softcap * torch.tanh(scores / f.softcap)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in float32 at least
    scores = scores.masked_fill(~bucket.mask(f.window), float("-inf"))
    if f.sinks is not None:  # one extra logit per head that takes probability mass and no value
        sink = f.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0).to(v.dtype)
    return torch.matmul(probs, v)


def orpo_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface function: query [1, H, T, D] -> output [1, T, H, D], attention within segments."""
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME} expects one packed row per batch, got batch size {query.shape[0]}")
    f = read_features(ATTENTION_NAME, module, kwargs, ORPO_SDPA_FEATURES)
    # squeeze, not [0]: the backward of a view is a view, where select would zero-fill a full-size gradient
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    plan = _cached_plan(kwargs, query.device)
    # index_select (not fancy indexing): its backward is one scatter-add per tensor on CPU
    qs = q.index_select(0, plan.q_index).split([b.n * b.mq for b in plan.buckets])
    ks = k.index_select(0, plan.k_index).split([b.n * b.mk for b in plan.buckets])
    vs = v.index_select(0, plan.k_index).split([b.n * b.mk for b in plan.buckets])
    training = bool(getattr(module, "training", False)) if module is not None else False
    pieces = []
    for b, qb, kb, vb in zip(plan.buckets, qs, ks, vs):
        res = _bucket_attention(
            qb.view(b.n, b.mq, *q.shape[1:]).transpose(1, 2),  # [n, H, Mq, D]
            kb.view(b.n, b.mk, *k.shape[1:]).transpose(1, 2),
            vb.view(b.n, b.mk, *v.shape[1:]).transpose(1, 2),
            b,
            f,
            training,
        ).transpose(1, 2)  # [n, Mq, H, D]
        pieces.append(res.reshape(b.n * b.mq, *res.shape[2:]))
    out = torch.cat(pieces).index_select(0, plan.out_index)  # real outputs, back in row order
    return out[None], None
