"""Evaluation: preference accuracy and log-odds margin of a model on tokenized pairs."""

from __future__ import annotations

import torch

from .collators import PreferenceCollator
from .losses import log_odds
from .modeling import OutputHead, predicted_logps, unwrap


@torch.no_grad()
def pair_logps(model, pairs, pad_token_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean response log-prob of chosen and rejected for every pair (padded layout, eval mode)."""
    base = unwrap(model)
    was_training = base.training
    base.eval()
    head = OutputHead.of(base)
    collate = PreferenceCollator(pad_token_id, "padded")
    device = next(base.parameters()).device
    chosen, rejected = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            token_logps, _ = predicted_logps(model, batch, head, chunk_size=1024 if head.chunkable else None)
            p = int(batch["num_pairs"])
            seq = batch["pred_seq"]
            resp = seq >= 0
            sums = torch.zeros(2 * p, device=device).index_add(0, seq[resp], token_logps[resp].float())
            counts = torch.bincount(seq[resp], minlength=2 * p).clamp(min=1)
            logps = (sums / counts).cpu()
            chosen.append(logps[:p])
            rejected.append(logps[p:])
    finally:
        base.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """Accuracy (log odds of chosen > rejected), mean log-odds margin, mean log-probs."""
    margin = log_odds(chosen_logps.double()) - log_odds(rejected_logps.double())
    return {
        "accuracy": (margin > 0).double().mean().item(),
        "log_odds_margin": margin.mean().item(),
        "logps_chosen": chosen_logps.double().mean().item(),
        "logps_rejected": rejected_logps.double().mean().item(),
        "pairs": int(chosen_logps.numel()),
    }
