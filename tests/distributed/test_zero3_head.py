"""The output layer under a ZeRO-3-like engine, in one process: the forward redirection the trainer uses for ZeRO-3.

tests/distributed/test_deepspeed.py runs the trainer under real DeepSpeed ZeRO-3 (2 CPU processes); this stand-in isolates the
redirection itself, for tied and untied embeddings and several chunk sizes, in a fraction of a second. `FakeZero3`
reproduces what the chunked loss depends on: every parameter carries a `ds_id` and holds an empty placeholder except
inside the forward of the module that owns it (a forward pre-hook gathers it, a post-hook frees it; a hook on the
module's outputs gathers it again for backward, as DeepSpeed's pre-backward hook does), and gradients are moved into a
separate partition store as soon as they are accumulated. Log-probs and every gradient must equal the plain model's.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from orpo_plugin.collators import PreferenceCollator
from orpo_plugin.modeling import predicted_logps
from orpo_plugin.sharded_head import OutputHead, sharded_head_owner
from orpo_plugin.startup_checks import verify_head
from orpo_plugin.toy import build_model

VOCAB = 97


class FakeZero3:
    def __init__(self, model):
        self.full, self.grads, self.handles = {}, {}, []
        for i, (name, p) in enumerate(model.named_parameters()):
            p.ds_id = i
            self.full[p] = p.data
            p.data = torch.empty(0, dtype=p.dtype)
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(self._take_grad(name)))
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own:
                self.handles.append(module.register_forward_pre_hook(self._gather(own)))
                self.handles.append(module.register_forward_hook(self._release(own)))

    def _gather(self, params):
        def hook(*_):
            for p in params:
                p.data = self.full[p]

        return hook

    def _release(self, params):
        def hook(_module, _inputs, output):
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)
            regather = self._gather(params)
            for t in output if isinstance(output, tuple) else (output,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g: regather())

        return hook

    def _take_grad(self, name):
        def hook(p):
            self.grads[name] = self.grads.get(name, 0) + p.grad
            p.grad = None

        return hook


def batch():
    rng = random.Random(5)

    def ids(lo, hi):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    feats = [
        {"prompt_input_ids": ids(2, 6), "chosen_input_ids": ids(2, 7), "rejected_input_ids": ids(2, 7)}
        for _ in range(3)
    ]
    return PreferenceCollator(0, "padding_free")(feats)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [8, 4096, None])
def test_zero3_like_output_layer_through_forward_redirection(tied, chunk):
    model = build_model(VOCAB, hidden_size=32, num_layers=2, tie_word_embeddings=tied, seed=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref = copy.deepcopy(model)
    data = batch()
    weights = None

    def loss_of(logps):
        nonlocal weights
        weights = torch.linspace(-1, 1, logps.numel()) if weights is None else weights
        return (logps * weights).sum()

    want, want_sums = predicted_logps(ref, data, OutputHead.of(ref), chunk)
    loss_of(want).backward()
    head = OutputHead.of(model)
    engine = FakeZero3(model)
    assert sharded_head_owner(model, head) is model.lm_head
    with pytest.raises(RuntimeError):  # control: outside its forward the weight is a placeholder
        torch.nn.functional.linear(torch.zeros(1, 32), model.lm_head.weight)
    got, got_sums = predicted_logps(model, data, head, chunk)
    loss_of(got).backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_sums, want_sums, atol=1e-5, rtol=1e-5)
    expected = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert sorted(engine.grads) == sorted(expected)
    for name, g in expected.items():
        torch.testing.assert_close(engine.grads[name], g, atol=1e-6, rtol=1e-6, msg=name)
    # the start-of-training head check runs through the same redirection on a partitioned model
    assert verify_head(model, head, owner=model.lm_head) < 1e-5
