"""The training hot path reads nothing back from the device: no synchronisation per micro-batch or per layer.

A device-to-host read is what makes the host wait for the accelerator. On a CPU nothing waits, so the test counts the
operations that would wait on a GPU, wherever orpo_plugin's code calls them during `get_batch_samples` and
`training_step` (collation, forward, loss, backward): `aten._local_scalar_dense` (`.item()`, `int()`, `float()`,
`bool()` of a tensor), data-dependent output sizes (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`bincount`, `repeat_interleave` without a size) and `Tensor.tolist()`/`.cpu()` calls. The collator works on the
host by design (its tensors are built from Python lists), so its frames are not counted; logging (once per logging
step, outside these two functions) reads the summed metrics in one copy.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from datasets import Dataset
from helpers.stubs import StubTokenizer  # tests/helpers
from helpers.training import cpu_fields  # tests/helpers
from torch.utils._python_dispatch import TorchDispatchMode

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.toy import build_model

PACKAGE = os.path.dirname(os.path.abspath(__import__("orpo_plugin").__file__)) + os.sep
HOST_SIDE = (os.path.join(PACKAGE, "collators.py"),)
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
    aten.is_nonzero.default,
    aten.equal.default,
}


def _caller() -> str:
    """The file of the innermost frame outside torch and this test (who asked for the operation)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TORCH) and name != __file__:
            return name
        frame = frame.f_back
    return ""


class SyncCounter(TorchDispatchMode):
    """Counts operations that wait for the device, by who called them (orpo_plugin's code or others)."""

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.others: list[str] = []

    def note(self, what: str) -> None:
        caller = _caller()
        if caller.startswith(PACKAGE) and caller not in HOST_SIDE:
            self.ours.append(f"{what} from {caller[len(PACKAGE) :]}")
        else:
            self.others.append(f"{what} from {caller}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if func in SYNCING and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None):
            self.note(str(func))
        elif bool_index:
            self.note(f"{func} with a boolean mask")
        return func(*args, **kwargs)


@pytest.fixture
def counter(monkeypatch):
    c = SyncCounter()
    for method in ("tolist", "cpu"):
        original = getattr(torch.Tensor, method)

        def wrapped(self, *a, _original=original, _name=method, **kw):
            if c.active:
                c.note(f"Tensor.{_name}()")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, method, wrapped)
    c.active = False
    return c


PAIRS = [
    {
        "prompt_input_ids": [3 + (i % 5)] * (1 + i % 4),
        "chosen_input_ids": [7 + i % 9] * (2 + i % 3),
        "rejected_input_ids": [11 + i % 7] * (1 + i % 5),
    }
    for i in range(16)
]


def counted(trainer_cls, counter):
    class Counted(trainer_cls):
        def get_batch_samples(self, *args, **kwargs):
            counter.active = True
            try:
                with counter:
                    return super().get_batch_samples(*args, **kwargs)
            finally:
                counter.active = False

        def training_step(self, *args, **kwargs):
            counter.active = True
            try:
                with counter:
                    return super().training_step(*args, **kwargs)
            finally:
                counter.active = False

    return Counted


def test_the_counter_sees_a_device_read_in_our_code(counter):
    from orpo_plugin.attention import host_list
    from orpo_plugin.modeling import _host_count

    mask = torch.tensor([True, False, True])
    counter.active = True
    with counter:
        assert _host_count({}, "nll_tokens", mask) == 2  # a collator without host counts: int(mask.sum())
        host_list(torch.tensor([0, 3, 5]))  # a layout tensor the collator gave no host copy of: tolist()
    counter.active = False
    assert len(counter.ours) == 2, counter.ours


@pytest.mark.parametrize(
    "layout",
    [{}, {"packing": True}, {"padding_free": True}, {"prefix_sharing": True}],
    ids=["padded", "packing", "padding_free", "prefix_sharing"],
)
def test_training_steps_make_no_device_read_in_orpo_plugin(counter, layout):
    model = build_model(32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    args = ORPOConfig(
        **cpu_fields(
            "/tmp/orpo-sync",
            gradient_accumulation_steps=2,
            max_steps=2,
            max_length=1024,
            packing_max_tokens=48,
            **layout,
        )
    )
    trainer = counted(ORPOTrainer, counter)(
        model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=StubTokenizer()
    )
    assert trainer.args.gradient_checkpointing and trainer.chunk_size  # the defaults: checkpointing, chunked loss
    trainer.train()
    assert trainer.state.global_step == 2
    assert counter.ours == [], counter.ours
    assert any(k == "loss" for h in trainer.state.log_history for k in h)  # logging ran (outside the hot path)
