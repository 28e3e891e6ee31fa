"""The training fields the fast CPU tests share: one float32 step on the CPU, logged, nothing saved.

bf16 is off because parity at 1e-5 needs float32: TRL's config turns an unset bf16 into True, and bf16 numerics are
tested in test_numerics.py. Gradient checkpointing is left at its default (on).
"""

from __future__ import annotations


def cpu_fields(output_dir: str, /, **overrides) -> dict:
    """Keyword arguments for ORPOConfig (or TRL's): these fields, then `overrides` (an output_dir too) on top."""
    fields = dict(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        max_length=64,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return fields
