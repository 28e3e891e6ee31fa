"""Chunked target log-probs against full float64 logits: values, logit sums and gradients (hidden, weight, bias)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orpo_plugin.chunked import chunked_target_logps, full_target_logps

N, H, V = 13, 16, 37  # tokens, hidden size, vocab


def _inputs(dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)  # a non-uniform d loss / d logp, to exercise per-row scaling
    leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (hidden, weight, b)]
    return leaves, targets, upstream


def reference(hidden, weight, bias, targets, scale=None, softcap=None):
    """F.linear + log_softmax in float64, with the same logit transform (scale, then soft-capping)."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, logits.detach().sum(-1)


def _grads(out, leaves, upstream):
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad_outputs=upstream.to(out.dtype)))
    return [next(grads) if t is not None else None for t in leaves]


def _check(dtype, chunk_size, bias=True, scale=None, softcap=None, rtol=1e-5, atol=1e-5):
    leaves, targets, upstream = _inputs(dtype, bias)
    hidden, weight, b = leaves
    logps, logit_sums = chunked_target_logps(hidden, weight, targets, b, chunk_size, scale=scale, softcap=softcap)
    assert logps.shape == logit_sums.shape == (N,)
    assert logps.dtype == logit_sums.dtype == torch.float32
    assert not logit_sums.requires_grad

    leaves64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in leaves]
    ref_logps, ref_sums = reference(*leaves64, targets, scale=scale, softcap=softcap)
    torch.testing.assert_close(logps.double(), ref_logps.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(logit_sums.double(), ref_sums, rtol=rtol, atol=atol * V)

    grads = _grads(logps, leaves, upstream)
    grads_ref = _grads(ref_logps, leaves64, upstream.double())
    for name, g, g_ref, leaf in zip(("hidden", "weight", "bias"), grads, grads_ref, leaves):
        if leaf is None:
            continue
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(
            g.double(), g_ref, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}"
        )


@pytest.mark.parametrize("chunk_size", [1, 7, N, N + 5])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_matches_float64_logits(chunk_size, bias):
    _check(torch.float32, chunk_size, bias=bias)


@pytest.mark.parametrize("chunk_size", [1, 7, N + 5])
def test_logit_scale_and_softcapping(chunk_size):
    _check(torch.float32, chunk_size, scale=0.75, softcap=2.5)  # softcap small enough to bend the logits
    _check(torch.float32, chunk_size, scale=1.7)
    _check(torch.float32, chunk_size, softcap=3.0)


@pytest.mark.parametrize("chunk_size", [4, N])
def test_bfloat16_inputs_match_float64_within_bf16_tolerance(chunk_size):
    _check(torch.bfloat16, chunk_size, rtol=2e-2, atol=3e-2)
    _check(torch.bfloat16, chunk_size, scale=0.5, softcap=4.0, rtol=2e-2, atol=3e-2)


def test_results_do_not_depend_on_chunk_size():
    leaves, targets, upstream = _inputs()
    results = []
    for chunk_size in (1, 3, 8, N, 100):
        logps, sums = chunked_target_logps(leaves[0], leaves[1], targets, leaves[2], chunk_size)
        results.append((logps, sums, _grads(logps, leaves, upstream)))
    for logps, sums, grads in results[1:]:
        torch.testing.assert_close(logps, results[0][0])
        torch.testing.assert_close(sums, results[0][1])
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0)


def test_only_requested_grads_are_computed():
    (hidden, weight, b), targets, upstream = _inputs()
    hidden = hidden.detach()  # e.g. a frozen trunk: gradients for the head only
    logps, _ = chunked_target_logps(hidden, weight, targets, b, 5)
    gw, gb = torch.autograd.grad(logps, (weight, b), grad_outputs=upstream)
    leaves64 = [hidden.double()] + [t.detach().double().requires_grad_(True) for t in (weight, b)]
    ref, _ = reference(*leaves64, targets)
    gw_ref, gb_ref = torch.autograd.grad(ref, leaves64[1:], grad_outputs=upstream.double())
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-5, atol=1e-5)


def test_full_target_logps_matches_reference():
    (hidden, weight, b), targets, _ = _inputs()
    logits = F.linear(hidden, weight, b)
    logps, sums = full_target_logps(logits, targets)
    ref_logps, ref_sums = reference(hidden, weight, b, targets)
    torch.testing.assert_close(logps.double(), ref_logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-4)


