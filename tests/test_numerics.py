"""Numerics under stress: bf16 autocast at mean log-probs near 0 and near -100, responses with no predicted token,
one-token responses. Losses and gradients must stay finite (and right where a reference exists)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from orpo_plugin.collators import LAYOUTS, PreferenceCollator
from orpo_plugin.losses import log_odds, orpo_loss, sequence_logps
from orpo_plugin.modeling import OutputHead, orpo_forward
from orpo_plugin.toy import build_model

VOCAB = 64
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def ref_loss64(chosen, rejected, nll_sum, nll_tokens, beta):
    """The ORPO loss in float64 from the plain formulas."""
    c, r = chosen.double(), rejected.double()
    lo = (c - torch.log(-torch.expm1(c))) - (r - torch.log(-torch.expm1(r)))
    return nll_sum.double() / nll_tokens - beta * torch.nn.functional.logsigmoid(lo).mean()


def finite_grads(model):
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no gradient reached the model"
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    return grads


# ----------------------------------------------------------------------------------------------- the loss alone
@pytest.mark.parametrize(
    "chosen,rejected",
    [
        ([-1e-6, -1e-3, -0.02], [-0.5, -2.0, -1e-4]),  # near 0 (a nearly certain model)
        ([-95.0, -100.0, -0.3], [-100.0, -120.0, -99.0]),  # near -100 (a hopeless one)
    ],
    ids=["near-0", "near-minus-100"],
)
def test_loss_under_bf16_autocast_matches_float64(chosen, rejected):
    beta = 0.1
    # bf16 activations, as autocast would hand them over; the reference sees the same rounded values
    c = torch.tensor(chosen).to(torch.bfloat16).requires_grad_(True)
    r = torch.tensor(rejected).to(torch.bfloat16).requires_grad_(True)
    nll_sum = torch.tensor(7.0, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(**BF16):
        out = orpo_loss(c, r, nll_sum, 5, beta)
    assert out.loss.dtype == torch.float32  # log-odds are computed in float32 at least
    out.loss.backward()
    for t in (out.loss, c.grad, r.grad, nll_sum.grad, out.log_odds):
        assert torch.isfinite(t).all()

    c64, r64 = c.detach().double().requires_grad_(True), r.detach().double().requires_grad_(True)
    ref = ref_loss64(c64, r64, torch.tensor(7.0, dtype=torch.float64), 5, beta)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(c.grad.double(), c64.grad, rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(r.grad.double(), r64.grad, rtol=2e-2, atol=1e-6)


def test_log_odds_at_exactly_zero_and_far_below_under_autocast():
    x = torch.tensor([0.0, -1e-30, -100.0, -1e4], dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(**BF16):
        lo = log_odds(x)
    lo.sum().backward()
    assert torch.isfinite(lo).all() and torch.isfinite(x.grad).all()
    assert lo[0].item() == pytest.approx(-math.log(1e-30), rel=1e-3)  # clamped just below 0: large, finite
    assert lo[2].item() == pytest.approx(-100.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------- through a model
def greedy(model, prompt, n, pick):
    """n tokens after `prompt`, each the model's argmax (pick=max) or argmin (pick=min) next token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(pick(logits)))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def stressed():
    """A model and pairs whose chosen responses are its own argmax tokens and rejected ones its argmin tokens."""
    model = build_model(VOCAB, hidden_size=32, num_layers=2, seed=1).eval()
    prompts = [[1, 5, 9], [1, 17, 3, 22, 40], [1, 30]]
    pairs = [
        {
            "prompt_input_ids": p,
            "chosen_input_ids": greedy(model, p, 4, torch.argmax),
            "rejected_input_ids": greedy(model, p, 3, torch.argmin),
        }
        for p in prompts
    ]
    return model, pairs


def scaled(model, factor):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight.mul_(factor)
    return m.train()


