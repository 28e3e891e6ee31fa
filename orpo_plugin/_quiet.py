"""Silence dependency warnings a user of orpo-plugin cannot act on; every other warning is left alone.

Installed when `orpo_plugin` is imported. Each filter matches one message of one library:
- bitsandbytes (CPU): "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels". An
  optional faster CPU kernel is fetched from the Hub; offline (or untrusted) it is not, and bitsandbytes falls back to
  its own kernel. Installing `kernels` does not help offline. `kernels` adds "Skipping publisher trust check ..." on
  the same attempt.
- transformers 5.x: "`gradient_checkpointing` is deprecated ... Use `activation_checkpointing`": TRL's configs
  (ours included, for parity) still declare the old field, and peft and TRL read `is_gradient_checkpointing`.
"""

from __future__ import annotations

import logging
import re
import warnings

_LOG_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    "kernels._internals.hf_hub": re.compile(r"Skipping publisher trust check for 'kernels-community/"),
}
FUTURE_WARNINGS = (
    r"`(is_)?gradient_checkpointing(_kwargs|_enable|_disable)?` is deprecated and will be removed in v6",
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(str(record.msg))


def install() -> None:
    """Add the filters (once; calling again changes nothing)."""
    for name, pattern in _LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    for message in FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
