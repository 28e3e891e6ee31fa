"""orpo_plugin/_quiet.py: importing orpo_plugin silences the dependency notices nobody can act on, and only those."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import logging, sys, warnings
import orpo_plugin
logging.basicConfig(stream=sys.stdout, format="%(name)s: %(message)s")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure you already `pip install "
    "kernels` and the kernels >= 0.11.1")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
logging.getLogger("kernels._internals.hf_hub").warning(
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in "
    "offline mode.")
warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` "
              "instead.", FutureWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("some other FutureWarning", FutureWarning)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_orpo_plugin_filters_exactly_the_listed_notices():
    run = _run(PROBE)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    assert "gemm_4bit_forward" not in out and "publisher trust check" not in out
    assert "gradient_checkpointing` is deprecated" not in out
    assert "bitsandbytes.backends.cpu.ops: another bitsandbytes warning" in out  # the rest still shows
    assert "some other FutureWarning" in out


def test_a_training_script_starts_without_dependency_notices():
    # what the quick start imports, in its order; bitsandbytes prints its kernels line on import on CPUs with
    # AVX512-BF16, and transformers' config its FutureWarning
    run = _run(
        "import orpo_plugin\nimport bitsandbytes, peft, trl\n"
        "from orpo_plugin import ORPOConfig\nORPOConfig(output_dir='x', report_to='none')\n"
    )
    assert run.returncode == 0, run.stderr
    for noise in ("gemm_4bit_forward", "pip install kernels", "FutureWarning", "publisher trust check"):
        assert noise not in run.stderr, run.stderr
