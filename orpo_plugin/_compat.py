"""Every probe of what the installed torch/TRL/transformers versions provide lives here, and only here.

Callers ask these functions instead of importing a version-dependent name themselves. Two things are read where they
are adapted, in `attention/varlen.py`: the flash-attn package (optional, not a version) and the keywords that the
`varlen_attn` found here takes (`torch_varlen_kernel` adapts to either calling convention).
"""

from __future__ import annotations

import functools
import inspect

# and, through __getattr__ below, BaseConfig and BaseTrainer
__all__ = [
    "bf16_left_unset",
    "dtensor_class",
    "flex_attention_available",
    "forward_accepts",
    "fsdp_module_class",
    "torch_varlen_attn",
]


def __getattr__(name: str):
    """`BaseConfig` and `BaseTrainer`, TRL's bases for configs and trainers, imported on first use, so that the torch
    probes below (used by the attention and the forward) do not import TRL."""
    if name == "BaseConfig":
        try:  # trl >= 1.x keeps TRL's common TrainingArguments defaults here
            from trl.trainer.base_config import _BaseConfig as BaseConfig
        except ImportError:  # pragma: no cover - older TRL
            from transformers import TrainingArguments as BaseConfig
        return BaseConfig
    if name == "BaseTrainer":
        try:
            from trl.trainer.base_trainer import _BaseTrainer as BaseTrainer
        except ImportError:  # pragma: no cover - older TRL
            from transformers import Trainer as BaseTrainer
        return BaseTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bf16_left_unset(args) -> bool:
    """Whether `bf16` was left unset, checked before the base config's `__post_init__` resolves it.

    TRL >= 1.9 (`_BaseConfig`, here 1.9 and 1.16 alike) declares `bf16: bool | None = None` and turns None into
    `not fp16` in `__post_init__`, i.e. bf16 on; transformers' `TrainingArguments` declares `bf16: bool = False`,
    so under it nothing is ever unset.
    """
    return args.bf16 is None


@functools.cache
def forward_accepts(cls: type, name: str) -> bool:
    """Whether `cls.forward` takes the keyword `name` (transformers' models gained `logits_to_keep` release by
    release, and remote-code models may lack it)."""
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def fsdp_module_class() -> type | None:
    """torch's FSDP2 module class (`torch.distributed.fsdp.FSDPModule`), or None on a torch without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def dtensor_class() -> type | None:
    """torch's `DTensor` (what FSDP2 shards parameters into), or None on a torch without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def flex_attention_available() -> bool:
    """Whether this torch has `torch.nn.attention.flex_attention` (flex_attention and create_block_mask)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401 - the probe
    except ImportError:
        return False
    return True


def torch_varlen_attn():
    """torch's own FlashAttention varlen function (`torch.nn.attention.varlen.varlen_attn`), or None where this torch
    has none (its keywords differ between releases: see `attention.varlen.torch_varlen_kernel`)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
