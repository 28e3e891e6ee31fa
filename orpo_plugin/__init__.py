"""orpo-plugin: ORPO preference optimisation for TRL scripts and Axolotl — exact, packed, memory-lean."""

from . import _quiet

_quiet.install()  # before transformers, peft or bitsandbytes are imported through us

from .chunked import chunked_target_logps  # noqa: E402 (after _quiet.install)
from .collators import PreferenceCollator  # noqa: E402 (after _quiet.install)
from .losses import log1mexp, log_odds, odds_ratio_terms, orpo_loss, sequence_logps  # noqa: E402 (after _quiet.install)
from .packing import PackedBatchSampler, pack_groups  # noqa: E402 (after _quiet.install)

__version__ = "0.1.0"

__all__ = [
    "ORPOConfig",
    "ORPOTrainer",
    "PreferenceCollator",
    "PackedBatchSampler",
    "chunked_target_logps",
    "log1mexp",
    "log_odds",
    "odds_ratio_terms",
    "orpo_loss",
    "pack_groups",
    "sequence_logps",
]


def __getattr__(name):  # the trainer pulls in transformers/trl: import it on first use
    if name in ("ORPOConfig", "ORPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'orpo_plugin' has no attribute {name!r}")
