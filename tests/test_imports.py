"""The library a TRL or Axolotl user imports never imports the demo app (orpo_plugin.demo)."""

from __future__ import annotations

import subprocess
import sys

# what `from orpo_plugin import ORPOConfig, ORPOTrainer` and the Axolotl plugin load, and the eval command
LIBRARY_IMPORTS = (
    "import orpo_plugin; orpo_plugin.ORPOTrainer",
    "import orpo_plugin.trainer, orpo_plugin.evaluation, orpo_plugin.eval_cli, orpo_plugin.callbacks",
    "import orpo_plugin.axolotl.args, orpo_plugin.axolotl.dataset_types",
)


def test_library_does_not_import_the_demo():
    """One process imports each of LIBRARY_IMPORTS in turn and reports the demo modules loaded after each."""
    code = "import sys\n" + "".join(
        f"{statement}\nprint(sorted(m for m in sys.modules if m.startswith('orpo_plugin.demo')))\n"
        for statement in LIBRARY_IMPORTS
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for statement, loaded in zip(LIBRARY_IMPORTS, run.stdout.strip().splitlines(), strict=True):
        assert loaded == "[]", f"{statement!r} imported {loaded}"


def test_the_check_sees_a_demo_import():
    """The check above would notice: importing the demo's command line does load orpo_plugin.demo."""
    code = "import orpo_plugin.demo.cli, sys; print(any(m.startswith('orpo_plugin.demo') for m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "True", run.stderr


def test_the_forward_and_attention_do_not_import_trl():
    """_compat's torch probes are importable without TRL: the forward and the attention never load it."""
    code = (
        "import orpo_plugin.modeling, orpo_plugin.attention, orpo_plugin.startup_checks, sys; "
        "print('trl' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "False", run.stderr