def test_bad_shapes_raise():
    (hidden, weight, b), targets, _ = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        chunked_target_logps(hidden[None], weight, targets, b)
    with pytest.raises(ValueError, match="targets"):
        chunked_target_logps(hidden, weight, targets[:-1], b)


# ----------------------------------------------------------------------------------------------- tied embeddings
class TinyTiedLM(torch.nn.Module):
    """embedding -> one mixing layer -> output layer that shares the embedding matrix."""

    def __init__(self, vocab=V, hidden=H, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed(ids)))

    def chunked(self, ids, targets, chunk_size):
        return chunked_target_logps(self.hidden(ids), self.embed.weight, targets, None, chunk_size)[0]

    def full(self, ids, targets):
        logits = F.linear(self.hidden(ids), self.embed.weight)
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_tied_embeddings_accumulate_both_gradient_paths(chunk_size):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (N,), generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)

    model = TinyTiedLM()
    ref_model = TinyTiedLM().double()
    (model.chunked(ids, targets, chunk_size) * upstream).sum().backward()
    (ref_model.full(ids, targets) * upstream.double()).sum().backward()

    grad = model.embed.weight.grad
    ref_grad = ref_model.embed.weight.grad
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.mix.weight.grad.double(), ref_model.mix.weight.grad, rtol=1e-5, atol=1e-5)

    # Both paths really contribute: the gradient differs from the embedding-lookup path alone.
    ref_model.zero_grad()
    h = ref_model.hidden(ids)
    lookup_only = torch.log_softmax(F.linear(h, ref_model.embed.weight.detach()), -1).gather(-1, targets[:, None])
    (lookup_only.squeeze(-1) * upstream.double()).sum().backward()
    assert not torch.allclose(ref_model.embed.weight.grad, ref_grad)


