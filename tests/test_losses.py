"""The ORPO math against float64 references: values and gradients, including mean log-probs at and near 0."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from orpo_plugin.losses import (
    LOGP_MAX,
    log1mexp,
    log_odds,
    odds_ratio_terms,
    orpo_loss,
    prob_ratio_terms,
    sequence_logps,
)

# Mean log-probs: a certain model (0), nearly certain ones, a hopeless one, and ordinary values on both sides
# of the log1mexp branch point -ln 2.
EXTREME = [0.0, -1e-8, -1e-30, -80.0]
ORDINARY = [-0.1, -0.7, -1.0, -5.0]
VALUES = EXTREME + ORDINARY

# (rtol, atol) per input dtype. float32 must match float64 to float32 precision; bf16 to bf16 precision.
TOL = {torch.float32: (1e-5, 1e-12), torch.bfloat16: (2e-2, 1e-12)}


# ----------------------------------------------------------------------------------------------- references
def logp_max(dtype: torch.dtype) -> float:
    """LOGP_MAX as the library's clamp sees it for inputs of `dtype` (bf16 rounds -1e-30 up a little)."""
    return torch.tensor(LOGP_MAX, dtype=dtype).item()


def ref_log1mexp(x: torch.Tensor, clamp_at: float = LOGP_MAX) -> torch.Tensor:
    """The plain formula in float64, with the same clamp as losses.LOGP_MAX."""
    x = x.double().clamp(max=clamp_at)
    return torch.log(-torch.expm1(x))


def ref_log_odds(x: torch.Tensor, clamp_at: float = LOGP_MAX) -> torch.Tensor:
    x = x.double().clamp(max=clamp_at)
    return x - torch.log(-torch.expm1(x))


def naive_log1mexp(x: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """The textbook single-`where` formulation: right values, but the unused branch poisons the gradient."""
    if clamp:
        x = x.clamp(max=LOGP_MAX)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _leaf(values, dtype):
    return torch.tensor(values, dtype=dtype).requires_grad_(True)


def _value_and_grad(fn, x, weights=None):
    """fn(x) and d(sum(weights * fn(x)))/dx."""
    y = fn(x)
    w = torch.ones_like(y) if weights is None else weights.to(y.dtype)
    (g,) = torch.autograd.grad(y, x, grad_outputs=w)
    return y, g


def _assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), t


def _assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------- log1mexp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log1mexp_matches_float64_values_and_grads(dtype):
    x = _leaf(VALUES, dtype)
    y, g = _value_and_grad(log1mexp, x)
    assert y.dtype == dtype and g.dtype == dtype
    _assert_finite(y, g)

    x64 = x.detach().double().requires_grad_(True)  # the same (rounded) inputs
    y_ref, g_ref = _value_and_grad(lambda t: ref_log1mexp(t, logp_max(dtype)), x64)
    _assert_close(y, y_ref, dtype)
    _assert_close(g, g_ref, dtype)


def test_log1mexp_is_accurate_far_from_zero():
    # log(1 - e^x) ~ -e^x for very negative x, where the plain formula's float64 `1 - e^x` rounds to 1.
    x = torch.tensor([-40.0, -80.0])
    torch.testing.assert_close(log1mexp(x).double(), -torch.exp(x.double()), rtol=1e-5, atol=0)


