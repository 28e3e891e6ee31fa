"""Checks the trainer runs once at start, so a model it cannot train exactly stops before the first step: the output
layer reproduces the model's own logits (`verify_head`), and the layout's attention honours every feature of the
model (`check_layout`)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from ._compat import forward_accepts
from .modeling import model_inputs
from .sharded_head import OutputHead, hidden_then_head, unwrap


@contextlib.contextmanager
def _no_grad_checkpoint_notice():
    """Silence torch's "None of the inputs have requires_grad=True" for a start-up forward without grad.

    These checks run in training mode (see below), so reentrant gradient checkpointing wraps each layer and warns
    that no gradient will flow, which is true and intended there; the notice would read as a training fault.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
        yield


def verify_head(model, head: OutputHead, vocab_size: int | None = None, owner: torch.nn.Module | None = None) -> float:
    """Check that hidden states + `head` reproduce the model's own logits on a short input; return the max error.

    A model whose forward transforms logits in a way we do not know would otherwise train on wrong log-probs.
    `owner`: see `sharded_head_owner` (then `model` is the sharded module that training calls).
    """
    base = unwrap(model) if owner is None else model
    device = next(unwrap(model).parameters()).device
    vocab = vocab_size or head.vocab_size or head.module.weight.shape[0]
    ids = torch.arange(1, 9, device=device).remainder(vocab)[None]
    # One forward in training mode: the hidden states and the logits come from the same pass (same
    # dropout draw), and eval() is avoided (bitsandbytes repacks 4-bit weights for inference on some CPUs).
    was_training = base.training
    base.train()
    try:
        with torch.no_grad(), _no_grad_checkpoint_notice():
            ours, output = hidden_then_head(
                base, {"input_ids": ids, "use_cache": False}, lambda h: h, head.logits_by(owner), owner, head.module
            )
            logits = output.logits.float()
    finally:
        base.train(was_training)
    err = (logits - ours).abs().max().item()
    tol = 1e-3 * max(1.0, logits.abs().max().item())
    if err > tol:
        raise ValueError(
            f"{type(base).__name__}: logits computed from the final hidden states and the output layer differ from "
            f"the model's own by {err:.3g}; this model transforms its logits in a way orpo_plugin does not know"
        )
    return err


def check_layout(model, layout: str, attention_override: str | None, pad_token_id: int) -> None:
    """Run one tiny forward in `layout` at start, so a model feature its attention cannot honour stops training now.

    Every attention path refuses what it cannot compute exactly (a sliding window, soft-capping, sinks, dropout, an
    unknown keyword) when it is called; this makes that happen before the first step instead of during it.
    """
    from .attention import attention_implementation
    from .collators import PreferenceCollator

    base = unwrap(model)
    device = next(base.parameters()).device
    vocab = max(int(getattr(base.get_output_embeddings(), "out_features", 0) or 0), 16)
    pairs = [([3, 4, 5], [6, 7], [8, 9, 10]), ([5, 4], [7, 8, 9], [10])]
    features = [
        {
            "prompt_input_ids": [t % vocab for t in p],
            "chosen_input_ids": [t % vocab for t in c],
            "rejected_input_ids": [t % vocab for t in r],
        }
        for p, c, r in pairs
    ]
    batch = PreferenceCollator(pad_token_id, layout)(features)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model_inputs(batch).items()}
    if forward_accepts(type(base), "logits_to_keep"):
        inputs["logits_to_keep"] = 1
    impl = getattr(base.config, "_attn_implementation", None)
    # training mode: dropout is what training runs with (and bitsandbytes keeps its training weight layout)
    was_training = base.training
    base.train()
    try:
        with torch.no_grad(), _no_grad_checkpoint_notice(), attention_implementation(base, attention_override):
            base(**inputs, use_cache=False)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(
            f"{type(base).__name__} cannot train in the {layout} layout with attn_implementation={impl!r}"
            f"{f' (through {attention_override})' if attention_override else ''}: {err}"
        ) from err
    finally:
        base.train(was_training)