def forward(model, pairs, layout, chunk_size, autocast):
    head = OutputHead.of(model)
    batch = PreferenceCollator(0, layout)(pairs)
    ctx = torch.autocast(**BF16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        result = orpo_forward(model, batch, head, beta=0.1, chunk_size=chunk_size)
    result.output.loss.backward()
    return result.output


@pytest.mark.parametrize("chunk_size", [None, 5], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_extremely_confident_model(stressed, autocast, chunk_size):
    """lm_head x 1e4: the argmax responses get mean log-prob ~0 (exactly 0 in float32), the rest ~ -1e3 and below."""
    model, pairs = stressed
    m = scaled(model, 1e4)
    out = forward(m, pairs, "padding_free", chunk_size, autocast)
    assert torch.isfinite(out.loss)
    assert (out.chosen_logps > -1e-2).all(), out.chosen_logps
    assert (out.rejected_logps < -100).all(), out.rejected_logps
    assert torch.isfinite(out.log_odds).all()
    finite_grads(m)


@pytest.mark.parametrize("chunk_size", [None, 5], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_extremely_wrong_model_near_minus_100(stressed, autocast, chunk_size):
    """lm_head scaled so the argmin responses average about -100: finite, and bf16 close to float32."""
    model, pairs = stressed
    # logits scale with lm_head; far out, log p(token) ~ factor * (its logit - the top logit)
    gaps = []
    with torch.no_grad():
        for pair in pairs:
            ids = pair["prompt_input_ids"] + pair["rejected_input_ids"]
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            for j in range(len(pair["prompt_input_ids"]) - 1, len(ids) - 1):
                gaps.append((logits[j, ids[j + 1]] - logits[j].max()).item())
    factor = 100.0 / -(sum(gaps) / len(gaps))
    m = scaled(model, factor)
    out = forward(m, pairs, "padded", chunk_size, autocast)
    assert torch.isfinite(out.loss)
    assert ((out.rejected_logps < -50) & (out.rejected_logps > -200)).all(), out.rejected_logps
    grads = finite_grads(m)
    if autocast:
        ref_model = scaled(model, factor)
        ref = forward(ref_model, pairs, "padded", chunk_size, False)
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=5e-2)
        torch.testing.assert_close(out.rejected_logps, ref.rejected_logps, rtol=5e-2, atol=0.5)
        g, g_ref = grads["lm_head.weight"], ref_model.lm_head.weight.grad
        cos = torch.nn.functional.cosine_similarity(g.flatten().float(), g_ref.flatten(), dim=0)
        assert cos > 0.95


# ----------------------------------------------------------------------------------------------- degenerate responses
def test_sequence_logps_with_a_sequence_that_has_no_tokens_is_finite():
    token_logps = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    seq = torch.tensor([0, 0, 2])  # sequence 1 has no response token; sequence 3 neither
    logps = sequence_logps(token_logps, seq, 4)
    assert torch.isfinite(logps).all() and logps.tolist() == [-1.5, 0.0, -3.0, 0.0]
    out = orpo_loss(logps[:2], logps[2:], -token_logps.sum(), 3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(token_logps.grad).all()
    # nothing at all to average
    empty = sequence_logps(torch.zeros(0, requires_grad=True), torch.zeros(0, dtype=torch.long), 2)
    assert empty.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collator_refuses_an_empty_response(layout):
    pairs = [
        {"prompt_input_ids": [1, 4], "chosen_input_ids": [5, 2], "rejected_input_ids": [6, 2]},
        {"prompt_input_ids": [1, 4], "chosen_input_ids": [7, 2], "rejected_input_ids": []},
    ]
    with pytest.raises(ValueError, match="pair 1 of the batch has an empty response"):
        PreferenceCollator(0, layout)(pairs)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_response_with_no_predicted_token_is_finite(layout, autocast):
    """Empty prompt (a tokenizer without BOS) + one-token response: nothing predicts that token, so the response
    has no log-prob terms at all (mean log-prob 0 by convention). The loss and gradients must stay finite."""
    model = build_model(VOCAB, hidden_size=32, num_layers=2).train()
    pairs = [
        {"prompt_input_ids": [], "chosen_input_ids": [7], "rejected_input_ids": [8, 9, 2]},
        {"prompt_input_ids": [1, 3], "chosen_input_ids": [10, 2], "rejected_input_ids": [11]},
    ]
    out = forward(model, pairs, layout, 4, autocast)
    assert out.chosen_logps[0].item() == 0.0
    assert torch.isfinite(out.loss) and torch.isfinite(out.log_odds).all()
    finite_grads(model)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_token_responses(layout, autocast):
    model = build_model(VOCAB, hidden_size=32, num_layers=2).train()
    prompt = [1, 12, 13, 14]
    pairs = [{"prompt_input_ids": prompt, "chosen_input_ids": [2], "rejected_input_ids": [20]}]
    out = forward(model, pairs, layout, 3, autocast)
    assert torch.isfinite(out.loss) and torch.isfinite(out.log_odds).all()
    finite_grads(model)
    with torch.no_grad():  # the mean over one token is that token's log-prob
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].float(), -1)
    tol = dict(rtol=2e-2, atol=5e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.chosen_logps[0].float(), logp[2], **tol)
    torch.testing.assert_close(out.rejected_logps[0].float(), logp[20], **tol)