def test_log1mexp_clamps_at_logp_max():
    # Values at and above 0 (rounding can push a mean log-prob slightly positive) are treated as LOGP_MAX.
    x = _leaf([0.0, 1e-7, LOGP_MAX], torch.float32)
    y, g = _value_and_grad(log1mexp, x)
    _assert_finite(y, g)
    expected = math.log(-math.expm1(LOGP_MAX))
    torch.testing.assert_close(y.double(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert g[0] == 0 and g[1] == 0  # clamped: no gradient, instead of an infinite one


@pytest.mark.parametrize("x0", [0.0, -1e-8])
def test_naive_single_where_has_nonfinite_grad_but_ours_does_not(x0):
    x = _leaf([x0], torch.float32)
    _, g_naive = _value_and_grad(naive_log1mexp, x)
    assert not torch.isfinite(g_naive).all(), "the counter-example should fail here"
    _, g_ours = _value_and_grad(log1mexp, x)
    _assert_finite(g_ours)


def test_naive_single_where_fails_even_with_the_clamp():
    # The clamp alone is not enough: at -1e-8 float32 exp(x) rounds to 1 and log1p(-1)'s gradient is 0 * inf.
    x = _leaf([-1e-8, -1e-30], torch.float32)
    _, g_naive = _value_and_grad(lambda t: naive_log1mexp(t, clamp=True), x)
    assert not torch.isfinite(g_naive).all()
    _, g_ours = _value_and_grad(log1mexp, x)
    _assert_finite(g_ours)


# ----------------------------------------------------------------------------------------------- log odds
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_odds_matches_float64_values_and_grads(dtype):
    x = _leaf(VALUES, dtype)
    y, g = _value_and_grad(log_odds, x)
    assert y.dtype == torch.float32  # half-precision inputs are computed in float32
    assert g.dtype == dtype
    _assert_finite(y, g)

    x64 = x.detach().double().requires_grad_(True)
    y_ref, g_ref = _value_and_grad(lambda t: ref_log_odds(t, logp_max(torch.float32)), x64)
    _assert_close(y, y_ref, torch.float32)  # float32 math on exactly representable inputs
    _assert_close(g, g_ref, dtype)


def test_log_odds_known_values():
    # P = 1/2 -> odds 1 -> log odds 0; P = 0.9 -> log 9; certain -> large but finite.
    y = log_odds(torch.tensor([math.log(0.5), math.log(0.9), 0.0], dtype=torch.float64))
    torch.testing.assert_close(y[:2], torch.tensor([0.0, math.log(9.0)], dtype=torch.float64))
    assert torch.isfinite(y[2]) and y[2] > 60


# ----------------------------------------------------------------------------------------------- odds ratio
def _grid_pairs():
    pairs = list(itertools.product(VALUES, VALUES))
    return [c for c, _ in pairs], [r for _, r in pairs]


def ref_odds_ratio_terms(chosen, rejected):
    # log_odds computes in float32 (at least), so its clamp sits at float32's LOGP_MAX.
    clamp_at = logp_max(torch.float32)
    ratio = ref_log_odds(chosen, clamp_at) - ref_log_odds(rejected, clamp_at)
    return ratio, F.logsigmoid(ratio)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odds_ratio_terms_match_float64(dtype):
    cs, rs = _grid_pairs()
    chosen, rejected = _leaf(cs, dtype), _leaf(rs, dtype)
    c64 = chosen.detach().double().requires_grad_(True)
    r64 = rejected.detach().double().requires_grad_(True)
    w = torch.linspace(-1.0, 2.0, len(cs), dtype=torch.float64)  # weights so both outputs matter per pair

    ratio, log_sig = odds_ratio_terms(chosen, rejected)
    ratio_ref, log_sig_ref = ref_odds_ratio_terms(c64, r64)
    _assert_finite(ratio, log_sig)
    _assert_close(ratio, ratio_ref, torch.float32)
    _assert_close(log_sig, log_sig_ref, torch.float32)
    assert (log_sig <= 0).all()

    for out, out_ref in ((ratio, ratio_ref), (log_sig, log_sig_ref)):
        grads = torch.autograd.grad(out, (chosen, rejected), grad_outputs=w.to(out.dtype), retain_graph=True)
        grads_ref = torch.autograd.grad(out_ref, (c64, r64), grad_outputs=w, retain_graph=True)
        for g, g_ref in zip(grads, grads_ref):
            _assert_finite(g)
            _assert_close(g, g_ref, dtype)


# ----------------------------------------------------------------------------------------------- sequence logps
def test_sequence_logps_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    num_sequences = 6  # sequence 4 gets no tokens
    seq_index = torch.tensor([0, 0, 1, 2, 2, 2, 3, 5, 5, 1, 0, 3, 5])
    token_logps = (-torch.rand(seq_index.shape[0], generator=gen, dtype=torch.float64) * 3).requires_grad_(True)

    got = sequence_logps(token_logps, seq_index, num_sequences)
    expected = []
    for s in range(num_sequences):
        members = [token_logps[i] for i in range(len(seq_index)) if seq_index[i] == s]
        expected.append(sum(members) / len(members) if members else token_logps.new_zeros(()))
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected)

    w = torch.arange(1.0, num_sequences + 1, dtype=torch.float64)
    (g,) = torch.autograd.grad(got, token_logps, grad_outputs=w)
    (g_ref,) = torch.autograd.grad(expected, token_logps, grad_outputs=w)
    torch.testing.assert_close(g, g_ref)


# ----------------------------------------------------------------------------------------------- orpo_loss
def ref_orpo_loss(chosen, rejected, nll_sum, nll_tokens, beta):
    """The per-batch mean formula: NLL / tokens - beta * mean(log sigmoid(log odds ratio)), in float64."""
    _, log_sig = ref_odds_ratio_terms(chosen, rejected)
    return nll_sum.double() / nll_tokens - beta * log_sig.mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orpo_loss_equals_per_batch_mean_formula(dtype):
    cs, rs = _grid_pairs()
    chosen, rejected = _leaf(cs, dtype), _leaf(rs, dtype)
    nll_sum = torch.tensor(37.5, dtype=dtype, requires_grad=True)
    beta, nll_tokens = 0.25, 23

    out = orpo_loss(chosen, rejected, nll_sum, nll_tokens, beta=beta)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (chosen, rejected, nll_sum)]
    ref = ref_orpo_loss(*leaves64[:2], leaves64[2], nll_tokens, beta)

    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    _assert_close(out.loss, ref, torch.float32)
    grads = torch.autograd.grad(out.loss, (chosen, rejected, nll_sum))
    grads_ref = torch.autograd.grad(ref, leaves64)
    for g, g_ref in zip(grads, grads_ref):
        _assert_finite(g)
        _assert_close(g, g_ref, dtype)

    # The metric fields.
    assert out.nll_tokens == nll_tokens and not out.nll_sum.requires_grad
    assert out.log_odds.shape == out.log_sigmoid.shape == (len(cs),)
    assert out.chosen_logps is chosen and out.rejected_logps is rejected


