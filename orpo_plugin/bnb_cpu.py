"""bitsandbytes 4-bit layers on a CPU: evaluation must not repack their weights for inference (see
`training_weight_layout`), and `CPU4BitGuardMixin` keeps the trainer's train/evaluate/predict in the training layout
and refuses to train layers that were repacked before training started."""

from __future__ import annotations

import contextlib


def cpu_4bit_layers(model) -> list:
    """bitsandbytes 4-bit layers that may switch to an inference-only CPU weight layout (see below)."""
    return [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


@contextlib.contextmanager
def training_weight_layout(layers: list):
    """Evaluate 4-bit layers without letting bitsandbytes repack their weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first eval-mode forward without grad;
    a later training step then backpropagates through a kernel that has no autograd (the gradient reaching the
    layers below is wrong, with only a warning). Inside training, evaluation keeps the training layout.
    """
    saved = [m.support_avx512bf16_for_cpu for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.support_avx512bf16_for_cpu = flag


def repacked_layers(layers: list) -> int:
    """How many of the 4-bit `layers` bitsandbytes has repacked for CPU inference."""
    return sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)) for m in layers)


class CPU4BitGuardMixin:
    """The trainer's guard for bitsandbytes 4-bit layers on CPU (a no-op for a model without them).

    `train`, `evaluate` and `predict` run with the training weight layout; `training_step` refuses layers that
    bitsandbytes already repacked for inference (their gradients would be wrong). Mixed into a `transformers.Trainer`.
    """

    def _4bit_layers(self) -> list:
        if getattr(self, "_cpu_4bit", None) is None:
            self._cpu_4bit = cpu_4bit_layers(self.model)
        return self._cpu_4bit

    def training_step(self, model, inputs, *args, **kwargs):
        layers = self._4bit_layers()
        repacked = repacked_layers(layers) if layers else 0
        if repacked:
            raise RuntimeError(
                f"{repacked} bitsandbytes 4-bit layers of the model were repacked for CPU inference (bitsandbytes does "
                "this on the first eval-mode forward without grad on CPUs with AVX512-BF16, here before training "
                "started). Training through them backpropagates wrong gradients, and bitsandbytes' inverse does not "
                "restore the weights exactly: reload the model, and run any inference before training in train mode"
            )
        return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        # covers evaluation steps and any callback that runs the model in eval mode during training
        with training_weight_layout(self._4bit_layers()):
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with training_weight_layout(self._4bit_layers()):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with training_weight_layout(self._4bit_layers()):
            return super().predict(*args, **kwargs)
