"""Where each device read of a training step comes from, per trainer: the callers behind profile_steps.py's counts.

    python benchmarks/gpu/device_reads.py            # CPU, bench.py's dry-run sizes, TRL / ours padded / ours packing

A `TorchDispatchMode` records the caller (the innermost frame outside torch) of every `aten::_local_scalar_dense`
(`.item()`, `bool()`, `int()` of a tensor: on a GPU, a wait for the device) and `aten::nonzero` during 2 optimizer
steps after one warm-up step, at accumulation 1, and prints them per step. The callers are the same Python code on a
GPU; what differs there is the optimizer (bitsandbytes' 8-bit optimizer synchronises the device after each parameter,
torch's AdamW on a CPU reads its step count per parameter), so the optimizer's lines are labelled as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import bench  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _caller() -> str:
    frames = [f for f in traceback.extract_stack() if not f.filename.startswith(TORCH) and f.filename != __file__]
    if not frames:
        return "?"
    f = frames[-1]
    where = f.filename.split("site-packages" + os.sep)[-1].split(os.path.dirname(os.path.dirname(HERE)) + os.sep)[-1]
    return f"{where}:{f.lineno} {f.line}"


class Reads(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.counts[(func.__name__.split(".")[0], _caller())] += 1
        return func(*args, **(kwargs or {}))


def reads_per_step(method: str, rows, tok, sizes, steps: int = 2) -> Counter:
    from datasets import Dataset
    from transformers import TrainerCallback

    from orpo_plugin.toy import build_model

    counts, state = Counter(), {}

    class Window(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == 1:
                state["mode"] = Reads(counts)
                state["mode"].__enter__()

        def on_step_end(self, args, st, control, **kw):
            if st.global_step == 1 + steps:
                state["mode"].__exit__(None, None, None)

    model = build_model(sizes.vocab, hidden_size=64, num_layers=2)
    trainer = bench.make_trainer(
        method, model, Dataset.from_list(rows), tok, sizes, False, "/tmp/orpo-reads", 1 + steps, 1, [Window()]
    )
    trainer.train()
    return Counter({k: v / steps for k, v in counts.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["trl", "padded", "packing"], choices=bench.METHODS)
    opts = p.parse_args(argv)
    common.quiet_logs()
    sizes = bench.Sizes(dry=True)
    tok = common.build_tokenizer(seed=1, vocab_size=sizes.vocab)
    rows = bench.make_rows(sizes, tok)
    for method in opts.methods:
        counts = reads_per_step(method, rows, tok, sizes)
        print(f"\n{bench.LABELS[method]}: {sum(counts.values()):g} device reads per step")
        for (op, caller), n in counts.most_common():
            label = " (the optimizer)" if "optimizer" in caller else ""
            print(f"  {n:5g}  {op:20s} {caller[:150]}{label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