def test_orpo_loss_without_nll_tokens_is_finite():
    out = orpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor(0.0), 0, beta=0.1)
    _assert_finite(out.loss)


def _micro_batch_inputs(token_logps, token_seq, token_is_chosen, pairs):
    """Per-pair mean log-probs and the chosen-token NLL sum of the pairs in `pairs` (a list of pair indices)."""
    n = len(pairs)
    chosen_logps, rejected_logps, nll_terms = [], [], []
    for p in pairs:
        c = token_logps[(token_seq == p) & token_is_chosen]
        r = token_logps[(token_seq == p) & ~token_is_chosen]
        chosen_logps.append(c.mean())
        rejected_logps.append(r.mean())
        nll_terms.append(-c.sum())
    nll_tokens = int(sum(((token_seq == p) & token_is_chosen).sum() for p in pairs))
    assert len(chosen_logps) == n
    return torch.stack(chosen_logps), torch.stack(rejected_logps), torch.stack(nll_terms).sum(), nll_tokens


def test_orpo_loss_totals_make_gradient_accumulation_exact():
    gen = torch.Generator().manual_seed(1)
    num_pairs = 7
    lengths = [(3, 5), (1, 2), (6, 4), (2, 2), (8, 1), (4, 7), (5, 3)]  # (chosen, rejected) tokens per pair
    token_seq = torch.tensor([p for p, (c, r) in enumerate(lengths) for _ in range(c + r)])
    token_is_chosen = torch.tensor([k < c for c, r in lengths for k in range(c + r)])
    token_logps = (-torch.rand(token_seq.shape[0], generator=gen) * 4).requires_grad_(True)
    beta = 0.3

    whole = orpo_loss(*_micro_batch_inputs(token_logps, token_seq, token_is_chosen, list(range(num_pairs))), beta=beta)
    (g_whole,) = torch.autograd.grad(whole.loss, token_logps)

    total_nll_tokens = sum(c for c, _ in lengths)
    splits = [[0, 1], [2, 3, 4], [5], [6]]  # uneven micro-batches, as packing produces
    micro_losses, g_acc = [], torch.zeros_like(token_logps)
    for pairs in splits:
        inputs = _micro_batch_inputs(token_logps, token_seq, token_is_chosen, pairs)
        out = orpo_loss(*inputs, beta=beta, total_pairs=num_pairs, total_nll_tokens=total_nll_tokens)
        micro_losses.append(out.loss)
        g_acc += torch.autograd.grad(out.loss, token_logps)[0]

    torch.testing.assert_close(torch.stack(micro_losses).sum(), whole.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_acc, g_whole, rtol=1e-6, atol=1e-7)

    # Without the totals, averaging the per-micro-batch means is not the whole-batch loss.
    plain = [
        orpo_loss(*_micro_batch_inputs(token_logps, token_seq, token_is_chosen, p), beta=beta).loss for p in splits
    ]
    assert not torch.allclose(torch.stack(plain).mean(), whole.loss, rtol=1e-4, atol=1e-4)


def test_prob_ratio_terms_literal_values():
    """The ORPO paper's ablation: -log sigmoid(log P(chosen) - log P(rejected)), the mean log-probs themselves."""
    chosen = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-2.0, -1.0, -0.5])
    ratio, log_sig = prob_ratio_terms(chosen, rejected)
    assert ratio.tolist() == [1.0, -1.0, 0.0]
    # log sigmoid(1) = -log(1 + e^-1), log sigmoid(-1) = -log(1 + e), log sigmoid(0) = -log 2
    torch.testing.assert_close(log_sig, torch.tensor([-0.31326169, -1.31326169, -0.69314718]))
    log_sig.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([0.26894142, 0.73105858, 0.5]))  # sigmoid(-ratio)


def test_prob_ratio_differs_from_odds_ratio_and_enters_the_loss():
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    nll_sum = torch.tensor(3.0)
    pr = orpo_loss(chosen, rejected, nll_sum, 6, beta=0.5, loss_type="prob_ratio")
    # NLL 3/6 = 0.5; beta * mean(-log sigmoid) = 0.5 * (0.31326169 + 1.31326169) / 2
    assert pr.loss.item() == pytest.approx(0.90663084, abs=1e-7)
    assert pr.log_odds.tolist() == [1.0, -1.0]
    odds = orpo_loss(chosen, rejected, nll_sum, 6, beta=0.5)
    # log odds(-1) - log odds(-2) = -log(e - 1) + log(e^2 - 1) = log(e + 1) = 1.3132617, not the prob ratio's 1
    assert odds.log_odds[0].item() == pytest.approx(1.3132617, abs=1e-6)
    assert odds.loss.item() != pytest.approx(pr.loss.item())
    with pytest.raises(ValueError, match="loss_type"):
        orpo_loss(chosen, rejected, nll_sum, 6, loss_type="probability")
