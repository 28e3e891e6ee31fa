"""Every difference between the supported TRL/transformers versions is handled here, and only here."""

from __future__ import annotations

try:  # trl >= 1.x keeps TRL's common TrainingArguments defaults here
    from trl.trainer.base_config import _BaseConfig as BaseConfig
except ImportError:  # pragma: no cover - older TRL
    from transformers import TrainingArguments as BaseConfig

try:
    from trl.trainer.base_trainer import _BaseTrainer as BaseTrainer
except ImportError:  # pragma: no cover - older TRL
    from transformers import Trainer as BaseTrainer

__all__ = ["BaseConfig", "BaseTrainer", "bf16_left_unset"]


def bf16_left_unset(args) -> bool:
    """Whether `bf16` was left unset, checked before the base config's `__post_init__` resolves it.

    TRL >= 1.9 (`_BaseConfig`, here 1.9 and 1.16 alike) declares `bf16: bool | None = None` and turns None into
    `not fp16` in `__post_init__`, i.e. bf16 on; transformers' `TrainingArguments` declares `bf16: bool = False`,
    so under it nothing is ever unset.
    """
    return args.bf16 is None
