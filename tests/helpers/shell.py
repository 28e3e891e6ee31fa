"""Run a documented shell command as a user types it: `bash -c`, offline, in a folder of the test's choosing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_as_written(command: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `command` in `cwd` with HF_HUB_OFFLINE=1 and this checkout importable; fail the test unless it exits 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-3000:])
    return run
