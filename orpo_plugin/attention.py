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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_NAME = "orpo_sdpa"
FLEX_NAME = "orpo_flex"
FLASH_NAME = "orpo_flash"
VARLEN_NAME = "orpo_varlen"
# Implementations whose packed-sequence handling transformers provides from position_ids alone.
NATIVE_PACKED = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def _lower_right_causal(lq: int, lk: int, device, window: int | None = None) -> torch.Tensor:
    """[lq, lk] boolean mask: query i (at key position p = lk - lq + i) sees keys j <= p, and p - j < window."""
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
    if window is not None:
        mask &= torch.ones(lq, lk, dtype=torch.bool, device=device).triu(diagonal=lk - lq - window + 1)
    return mask


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
    "position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits", "output_hidden_states",
    "return_dict", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "prefix_segments",
    "kernel_options",
}
# Where each feature can run with a padding-free row (shown in refusals and the README's table).
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
# Per-segment attention: segments of similar length gathered into padded buckets, one batched call per bucket.


def _segments(kwargs) -> list[tuple[list[int], list[int]]]:
    """(query positions, key positions) of every attention segment of the row.

    A segment's queries are the last of its keys, in order, and a key's index in the list is its position in the
    sequence the model would have seen without sharing: for a rejected branch, [prompt][rejected].
    """
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
    buckets, q_parts, k_parts, valid_parts = [], [], [], []
    for group in groups:
        mq, mk = max(len(q) for q, _ in group), len(group[0][1])
        q_idx = torch.zeros(len(group), mq, dtype=torch.long)
        k_idx = torch.zeros(len(group), mk, dtype=torch.long)
        q_valid = torch.zeros(len(group), mq, dtype=torch.bool)
        for n, (q, k) in enumerate(group):
            q_idx[n, : len(q)], k_idx[n, : len(k)], q_valid[n, : len(q)] = torch.tensor(q), torch.tensor(k), True
        lengths = [(len(q), len(k)) for q, k in group]
        buckets.append(_Bucket(len(group), mq, mk, lengths, all(a == b for a, b in lengths), device))
        q_parts.append(q_idx.flatten())
        k_parts.append(k_idx.flatten())
        valid_parts.append(q_valid.flatten())
    q_index = torch.cat(q_parts)
    slots = torch.cat(valid_parts).nonzero().squeeze(1)  # padded-output rows that hold a real query
    out_index = torch.empty_like(slots)
    out_index[q_index[slots]] = slots
    return _Plan(buckets, q_index.to(device), torch.cat(k_parts).to(device), out_index.to(device))


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
            q, k, v, attn_mask=None if plain_causal else bucket.mask(f.window), is_causal=plain_causal,
            dropout_p=dropout, scale=f.scaling, enable_gqa=gqa,
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


ORPO_SDPA_FEATURES = ("sliding_window", "softcap", "s_aux", "dropout")


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
            b, f, training,
        ).transpose(1, 2)  # [n, Mq, H, D]
        pieces.append(res.reshape(b.n * b.mq, *res.shape[2:]))
    out = torch.cat(pieces).index_select(0, plan.out_index)  # real outputs, back in row order
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


