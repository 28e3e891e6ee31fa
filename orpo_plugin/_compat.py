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

__all__ = ["BaseConfig", "BaseTrainer"]
