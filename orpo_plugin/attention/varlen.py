"""orpo_flash and orpo_varlen: a row through a varlen kernel (flash-attn's `flash_attn_varlen_func`, torch's own
`varlen_attn`), its layout as cu_seqlens; `varlen_reference` is flash-attn's calling convention on any device.

Honours: scaling; orpo_flash also sliding_window, softcap and dropout; orpo_varlen sliding_window where this torch's
varlen_attn takes `window_size` (`torch_varlen_kernel().features`). Refuses: s_aux (sinks), what its kernel lacks,
any other keyword with a value, float32 attention that no half-precision dtype is given for, a batch of more than
one row.
"""

from __future__ import annotations

import torch

from .._compat import torch_varlen_attn
from .contract import FLASH_NAME, VARLEN_NAME, _lower_right_causal, host_list, read_features

ORPO_FLASH_FEATURES = ("sliding_window", "softcap", "dropout")


def varlen_layout(segments: torch.Tensor, device=None):
    """Flash-attention varlen arguments of a prefix-shared row.

    Queries stay in row order, one sequence per branch: chosen = [prompt + chosen], rejected = [rejected].
    Keys/values are gathered per branch: chosen = [prompt + chosen], rejected = [prompt + rejected]. With
    cu_seqlens_q != cu_seqlens_k, flash-attn (>= 2.1) aligns the causal mask bottom-right, which is exactly
    "rejected token i sees the prompt and rejected tokens <= i".
    Returns (kv_index, cu_seqlens_q, cu_seqlens_k, max_q, max_k).
    """
    kv_index, q_lens, k_lens = [], [], []
    for start, prompt_len, chosen_len, rejected_len in host_list(segments):
        a, b, e = start, start + prompt_len + chosen_len, start + prompt_len + chosen_len + rejected_len
        kv_index.extend(range(a, b))
        q_lens.append(b - a)
        k_lens.append(b - a)
        if rejected_len:
            kv_index.extend(range(a, a + prompt_len))
            kv_index.extend(range(b, e))
            q_lens.append(rejected_len)
            k_lens.append(prompt_len + rejected_len)
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    index = torch.tensor(kv_index, dtype=torch.long)
    return (
        index.to(device, non_blocking=True),
        cu_q.to(device, non_blocking=True),
        cu_k.to(device, non_blocking=True),
        max(q_lens),
        max(k_lens),
    )


def varlen_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=True,
    window_size=(-1, -1),
    softcap=0.0,
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
        bounds = host_list(layout)
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        cu = layout.to(device=device, dtype=torch.int32)
        args = (None, cu, cu, max(lengths), max(lengths))
    _varlen_cache["args"] = (key, layout, args)
    return args


def _flash_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:  # pragma: no cover - needs CUDA
        raise ImportError(
            "orpo_flash (and prefix_sharing with flash_attention_2) needs the flash-attn package"
        ) from err
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
        varlen_attn = torch_varlen_attn()
        if varlen_attn is None:
            return None
    import inspect

    try:
        params = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):
        return None
    windowed = "window_size" in params
    if not windowed and "is_causal" not in params:
        return None

    def kernel(
        q,
        k,
        v,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=True,
        window_size=(-1, -1),
        softcap=0.0,
    ):
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
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        dropout_p=f.dropout if training else 0.0,
        softmax_scale=f.scaling,
        causal=True,
        window_size=window,
        softcap=f.softcap or 0.0,
    )
    return out[None], None


def orpo_flash_attention(module, query, key, value, attention_mask, kernel=None, **kwargs):
    """AttentionInterface function: a padding-free or prefix-shared row through flash-attn's varlen kernel.

    `kernel` replaces flash_attn_varlen_func (same calling convention), e.g. `varlen_reference` on a CPU.
    """
    return _varlen_attention(
        FLASH_NAME, kernel or _flash_kernel(), ORPO_FLASH_FEATURES, module, query, key, value, kwargs
    )


def orpo_varlen_attention(module, query, key, value, attention_mask, kernel=None, **kwargs):
    """AttentionInterface function: a padding-free or prefix-shared row through torch's own varlen_attn.

    `kernel` replaces `torch_varlen_kernel()` (flash-attn calling convention plus a `features` tuple).
    """
    kernel = kernel or torch_varlen_kernel()
    if kernel is None:
        raise ValueError(f"{VARLEN_NAME} needs torch.nn.attention.varlen.varlen_attn (torch >= 2.9 with CUDA)")
    return _varlen_attention(VARLEN_NAME, kernel, getattr(kernel, "features", ()), module, query, key, value, kwargs)
