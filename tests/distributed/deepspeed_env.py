"""A virtualenv that adds DeepSpeed to the test interpreter's packages, for the ZeRO-3 tests (built on first use).

    python tests/distributed/deepspeed_env.py      build (or reuse) it and print its python

DeepSpeed is not a dependency of orpo-plugin, and installing it into the test interpreter would change what every
other test imports. The venv holds only DeepSpeed (`DEEPSPEED_SPEC`, built with DS_BUILD_OPS=0: no op is compiled at
install) and the few small packages it needs that the test interpreter lacks; a .pth file puts the test
interpreter's own site-packages after the venv's, so torch, transformers, accelerate and orpo_plugin are the very
ones the rest of the suite uses. A constraints file pins torch to the installed build, so pip can never pull another
torch (a CUDA wheel) into it. Measured on 2 cores: about 20 s to build, from the registry.

Environment: ORPO_DEEPSPEED_VENV (default $HOME/.cache/orpo-plugin/deepspeed-venv). A marker file records what the
venv was built from (DeepSpeed spec, python, torch, the parent's site-packages); when that changes it is rebuilt. A
directory the helper did not build is never deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

DEEPSPEED_SPEC = "deepspeed==0.19.8"  # DeepSpeed >= 0.14.1: its CPU accelerator falls back to gloo without oneCCL
BUILT = ".orpo-plugin-built"
MARKER = ".orpo-plugin-marker"


class DeepSpeedUnavailable(RuntimeError):
    pass


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "orpo-plugin" / "deepspeed-venv"
    return Path(os.environ.get("ORPO_DEEPSPEED_VENV") or default)


def _parent_sites() -> list[str]:
    paths = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        paths.append(site.getusersitepackages())
    return [p for p in paths if os.path.isdir(p)]


def _marker() -> str:
    import torch

    return json.dumps(
        {
            "deepspeed": DEEPSPEED_SPEC,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "parent_sites": _parent_sites(),
            "version": 1,
        },
        sort_keys=True,
    )


def _run(cmd: list[str], log: list[str], **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    log.append(f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        raise DeepSpeedUnavailable("\n".join(log[-2:]))


def _build(venv: Path) -> None:
    import torch

    log: list[str] = []
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", str(venv)], log, timeout=600)
    (venv / BUILT).touch()  # ours from here on: a later call may delete and rebuild it
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the test interpreter's packages after the venv's own; addsitedir also reads their .pth files (editable installs)
    lines = [f"import site; site.addsitedir({p!r})" for p in _parent_sites()]
    Path(purelib, "orpo_plugin_parent_site.pth").write_text("\n".join(lines) + "\n")
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    env = {**os.environ, "DS_BUILD_OPS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), DEEPSPEED_SPEC]
    _run(pip, log, env=env, timeout=1800)
    probe = "import deepspeed, torch, transformers, accelerate; print(deepspeed.__version__, torch.__version__)"
    _run([str(python), "-c", probe], log, env={**env, "DS_ACCELERATOR": "cpu"}, timeout=600)


def deepspeed_python() -> Path:
    """The venv's python (built on first use); DeepSpeedUnavailable says why not."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    want = _marker()
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        marker = venv / MARKER
        if not (marker.exists() and marker.read_text() == want):
            if venv.exists() and not (venv / BUILT).exists():
                raise DeepSpeedUnavailable(
                    f"{venv} exists and was not built by this helper; remove it or set ORPO_DEEPSPEED_VENV elsewhere"
                )
            _build(venv)
            marker.write_text(want)  # last, so a venv with a marker is complete
    return venv / "bin" / "python"


if __name__ == "__main__":
    print(deepspeed_python())
