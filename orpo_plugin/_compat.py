"""Every probe of what the installed torch/TRL/transformers versions provide lives here, and only here.

Callers ask these functions instead of importing a version-dependent name themselves. (Optional kernels that are
packages rather than versions, flash-attn, and the calling convention of torch's varlen kernel are probed where they
are adapted, in `attention/`.)
"""

from __future__ import annotations

import functools
import inspect

try:  # trl >= 1.x keeps TRL's common TrainingArguments defaults here
    from trl.trainer.base_config import _BaseConfig as BaseConfig
except ImportError:  # pragma: no cover - older TRL
    from transformers import TrainingArguments as BaseConfig

try:
    from trl.trainer.base_trainer import _BaseTrainer as BaseTrainer
except ImportError:  # pragma: no cover - older TRL
    from transformers import Trainer as BaseTrainer

__all__ = ["BaseConfig", "BaseTrainer", "bf16_left_unset", "dtensor_class", "forward_accepts", "fsdp_module_class"]


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