def varlen_reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=True, window_size=(-1, -1), softcap=0.0,
):
    """The flash-attention varlen contract on any device (q/k/v as [tokens, heads, dim]), causal bottom-right.

    `window_size=(left, right)`: query p sees keys p - left .. p + right (-1: unbounded); `softcap` > 0 caps the
    logits as softcap * tanh(s / softcap). Dropout is not part of the reference (it is random).
    """
    if dropout_p:
        raise ValueError("varlen_reference has no dropout")
    left = None if window_size[0] < 0 else window_size[0]
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qa, qb = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ka, kb = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        lq, lk = qb - qa, kb - ka
        mask = _lower_right_causal(lq, lk, q.device, None if left is None else left + 1) if causal else None
        qi, ki, vi = q[qa:qb].transpose(0, 1), k[ka:kb].transpose(0, 1), v[ka:kb].transpose(0, 1)
        if q.shape[1] != k.shape[1]:
            ki = ki.repeat_interleave(q.shape[1] // k.shape[1], dim=0)
            vi = vi.repeat_interleave(q.shape[1] // v.shape[1], dim=0)
        scores = torch.matmul(qi, ki.transpose(-1, -2)) * (softmax_scale or q.shape[-1] ** -0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out.append(torch.matmul(torch.softmax(scores, dim=-1), vi).transpose(0, 1))
    return torch.cat(out)


_varlen_cache: dict = {}


def varlen_arguments(kwargs, device):
    """(kv_index, cu_seq_q, cu_seq_k, max_q, max_k): a row's layout as varlen kernels take it.

    padding_free/packing (`cu_seq_lens_q`): one sequence per entry, queries are the keys (kv_index None).
    prefix_sharing (`prefix_segments`): `varlen_layout`. Built on the first layer and reused by the others and by
    checkpoint recomputation, keyed on the layout tensor like the orpo_sdpa plan.
    """
    segments = kwargs.get("prefix_segments")
    layout = segments if segments is not None else kwargs.get("cu_seq_lens_q")
    if layout is None:
        raise ValueError("varlen attention needs `cu_seq_lens_q` or `prefix_segments` from the collator")
    key = (layout.data_ptr(), tuple(layout.shape), str(device))
    cached = _varlen_cache.get("args")
    if cached is not None and cached[0] == key and cached[1] is layout:
        return cached[2]
    if segments is not None:
        args = varlen_layout(segments, device)
    else:
        lengths = (layout[1:] - layout[:-1]).tolist()
        cu = layout.to(device=device, dtype=torch.int32)
        args = (None, cu, cu, max(lengths), max(lengths))
    _varlen_cache["args"] = (key, layout, args)
    return args


def _flash_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:  # pragma: no cover - needs CUDA
        raise ImportError("orpo_flash (and prefix_sharing with flash_attention_2) needs the flash-attn package") from err
    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    """Whether the flash-attn package imports (its varlen kernel is the first choice on CUDA)."""
    try:
        _flash_kernel()
    except ImportError:
        return False
    return True


def torch_varlen_kernel(varlen_attn=None):
    """torch's own FlashAttention varlen (`torch.nn.attention.varlen.varlen_attn`) in the flash-attn calling convention.

    None when this torch lacks it. Releases differ: newer ones take `window_size=(left, right)` ((-1, 0) causal,
    (W, 0) causal with W keys to the left), `scale` and `enable_gqa`; older ones only `is_causal`. The returned
    kernel's `features` names the attention features it honours (sliding windows only with `window_size`); a
    missing `scale` is applied to the queries and missing GQA support is met by repeating key/value heads, both
    exact. Soft-capping, sinks and dropout are not in its contract.
    """
    if varlen_attn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
    import inspect

    try:
        params = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):
        return None
    windowed = "window_size" in params
    if not windowed and "is_causal" not in params:
        return None

    def kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=True,
               window_size=(-1, -1), softcap=0.0):
        if dropout_p or softcap or not causal:
            raise ValueError(f"{VARLEN_NAME} computes causal attention without dropout or soft-capping")
        kw = {}
        if windowed:
            kw["window_size"] = (window_size[0], 0)
        elif window_size[0] >= 0:
            raise ValueError(f"{VARLEN_NAME}: this torch's varlen_attn has no window_size")
        else:
            kw["is_causal"] = True
        if softmax_scale is not None:
            if "scale" in params:
                kw["scale"] = softmax_scale
            else:
                q = q * (softmax_scale * q.shape[-1] ** 0.5)  # the kernel multiplies by dim^-0.5
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, **kw)

    kernel.features = ("sliding_window",) if windowed else ()
    return kernel


def _half_precision(q: torch.Tensor, module, path: str) -> torch.dtype | None:
    """The dtype a CUDA flash kernel runs a float32 query in (as transformers' flash path picks it), or refuse.

    Autocast's dtype when autocast is on (what sdpa would compute in), else a quantized model's compute dtype, else
    the dtype of the model's linear layers; None when q is already in half precision or not on CUDA.
    """
    if q.dtype != torch.float32 or q.device.type != "cuda":
        return None
    target = None
    if torch.is_autocast_enabled("cuda"):
        target = torch.get_autocast_dtype("cuda")
    elif module is not None and getattr(getattr(module, "config", None), "_is_quantized", False):
        target = getattr(module.config, "dtype", None)
    elif module is not None:
        target = next((m.weight.dtype for m in module.modules() if type(m) is torch.nn.Linear), None)
    if target not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"{path} runs in float16/bfloat16 and this model computes attention in float32; train with bf16=True "
            "or choose attention_backend='sdpa'"
        )
    return target


