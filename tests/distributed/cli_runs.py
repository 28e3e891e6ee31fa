"""Run `orpo_plugin.cli train` several times in one (distributed) launch, to pay the start-up cost once.

    accelerate launch ... tests/distributed/cli_runs.py RUNS.json INFO.json

RUNS.json holds a list of argv lists, each passed to `orpo_plugin.cli.main(["train", *argv])` in turn. The main
process then writes INFO.json: the world size and the torch.distributed backend the runs used.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    import torch.distributed as dist

    from orpo_plugin import cli

    runs_path, info_path = sys.argv[1], sys.argv[2]
    with open(runs_path, encoding="utf-8") as f:
        runs = json.load(f)
    for argv in runs:
        rc = cli.main(["train", *argv])
        if rc:
            return rc
    initialized = dist.is_available() and dist.is_initialized()
    info = {
        "world_size": dist.get_world_size() if initialized else 1,
        "backend": dist.get_backend() if initialized else None,
    }
    if not initialized or dist.get_rank() == 0:
        with open(info_path, "w", encoding="utf-8") as f:
            json.dump(info, f)
    return 0


def main_and_exit() -> None:
    """Run `main()` and leave without interpreter finalization: with torch 2.13's gloo, a finished distributed worker
    sometimes aborts there ("terminate called without an active exception") after all its work is done and written."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
