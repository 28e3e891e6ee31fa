"""Shared steps of the real-model tier (tests/real/): load a converted checkpoint, one captured training step."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def args(config_cls, out, **kw):
    """Training arguments of the real-tier steps: float32 on CPU, one step, checkpointing at its default (on).

    SGD: the first step's gradients do not depend on the optimizer, and SGD keeps no state (AdamW's would double
    a 268M-parameter model's memory and add seconds per step on 2 cores).
    """
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-4,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        optim="sgd",
    )
    base.update(kw)
    return config_cls(**base)


def capture(trainer_cls):
    """The trainer class whose first training step keeps its loss, logged metrics and gradients."""
    from transformers import TrainerCallback

    class Capture(trainer_cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.logged = {}
            outer = self

            class Logs(TrainerCallback):
                def on_log(self, args, state, control, logs=None, **kwargs):
                    if logs and "loss" in logs and not outer.logged:
                        outer.logged = dict(logs)

            self.add_callback(Logs())

        def training_step(self, model, inputs, *a, **kw):
            loss = super().training_step(model, inputs, *a, **kw)
            if not hasattr(self, "grads"):
                self.loss = loss.item()
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            return loss

    return Capture


def grad_diff(grads, ref) -> tuple[float, str]:
    """Largest |g - g_ref| / (max |g_ref| of that tensor + 1e-8) over all tensors, and where it is."""
    assert grads.keys() == ref.keys(), sorted(set(grads) ^ set(ref))[:5]
    worst, where = 0.0, ""
    for k in ref:
        d = float((grads[k] - ref[k]).abs().max()) / (float(ref[k].abs().max()) + 1e-8)
        if d > worst:
            worst, where = d, k
    return worst, where


@dataclass
class Step:
    """What one captured training step left: its loss, logged metrics, gradients and the trainer's data and setup."""

    loss: float
    logged: dict
    grads: dict
    train_dataset: Any
    chunk_size: int | None
    config: Any  # the model's config
    gradient_checkpointing: bool


def one_step(trainer_cls, **trainer_kwargs) -> Step:
    """Train one captured step and keep only its results: the model and trainer are freed before returning, so a
    test holds one 268M-parameter model at a time."""
    t = capture(trainer_cls)(**trainer_kwargs)
    t.train()
    step = Step(
        t.loss,
        t.logged,
        t.grads,
        t.train_dataset,
        getattr(t, "chunk_size", None),
        t.model.config,
        bool(t.args.gradient_checkpointing),
    )
    del t
    gc.collect()
    return step