ORPO_FLASH_FEATURES = ("sliding_window", "softcap", "dropout")


def _varlen_attention(path, kernel, supported, module, query, key, value, kwargs):
    """A packed or prefix-shared row [1, H, T, D] through a varlen kernel (flash-attn calling convention)."""
    if query.shape[0] != 1:
        raise ValueError(f"{path} expects one packed row per batch, got batch size {query.shape[0]}")
    f = read_features(path, module, kwargs, supported)
    # squeeze, not [0]: the backward of a view is a view, where select would zero-fill a full-size gradient
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    target = _half_precision(q, module, path)
    if target is not None:
        q, k, v = q.to(target), k.to(target), v.to(target)
    index, cu_q, cu_k, max_q, max_k = varlen_arguments(kwargs, query.device)
    if index is not None:  # prefix sharing: keys/values gathered per branch
        k, v = k.index_select(0, index), v.index_select(0, index)
    window = (-1, -1) if f.window is None else (f.window - 1, f.window - 1)  # right side is cut by causal
    training = bool(getattr(module, "training", False)) if module is not None else False
    out = kernel(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=f.dropout if training else 0.0, softmax_scale=f.scaling,
        causal=True, window_size=window, softcap=f.softcap or 0.0,
    )
    return out[None], None


def orpo_flash_attention(module, query, key, value, attention_mask, kernel=None, **kwargs):
    """AttentionInterface function: a padding-free or prefix-shared row through flash-attn's varlen kernel.

    `kernel` replaces flash_attn_varlen_func (same calling convention), e.g. `varlen_reference` on a CPU.
    """
    return _varlen_attention(FLASH_NAME, kernel or _flash_kernel(), ORPO_FLASH_FEATURES, module, query, key, value,
                             kwargs)


def orpo_varlen_attention(module, query, key, value, attention_mask, kernel=None, **kwargs):
    """AttentionInterface function: a padding-free or prefix-shared row through torch's own varlen_attn.

    `kernel` replaces `torch_varlen_kernel()` (flash-attn calling convention plus a `features` tuple).
    """
    kernel = kernel or torch_varlen_kernel()
    if kernel is None:
        raise ValueError(f"{VARLEN_NAME} needs torch.nn.attention.varlen.varlen_attn (torch >= 2.9 with CUDA)")
    return _varlen_attention(VARLEN_NAME, kernel, getattr(kernel, "features", ()), module, query, key, value, kwargs)


def prefix_sharing_mask(segments: torch.Tensor, total: int, device=None, window: int | None = None) -> torch.Tensor:
    """Dense [total, total] boolean mask (True = may attend) of a prefix-shared row (the reference layout).

    With a window, distances are positions in the unshared sequence ([prompt][rejected] for a rejected token).
    """
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    for start, lp, lc, lr in segments.tolist():
        a, b, e = start, start + lp + lc, start + lp + lc + lr
        mask[a:b, a:b] = _lower_right_causal(b - a, b - a, device, window)
        if lr:
            allowed = _lower_right_causal(lr, lp + lr, device, window)
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


def _packed_tables(cu: torch.Tensor, total: int, device):
    """`_prefix_tables` of a padding-free row: one "pair" per sequence, all of one branch, positions restart."""
    pair = torch.empty(total, dtype=torch.long)
    position = torch.arange(total)
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pair[a:b] = i
        position[a:b] = torch.arange(b - a)
    pair[bounds[-1]:] = len(bounds)  # tokens past the last sequence (padding) only see each other
    position[bounds[-1]:] = torch.arange(total - bounds[-1])
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


ORPO_FLEX_FEATURES = ("sliding_window", "softcap", "s_aux")


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
        module, query, key, value, mask, scaling=f.scaling, softcap=f.softcap, s_aux=f.sinks,
        kernel_options=kwargs.get("kernel_options"),
    )


def _no_mask(*args, **kwargs):
    return None


_registered = False


def register(name: str = ATTENTION_NAME) -> str:
    """Register orpo_sdpa, orpo_flex, orpo_flash, orpo_varlen (and no-op mask builders) with transformers; return `name`."""
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
        AttentionInterface.register(VARLEN_NAME, orpo_varlen_attention)
        AttentionMaskInterface.register(VARLEN_NAME, _no_mask)
        _registered = True
    return name


