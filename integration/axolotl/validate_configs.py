"""Validate Axolotl YAML configs with Axolotl's own validator, with orpo_plugin's plugin registered.

    python integration/axolotl/validate_configs.py configs/axolotl/*.yml     (in the Axolotl venv)

Runs Axolotl's `prepare_plugins` and `validate_config` (the schema merged with every listed plugin's pydantic
model) as `axolotl train` does, but with the capabilities of one 24 GB bf16 GPU supplied, so GPU configs validate
on a CPU-only machine; nothing is downloaded. Prints one JSON line per file: {"path", "ok", "error" | "orpo"}
and exits 1 if any file fails.
"""

from __future__ import annotations

import json
import sys

GPU_CAPABILITIES = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_89"}


def validate(path: str) -> dict:
    import torch
    import yaml
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    with open(path, encoding="utf-8") as f:
        cfg = DictDefault(yaml.safe_load(f))
    prepare_plugins(cfg)
    env = {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}
    try:
        out = validate_config(cfg, capabilities=dict(GPU_CAPABILITIES), env_capabilities=env)
    except Exception as err:  # the message is what the test checks
        return {"path": path, "ok": False, "error": f"{type(err).__name__}: {err}"}
    orpo = {k: out.get(k) for k in sorted(out) if k.startswith("orpo_")}
    rl = out.get("rl")
    return {"path": path, "ok": True, "rl": getattr(rl, "value", rl), "plugins": out.get("plugins"), "orpo": orpo}


def main(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        result = validate(path)
        failed += not result["ok"]
        print(json.dumps(result, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
