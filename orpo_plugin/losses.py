"""The ORPO objective (Hong et al. 2024), pure torch.

    log P(y|x)      = mean over response tokens of log p(y_t | x, y_<t)          ("logps")
    log odds(y)     = log P - log(1 - P)                                         (stable: log1mexp)
    L_OR            = -log sigmoid(log odds(y_w) - log odds(y_l))
    L               = NLL(y_w) + beta * L_OR                                     (beta is the paper's lambda)

The paper's ablation (its section 7.1, "Comparison to Probability Ratio") puts the probability ratio in place of
the odds ratio: L_PR = -log sigmoid(log P(y_w) - log P(y_l))  (`prob_ratio_terms`, loss_type="prob_ratio").

Everything here works on sums, so a micro-batch can be normalised by totals that span the whole accumulated
batch (packing makes the number of pairs and tokens per micro-batch vary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# log(1 - exp(x)) is -inf at x = 0 and its gradient 1 / (1 - e^x) blows up there. A mean log-prob can reach 0
# (a model certain of every response token), so clamp just below: values down to -1e-30 stay exact.
LOGP_MAX = -1e-30
_LOG_HALF = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere and with finite gradients (x is clamped to <= -1e-30).

    Both branches of the `where` get inputs that are safe for them, so the unused branch never contributes an
    inf or NaN gradient (the failure of the single-`where` formulation at x -> 0).
    """
    x = x.clamp(max=LOGP_MAX)
    near_zero = x > _LOG_HALF
    x_near = torch.where(near_zero, x, torch.full_like(x, _LOG_HALF))
    x_far = torch.where(near_zero, torch.full_like(x, _LOG_HALF), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P, computed in float32 at least."""
    logps = logps.float() if logps.dtype in (torch.float16, torch.bfloat16) else logps
    return logps.clamp(max=LOGP_MAX) - log1mexp(logps)


def odds_ratio_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: (log odds ratio, log sigmoid of it). The OR loss is -beta * mean(log sigmoid)."""
    ratio = log_odds(chosen_logps) - log_odds(rejected_logps)
    return ratio, F.logsigmoid(ratio)


def prob_ratio_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: (log probability ratio, log sigmoid of it); the PR loss is -beta * mean(log sigmoid).

    log P(y_w) - log P(y_l) from the mean log-probs `[pairs]`. Source: Hong et al. 2024 (ORPO), section 7.1,
    "Comparison to Probability Ratio", the ablation that replaces the odds ratio by this ratio with the same lambda;
    the paper finds it pushes the rejected answers' log-probs down much harder than the odds ratio does.
    """
    chosen = chosen_logps.float() if chosen_logps.dtype in (torch.float16, torch.bfloat16) else chosen_logps
    rejected = rejected_logps.float() if rejected_logps.dtype in (torch.float16, torch.bfloat16) else rejected_logps
    ratio = chosen - rejected
    return ratio, F.logsigmoid(ratio)


LOSS_TYPES = {"odds_ratio": odds_ratio_terms, "prob_ratio": prob_ratio_terms}


def sequence_sums(
    token_logps: torch.Tensor, seq_index: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, token count) per sequence, [num_sequences] each, from a flat list of response-token
    log-probs and their sequence index."""
    sums = token_logps.new_zeros(num_sequences).index_add(0, seq_index, token_logps)
    # index_add, not bincount: bincount sizes its output from the data, which reads the device (a synchronisation)
    counts = sums.new_zeros(num_sequences).index_add(0, seq_index, sums.new_ones(seq_index.shape))
    return sums, counts


def sequence_logps(token_logps: torch.Tensor, seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Mean log-prob per sequence from a flat list of response-token log-probs and their sequence index."""
    sums, counts = sequence_sums(token_logps, seq_index, num_sequences)
    return sums / counts.clamp(min=1)


@dataclass
class ORPOOutput:
    """The loss of one micro-batch and what the metrics are made of (sums, so they aggregate exactly)."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor  # [pairs]
    rejected_logps: torch.Tensor  # [pairs]
    log_odds: torch.Tensor  # [pairs]
    log_sigmoid: torch.Tensor  # [pairs]
    nll_sum: torch.Tensor  # scalar: summed NLL over the NLL tokens of this micro-batch
    nll_tokens: int


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_sum: torch.Tensor,
    nll_tokens: int,
    beta: float = 0.1,
    total_pairs: float | None = None,
    total_nll_tokens: float | None = None,
    loss_type: str = "odds_ratio",
) -> ORPOOutput:
    """ORPO loss of a micro-batch: NLL/total_nll_tokens - beta * sum(log sigmoid)/total_pairs.

    With the totals left out they are this micro-batch's own counts, which gives the plain per-batch mean
    (what TRL computes). Pass the totals of the whole accumulated batch to make gradient accumulation exact.
    `loss_type`: "odds_ratio" (ORPO) or "prob_ratio" (the paper's ablation, `prob_ratio_terms`); the output's
    `log_odds` then holds the log probability ratio. ValueError for another name.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")
    ratio, log_sig = LOSS_TYPES[loss_type](chosen_logps, rejected_logps)
    total_pairs = chosen_logps.shape[0] if total_pairs is None else total_pairs
    total_nll_tokens = nll_tokens if total_nll_tokens is None else total_nll_tokens
    nll = nll_sum.float() / max(total_nll_tokens, 1)
    loss = nll - beta * log_sig.sum() / max(total_pairs, 1)
    return ORPOOutput(loss, chosen_logps, rejected_logps, ratio, log_sig, nll_sum.detach(), nll_tokens)
