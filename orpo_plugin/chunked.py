"""Target-token log-probs from hidden states and the output-layer weight, without [tokens x vocab] logits.

The tokens are processed in chunks; backward recomputes each chunk's logits, so at most one chunk of logits
(float32) exists at a time. When all tokens fit in one chunk, forward keeps that chunk's gradient for backward
instead (no second pass over the vocabulary, and no more memory than the recompute would take). The per-token
mean logit (for the `logits/*` metrics) comes out as a by-product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Default chunk: as many tokens as keep one chunk of float32 logits at 512 MiB (1,024 tokens at a 128k vocabulary).
DEFAULT_CHUNK_BYTES = 1024 * 128_256 * 4


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of `vocab_size` under the default memory bound."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, int(vocab_size))))


def _chunk_logits(h, weight, bias, scale, softcap):
    """Raw logits of one chunk in float32, then the model's logit transform (scale, soft-capping)."""
    logits = F.linear(h, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _dlogits(logits, log_probs, targets, scale, softcap):
    """d log p(target) / d raw logits of one chunk: (onehot - softmax), through soft-capping and scaling.

    Built in the storage of `log_probs` (the chunk's log-softmax), which it consumes.
    """
    grad = log_probs.exp_().neg_()
    grad.scatter_add_(-1, targets[:, None], torch.ones_like(grad[:, :1]))
    if softcap is not None:
        grad.mul_(1.0 - (logits / softcap) ** 2)
    if scale is not None:
        grad.mul_(scale)
    return grad


def _times_weight(grad, weight):
    """grad [c, V] @ weight [V, H] in float32, without a float32 copy of a half-precision weight (2 GiB for a
    128k x 4096 output layer): the product then runs in the weight's dtype, accumulating in float32, like the
    backward of the model's own half-precision output layer."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        return (grad.to(weight.dtype) @ weight).float()
    return grad @ weight.float()


class _ChunkedTargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, grad_enabled):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logit_sums = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # With a frozen output layer (LoRA/QLoRA) only d logp / d hidden is needed: a [N, H] tensor, computed
        # here so backward needs no second pass over the vocabulary.
        # (needs_input_grad is set under no_grad too: `grad_enabled` tells whether a backward can follow.)
        frozen = not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad_unit = (
            torch.empty_like(hidden, dtype=torch.float32)
            if grad_enabled and frozen and ctx.needs_input_grad[0]
            else None
        )
        # One chunk and a trainable output layer: keep d logp / d logits for backward rather than recompute it.
        keep = grad_enabled and not frozen and n <= chunk_size
        kept = None
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[sl], weight, bias, scale, softcap)  # [c, V]
            log_probs = torch.log_softmax(logits, dim=-1)
            logps[sl] = log_probs.gather(-1, targets[sl, None]).squeeze(-1)
            logit_sums[sl] = logits.sum(-1)
            if grad_unit is not None:
                grad_unit[sl] = _times_weight(_dlogits(logits, log_probs, targets[sl], scale, softcap), weight)
            elif keep:
                kept = _dlogits(logits, log_probs, targets[sl], scale, softcap)
        if grad_unit is not None:
            ctx.save_for_backward(grad_unit)
        elif kept is not None:
            ctx.save_for_backward(hidden, weight, bias, targets, kept)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.frozen_fast = grad_unit is not None
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        # backward recomputes the logits under the autocast forward ran under (the engine runs it without)
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(logit_sums)
        return logps, logit_sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_logit_sums):
        if ctx.frozen_fast:
            (grad_unit,) = ctx.saved_tensors
            return (grad_unit * grad_logps[:, None].float()).to(ctx.hidden_dtype), *([None] * 7)
        hidden, weight, bias, targets, *kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (need_b and bias is not None) else None
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            _backward_chunks(ctx, hidden, weight, bias, targets, kept, grad_logps, grad_h, grad_w, grad_b)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _backward_chunks(ctx, hidden, weight, bias, targets, kept, grad_logps, grad_h, grad_w, grad_b):
    """Fill grad_h row by row and accumulate grad_w and grad_b over the chunks (each only where not None)."""
    for start in range(0, hidden.shape[0], ctx.chunk_size):
        sl = slice(start, start + ctx.chunk_size)
        h = hidden[sl]
        if kept:  # the only chunk: its gradient was kept by forward (left intact for a second backward)
            grad = kept[0] * grad_logps[sl, None].float()
        else:
            logits = _chunk_logits(h, weight, bias, ctx.scale, ctx.softcap)  # [c, V]
            grad = _dlogits(logits, torch.log_softmax(logits, dim=-1), targets[sl], ctx.scale, ctx.softcap)
            grad.mul_(grad_logps[sl, None].float())
        if grad_h is not None:
            grad_h[sl] = _times_weight(grad, weight).to(hidden.dtype)
        if grad_w is not None:
            grad_w.addmm_(grad.t(), h.float())
        if grad_b is not None:
            grad_b.add_(grad.sum(0))


def chunked_target_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), sum of the logits) per row of `hidden` [N, H]; weight is the output layer's [V, H].

    Only the first output carries gradients (to hidden, weight and bias).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    return _ChunkedTargetLogps.apply(
        hidden, weight, bias, targets, int(chunk_size), scale, softcap, torch.is_grad_enabled()
    )


def full_target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two outputs from materialised logits [N, V] (already transformed as the model does)."""
    logits = logits.float()
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logps, logits.detach().sum(-1)