def test_tied_llama_head_matches_model_logits(tiny_model_factory):
    """On a real tied-embedding Llama: chunked log-probs and the shared parameter's gradient match full logits."""
    model = tiny_model_factory(tie_word_embeddings=True)
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 7, 2]])
    targets = ids[0, 1:]

    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    ref = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ref.sum().backward()
    ref_grad = head.weight.grad.clone()
    model.zero_grad()

    hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1][0, :-1]
    logps, _ = chunked_target_logps(hidden, head.weight, targets, head.bias, chunk_size=3)
    torch.testing.assert_close(logps, ref.detach(), rtol=1e-5, atol=1e-5)
    logps.sum().backward()
    torch.testing.assert_close(head.weight.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_frozen_output_layer_fast_path_matches_reference():
    """LoRA/QLoRA: the output layer is frozen, so d logp/d hidden is formed in forward (no vocabulary pass in backward)."""
    import torch.nn.functional as F

    from orpo_plugin.chunked import chunked_target_logps

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(13, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)  # requires_grad False
    targets = torch.randint(0, 50, (13,), generator=g)
    upstream = torch.randn(13, generator=g)
    for scale, softcap in [(None, None), (0.5, 3.0)]:
        logps, _ = chunked_target_logps(hidden, weight, targets, chunk_size=4, scale=scale, softcap=softcap)
        (grad,) = torch.autograd.grad((logps * upstream).sum(), hidden)
        h64 = hidden.detach().double().requires_grad_()
        logits = F.linear(h64, weight.double())
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), h64)
        torch.testing.assert_close(logps.double(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ one chunk: kept gradient
def _count_calls(monkeypatch, name):
    import orpo_plugin.chunked as chunked

    calls = []
    original = getattr(chunked, name)

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked, name, counted)
    return calls


@pytest.mark.parametrize("chunk_size, forward_calls, backward_calls", [(N, 1, 0), (100, 1, 0), (5, 3, 3)])
def test_one_chunk_keeps_its_gradient_instead_of_recomputing(monkeypatch, chunk_size, forward_calls, backward_calls):
    """A trainable head whose tokens fit one chunk: backward does no second pass over the vocabulary."""
    logits_calls = _count_calls(monkeypatch, "_chunk_logits")
    (hidden, weight, b), targets, upstream = _inputs()
    logps, _ = chunked_target_logps(hidden, weight, targets, b, chunk_size)
    assert len(logits_calls) == forward_calls
    _grads(logps, [hidden, weight, b], upstream)
    assert len(logits_calls) == forward_calls + backward_calls


def test_kept_gradient_survives_a_second_backward():
    (hidden, weight, b), targets, upstream = _inputs()
    logps, _ = chunked_target_logps(hidden, weight, targets, b, chunk_size=N)
    first = torch.autograd.grad(logps, (hidden, weight, b), grad_outputs=upstream, retain_graph=True)
    second = torch.autograd.grad(logps, (hidden, weight, b), grad_outputs=upstream)
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_no_gradient_work_without_grad_mode(monkeypatch):
    """Evaluation (no_grad): neither the kept gradient nor the frozen-head fast path is formed."""
    dlogits_calls = _count_calls(monkeypatch, "_dlogits")
    (hidden, weight, b), targets, _ = _inputs()
    with torch.no_grad():
        chunked_target_logps(hidden, weight, targets, b, chunk_size=N)  # trainable head, one chunk
        chunked_target_logps(hidden, weight.detach(), targets, None, chunk_size=4)  # frozen head
    assert dlogits_calls == []
    chunked_target_logps(hidden, weight, targets, b, chunk_size=N)
    chunked_target_logps(hidden, weight.detach(), targets, None, chunk_size=4)
    assert len(dlogits_calls) == 1 + 4  # the kept chunk; the frozen fast path once per chunk


def test_default_chunk_size_bounds_the_logits_bytes():
    from orpo_plugin.chunked import DEFAULT_CHUNK_BYTES, default_chunk_size

    assert default_chunk_size(128_256) == 1024  # Llama 3
    assert default_chunk_size(32_064) == 4096  # Phi-3
    for vocab in (2_443, 32_000, 151_936, 256_000):
        size = default_chunk_size(vocab)
        assert size * vocab * 4 <= DEFAULT_CHUNK_BYTES < (size + 1) * vocab * 4


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trainable-head"])
def test_half_precision_weight_is_never_copied_to_float32(frozen):
    """A bf16 output layer (QLoRA keeps lm_head in bf16) is multiplied in bf16: no [V, H] float32 copy per chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    (hidden, weight, b), targets, upstream = _inputs(torch.bfloat16, bias=False)
    if frozen:
        weight = weight.detach()
    copies = []

    class Spy(TorchDispatchMode):  # a dispatch mode also sees the ops of custom backward functions
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            reads_values = func not in (torch.ops.aten.zeros_like.default, torch.ops.aten.empty_like.default)
            if (
                reads_values  # (the trainable head's float32 gradient accumulator is allocated, not copied)
                and isinstance(out, torch.Tensor)
                and out.dtype == torch.float32
                and tuple(out.shape) == tuple(weight.shape)
                and any(isinstance(a, torch.Tensor) and a.data_ptr() == weight.data_ptr() for a in args)
            ):
                copies.append(str(func))
            return out

    with Spy():
        logps, _ = chunked_target_logps(hidden, weight, targets, None, chunk_size=4)
        grads = torch.autograd.grad(logps, [hidden] + ([] if frozen else [weight]), grad_outputs=upstream)
    assert copies == []
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trainable-head"])
def test_under_autocast_backward_recomputes_the_logits_forward_computed(frozen):
    """Under bf16 autocast (mixed-precision training) forward's logits are bf16 products; backward runs outside
    autocast unless told, and its recomputed logits must be the same bf16 products. Recomputing chunks (chunk 4)
    then gives the gradients of keeping the single chunk's gradient from forward (chunk N), and both equal
    autograd through the autocast output layer within bf16 rounding."""
    (hidden, weight, b), targets, upstream = _inputs(torch.float32, bias=False)
    if frozen:
        weight = weight.detach()
    leaves = [hidden, weight]

    def run(chunk_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = chunked_target_logps(hidden, weight, targets, None, chunk_size)
        wanted = [t for t in leaves if t.requires_grad]
        return logps, torch.autograd.grad(logps, wanted, grad_outputs=upstream)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad(ref, [t for t in leaves if t.requires_grad], grad_outputs=upstream)

    kept_logps, kept = run(N)
    chunked_logps, chunked = run(4)
    torch.testing.assert_close(kept_logps, ref, rtol=0, atol=0)
    torch.testing.assert_close(chunked_logps, ref, rtol=0, atol=0)
    for g_kept, g_chunked, g_ref in zip(kept, chunked, ref_grads):
        torch.testing.assert_close(g_chunked, g_kept, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_chunked, g_ref, rtol=2e-2, atol=2e-2)