# ---------------------------------------------------------------------------------------------------------------
# Which kernel runs a padding-free / packed / prefix-shared row.

# `attention_backend` values -> the attention function registered for them; "auto" tries them in this order on CUDA.
BACKENDS = {"flash_attn": FLASH_NAME, "torch_varlen": VARLEN_NAME, "flex": FLEX_NAME, "sdpa": ATTENTION_NAME}
BACKEND_CHOICES = ("auto", *BACKENDS)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def backend_features() -> dict:
    """Backend -> the attention features it honours, or None where it cannot run on this machine's GPU."""
    varlen = torch_varlen_kernel()
    return {
        "flash_attn": ORPO_FLASH_FEATURES if flash_attn_available() else None,
        "torch_varlen": varlen.features if varlen is not None else None,
        "flex": ORPO_FLEX_FEATURES if flex_available() else None,
        "sdpa": ORPO_SDPA_FEATURES,
    }


def on_cuda(model, use_cpu: bool) -> bool:
    """Whether `model` trains on a CUDA device (already there, or the trainer will move it there)."""
    if any(p.device.type == "cuda" for p in model.parameters()):
        return True
    return not use_cpu and torch.cuda.is_available()


def model_features(model) -> set:
    """The attention features (keys of FEATURES) the model's attention layers pass, read from the layers.

    Read statically, to skip a backend that cannot honour them; a feature missed here still stops training at
    start, when `check_layout` runs the chosen backend once.
    """
    found = set()
    for m in model.modules():
        if not (hasattr(m, "scaling") and hasattr(m, "is_causal")):
            continue
        config = getattr(m, "config", None)
        window = getattr(m, "sliding_window") if hasattr(m, "sliding_window") else getattr(config, "sliding_window", None)
        if window is not None:
            found.add("sliding_window")
        if hasattr(m, "attn_logit_softcapping"):
            softcap = m.attn_logit_softcapping
        else:
            softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            found.add("softcap")
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            found.add("s_aux")
        if float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0:
            found.add("dropout")
    return found


def choose_backend(model, forced: str = "auto", cuda: bool = True) -> tuple:
    """(backend, registered attention name, why) for a padding-free/packed/prefix-shared row of `model`.

    On CUDA, "auto" takes the first of flash_attn, torch_varlen, flex, sdpa that runs here and honours every feature
    the model uses; orpo_sdpa honours them all. A forced backend is refused when it cannot run here or cannot honour
    one of the model's features. Off CUDA only sdpa (orpo_sdpa) runs: the others' kernels, or backward, need a GPU.
    """
    if forced not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {BACKEND_CHOICES}, got {forced!r}")
    needs = model_features(model)
    available = backend_features() if cuda else {"flash_attn": None, "torch_varlen": None, "flex": None,
                                                   "sdpa": ORPO_SDPA_FEATURES}
    if forced != "auto":
        features = available[forced]
        if features is None:
            why = {
                "flash_attn": "the flash-attn package does not import",
                "torch_varlen": "this torch has no usable torch.nn.attention.varlen.varlen_attn",
                "flex": "this torch has no flex_attention",
            }[forced] if cuda else "it needs a CUDA model (flex_attention has no backward on CPU)"
            raise ValueError(f"attention_backend={forced!r} cannot run: {why}; use attention_backend='auto' or 'sdpa'")
        missing = sorted(needs - set(features))
        if missing:
            raise ValueError(
                f"attention_backend={forced!r} cannot honour {', '.join(FEATURES[n] for n in missing)} of "
                f"{type(model).__name__}; use attention_backend='auto' (or the padded layout). Supported by: "
                + "; ".join(f"{FEATURES[n]}: {SUPPORTED_BY[n]}" for n in missing)
            )
        return forced, BACKENDS[forced], "forced by attention_backend"
    skipped = []
    for name, features in available.items():
        if features is None:
            skipped.append(f"{name} unavailable")
            continue
        missing = sorted(needs - set(features))
        if missing:
            skipped.append(f"{name} lacks {', '.join(missing)}")
            continue
        why = "first available" + (f" ({'; '.join(skipped)})" if skipped else "")
        return name, BACKENDS[name], why
    raise AssertionError("orpo_sdpa honours every feature")  # pragma: no cover


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
