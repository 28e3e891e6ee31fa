"""Where a training step's time goes, per method: torch.profiler over a few steps of bench.py's run, as one table.

    python benchmarks/gpu/profile_steps.py OUT_DIR           # CUDA: Llama-3-8B shapes, bf16, 24 GiB cap (run.sh profile)
    python benchmarks/gpu/profile_steps.py OUT_DIR --dry-run # the same code on CPU at tiny sizes (CPU op times)

Methods: TRL's ORPOTrainer, ours padded, ours packing, set up exactly as in bench.py (same pairs, model, adapter,
optimizer). Each: WARMUP untimed steps, then STEPS steps under torch.profiler. The time of the profiled steps is
split by classifying what ran (`classify`):
- on the GPU, kernels by name, their busy time as the union of kernel intervals; what is left of the wall time is
  "host-side work and idle gaps" (the device waiting for the host: Python, launches, synchronisations, collation);
- in the dry run, CPU operators by name (self time), the rest of the wall time being Python and framework work.
Categories: 4-bit dequantization, matmuls (the output layer's included), attention, the loss head (softmax,
log-softmax, gathers and scatters of the loss), optimizer (and gradient clipping), other kernels (element-wise,
norms, copies), host-side/idle. "device reads / step" counts what makes the host wait for the device:
`aten::_local_scalar_dense` (`.item()`, `int()` of a tensor), `aten::nonzero`, and on the GPU device-to-host copies
and stream/device synchronisations.

(Named profile_steps.py, not profile.py: a script's folder comes first on sys.path, and a profile.py there would
shadow the standard library's `profile`, which transformers' imports reach through cProfile.)

Names are matched by substrings, so a category is approximate where a kernel's name says little; the classifier's
unknown names fall under "other kernels" and the 12 longest are listed in profile.json for a reader to check.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
import common  # noqa: E402
import proof  # noqa: E402
import torch  # noqa: E402

METHODS = ("trl", "padded", "packing")
CPU_LABEL = "CPU dry run (tiny model, float32): CPU operator times, NOT a GPU profile"
CATEGORIES = ("4-bit dequant", "matmul", "attention", "loss head", "optimizer", "other kernels", "host-side / idle")
# substrings of kernel/operator names (lower case), first match wins
RULES = (
    ("optimizer", ("adam", "optimizer", "optim", "multi_tensor", "_foreach", "clip_grad", "l2norm")),
    ("4-bit dequant", ("dequant", "kdequantize", "bitsandbytes", "bnb", "4bit", "nf4", "gemv_4bit")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "varlen", "flex")),
    (
        "loss head",
        (
            "log_softmax",
            "logsoftmax",
            "softmax",
            "logsumexp",
            "cross_entropy",
            "nll_loss",
            "gather",
            "scatter",
            "index_add",
            "index_select",
        ),
    ),
    (
        "matmul",
        (
            "gemm",
            "xmma",
            "cutlass",
            "nvjet",
            "cublas",
            "matmul",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
            "sm90",
            "sm80",
            "ampere",
            "hopper",
            "wgmma",
            "splitk",
        ),
    ),
)
SYNC_NAMES = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "cudastreamsynchronize",
    "cudadevicesynchronize",
    "cudaeventsynchronize",
    "memcpy dtoh",
    "memcpy d2h",
)


def classify(name: str) -> str:
    low = name.lower()
    for category, keys in RULES:
        if any(k in low for k in keys):
            return category
    return "other kernels"


def _union(intervals) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def reduce_profile(prof, wall_s: float, steps: int, cuda: bool) -> dict:
    """Seconds per step by category, device reads per step, and the longest unclassified names."""
    by = defaultdict(float)
    unknown = Counter()
    syncs = 0
    sync_names = Counter()
    intervals = []
    for e in prof.events():
        name = e.name
        low = name.lower()
        if any(s in low for s in SYNC_NAMES):
            syncs += 1
            sync_names[name] += 1
        is_kernel = e.device_type == torch.autograd.DeviceType.CUDA
        if cuda != is_kernel:
            continue
        if cuda:
            seconds = (e.time_range.end - e.time_range.start) / 1e6
            intervals.append((e.time_range.start, e.time_range.end))
        else:
            seconds = e.self_cpu_time_total / 1e6
        category = classify(name)
        by[category] += seconds
        if category == "other kernels":
            unknown[name] += seconds
    busy = _union(intervals) / 1e6 if cuda else sum(by.values())
    if cuda and sum(by.values()) > 0:  # overlapping kernels (streams): scale categories to the busy time
        scale = busy / sum(by.values())
        by = defaultdict(float, {k: v * scale for k, v in by.items()})
    by["host-side / idle"] = max(0.0, wall_s - busy)
    return dict(
        step_s=wall_s / steps,
        seconds_per_step={c: by[c] / steps for c in CATEGORIES},
        share={c: by[c] / wall_s for c in CATEGORIES},
        device_reads_per_step=syncs / steps,
        device_reads_by_name={n: c / steps for n, c in sync_names.most_common(8)},
        unknown=[(n, s / steps) for n, s in unknown.most_common(12)],
    )


def profile_method(method, model, rows, tok, sizes, cuda, out, warmup: int, steps: int, micro_batch=None):
    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    state = {}

    class Window(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == warmup:
                proof.sync(cuda)
                state["prof"] = profile(activities=activities)
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            if st.global_step == warmup + steps:
                proof.sync(cuda)
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)

    trainer = bench.make_trainer(
        method,
        model,
        Dataset.from_list(rows),
        tok,
        sizes,
        cuda,
        out,
        max_steps=warmup + steps,
        accumulation=1,
        callbacks=[Window()],
        micro_batch=micro_batch,
    )
    try:
        trainer.train()
        result = reduce_profile(state["prof"], state["wall"], steps, cuda)
    finally:
        if "prof" in state and "wall" not in state:  # failed inside the profiled window
            state["prof"].__exit__(None, None, None)
        model = trainer.model.unload()
        trainer.accelerator.free_memory()
        del trainer
    return result, model


def render(results: dict, meta: str, device: str) -> str:
    lines = [f"# Where a step's time goes: {device}", "", meta, ""]
    head = ["method", "micro-batch", "s / step"] + [f"{c} %" for c in CATEGORIES] + ["device reads / step"]
    rows = []
    for method, r in results.items():
        if "error" in r:
            rows.append([bench.LABELS[method], "", f"error: {r['error']}"] + [""] * (len(head) - 3))
            continue
        rows.append(
            [bench.LABELS[method], r.get("micro_batch", "rows"), f"{r['step_s']:.3f}"]
            + [f"{100 * r['share'][c]:.1f}" for c in CATEGORIES]
            + [f"{r['device_reads_per_step']:.1f}"]
        )
    lines.append(common.table(head, rows))
    reads = {m: r["device_reads_by_name"] for m, r in results.items() if r.get("device_reads_by_name")}
    if reads:
        lines += ["", "Device reads per step by name (the most frequent):", ""]
        lines += [
            f"- {bench.LABELS[m]}: " + ", ".join(f"{n} {c:.1f}" for n, c in by.items()) for m, by in reads.items()
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes (float32)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per method")
    opts = p.parse_args(argv)
    cuda = not opts.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU version")
    logging.basicConfig(level=logging.WARNING)
    common.quiet_logs()
    os.makedirs(opts.out_dir, exist_ok=True)
    sizes = bench.Sizes(opts.dry_run)
    device = bench.cap_memory(cuda)
    if not cuda:
        device = CPU_LABEL
    tok = common.build_tokenizer(seed=1, vocab_size=sizes.vocab)
    rows = bench.make_rows(sizes, tok)
    config = bench.model_config(sizes)
    work = tempfile.mkdtemp(prefix="orpo-profile-")
    path = bench.checkpoint_dir(config, cuda)
    model = proof.load_qlora_base(path, cuda)
    results, model = profile_methods(model, rows, tok, sizes, cuda, work, opts.steps)
    write(opts.out_dir, results, sizes, opts.steps, device, cuda)
    return 1 if any("error" in r for r in results.values()) else 0


def profile_methods(model, rows, tok, sizes, cuda, work, steps: int, methods=METHODS, micro_batch=None):
    """Profile each method in turn on `model` (a loaded QLoRA base); returns (results, the base model).

    `micro_batch` maps the padded methods to their micro-batch (bench.py's `fit`); without it TRL starts at the
    shipped config's and is halved while it runs out of memory, and ours padded follows TRL's.
    """
    fit = micro_batch if micro_batch is not None else {}
    fit.setdefault("shipped", int(bench.shipped_config()["per_device_train_batch_size"]))
    results = {}
    for method in methods:
        while True:
            mb = fit.get(method, fit["shipped"]) if method in ("trl", "padded") else None
            try:
                results[method], model = profile_method(
                    method, model, rows, tok, sizes, cuda, work, warmup=sizes.warmup, steps=steps, micro_batch=mb
                )
                if mb:
                    results[method]["micro_batch"] = mb
            except torch.OutOfMemoryError:
                if method == "trl" and mb > 1:
                    fit["trl"] = fit["padded"] = mb // 2
                    bench.log(f"profile trl: out of memory at micro-batch {mb}; trying {mb // 2}")
                    continue
                results[method] = {"error": f"OutOfMemoryError at micro-batch {mb}"}
            except Exception as err:  # noqa: BLE001 - reported in the table
                results[method] = {
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                }
                traceback.print_exc()
            break
        bench.log(f"profile {method}: {results[method]}")
    return results, model


def write(out_dir: str, results: dict, sizes, steps: int, device: str, cuda: bool) -> None:
    """PROFILE.md and profile.json in `out_dir`."""
    meta = (
        f"{common.library_revision()}, torch {torch.__version__}; bench.py's setup ({sizes.pairs} pairs, "
        f"max_length {sizes.max_length}, micro-batch of the shipped config or, for the padded methods, the largest that fit TRL under the cap (column), accumulation 1); {sizes.warmup} "
        f"warm-up steps, then {steps} profiled steps per method. Shares of the profiled steps' wall time."
    )
    text = render(results, meta, device)
    common.write_report(out_dir, "profile", text, dict(cuda=cuda, device=device, results=results))


if __name__ == "__main__":
    raise SystemExit(main())
