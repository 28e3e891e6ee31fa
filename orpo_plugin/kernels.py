"""Speed and memory options users turn on in TRL and transformers, checked when the trainer starts and wired in.

- `use_liger_kernel` (transformers' TrainingArguments flag): Liger-Kernel's fused RMSNorm, RoPE and SwiGLU patch the
  model instance (transformers' `apply_liger_kernel` at the start of training). Its fused linear cross-entropy and
  cross-entropy are never turned on: ORPO's loss is orpo_plugin's chunked loss, which computes log-probs of the
  predicted tokens only and needs the model's final hidden states, not a loss from the model's forward.
- `activation_offloading` (ORPOConfig, as TRL's SFT/DPO configs): TRL's own context manager around each
  training step.

Both need an accelerator: Liger's kernels are Triton kernels, and TRL's offloading manager moves activations
between an accelerator and pinned host memory. On a machine without one they are refused here, at start, with a
message naming the option, never a crash inside a kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

# Liger's `_apply_liger_kernel_to_instance` options that replace the model's loss: never ours to turn on.
LIGER_LOSS_OPTIONS = ("fused_linear_cross_entropy", "cross_entropy")


def _accelerator(args) -> str | None:
    """The accelerator type training runs on (None: CPU)."""
    if getattr(args, "use_cpu", False):
        return None
    current = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if current is None and torch.cuda.is_available():  # pragma: no cover - torch without torch.accelerator
        return "cuda"
    return None if current is None else current.type


def liger_kernel_config(args) -> dict | None:
    """The `liger_kernel_config` to train with when `args.use_liger_kernel` is set (None when it is not), or a
    ValueError naming the option: no GPU, liger-kernel not installed, or a loss kernel asked for explicitly.

    The returned config is the user's with Liger's loss kernels off (see the module docstring).
    """
    if not getattr(args, "use_liger_kernel", False):
        return None
    device = _accelerator(args)
    if device != "cuda":
        raise ValueError(
            "use_liger_kernel=True needs a CUDA GPU (Liger-Kernel's kernels are Triton kernels); this run has "
            f"{'use_cpu=True' if getattr(args, 'use_cpu', False) else 'no GPU'}. Set use_liger_kernel=False"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("use_liger_kernel=True needs the liger-kernel package: pip install liger-kernel")
    config = dict(args.liger_kernel_config or {})
    asked = [k for k in LIGER_LOSS_OPTIONS if config.get(k)]
    if asked:
        raise ValueError(
            f"liger_kernel_config turns on {', '.join(asked)}: orpo_plugin computes the ORPO loss with its own chunked "
            "loss from the model's hidden states, so Liger's loss kernels cannot be used; remove "
            f"{' and '.join(asked)} from liger_kernel_config (Liger's RMSNorm, RoPE and SwiGLU stay on)"
        )
    config.update({k: False for k in LIGER_LOSS_OPTIONS})
    return config


def check_activation_offloading(args) -> None:
    """A ValueError naming `activation_offloading` where TRL's manager cannot run: without an accelerator (its
    constructor reads `torch.accelerator.current_accelerator().type`, None on a CPU-only machine), and modes other
    than on/off (Axolotl's `activation_offloading: legacy | disk | hidden_states` reach the same field)."""
    value = getattr(args, "activation_offloading", False)
    if value not in (None, True, False):
        raise ValueError(
            f"activation_offloading={value!r}: orpo_plugin runs TRL's activation offloading (True) or none (False); "
            "other offloading modes are not supported by its trainer. Set activation_offloading to true or false"
        )
    if value and _accelerator(args) is None:
        raise ValueError(
            "activation_offloading=True moves activations from an accelerator to host memory; this run has "
            f"{'use_cpu=True' if getattr(args, 'use_cpu', False) else 'no accelerator'}. Set activation_offloading=False"
        )


def activation_offloading_context(model, args):
    """TRL's activation offloading context manager for `model` when `args.activation_offloading` is set, else a
    null context (see `check_activation_offloading` for where it is refused)."""
    if not getattr(args, "activation_offloading", False):
        return contextlib.nullcontext()
    check_activation_offloading(args)
    from trl.models import get_act_offloading_ctx_manager

    return get_act_offloading_ctx_manager(model=model)
