"""Is `use_liger_kernel` exact on the user-shaped QLoRA run? One training step's loss and LoRA gradients, bf16 with
and without Liger's kernels, each against a float32 reference of the same step.

    python benchmarks/gpu/liger_parity.py OUT_DIR             # CUDA: bench.py's 8B QLoRA model and pairs (run.sh liger)
    python benchmarks/gpu/liger_parity.py OUT_DIR --dry-run   # the same code on CPU at tiny sizes (Liger is refused)

Why a float32 reference: bench.py's parity check compares packing + Liger with packing, both in bf16. At 8B (32
layers, random weights, nf4) the two bf16 runs differ by bf16 rounding as well as by anything Liger gets wrong, and
one bf16 run alone cannot tell which. Here every variant is compared with the same step computed in float32 (nf4
weights dequantized to float32, float32 norms, embeddings and head): Liger is as exact as the plain bf16 run when its
error against float32 is about the plain bf16 run's error against float32.

Variants (VARIANTS), each in its own process (Liger patches transformers' modules in place; they cannot be undone):
fp32 (the reference), bf16 (packing, no Liger), liger (RMSNorm, RoPE and SwiGLU), and each of Liger's three kernels
alone. The step: bench.py's first packing micro-batch (rows of the shipped config's packing_max_tokens), seeded,
gradient checkpointing on, a fresh LoRA adapter (B = 0, so only B's gradients are non-zero in step one). The table
gives relative loss and L2 gradient differences, over all LoRA gradients and per projection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402
import common  # noqa: E402
import proof  # noqa: E402

LIGER_KERNELS = ("rms_norm", "rope", "swiglu")
VARIANTS = {
    # float32 attention: orpo_varlen (auto's pick on the GPU) runs in bf16/fp16 only; sdpa is exact in float32
    "fp32": dict(bf16=False, attention_backend="sdpa"),
    "bf16": {},
    "liger": dict(use_liger_kernel=True),
    **{
        f"liger:{kernel}": dict(use_liger_kernel=True, liger_kernel_config={k: k == kernel for k in LIGER_KERNELS})
        for kernel in LIGER_KERNELS
    },
}
# Liger is "as exact as bf16" when its gradient error against float32 is at most this multiple of plain bf16's.
AS_EXACT_RATIO = 1.25
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUDGET_S = 300


def run_variant(name: str, work: str, cuda: bool) -> None:
    """One variant's step in this process; writes WORK/NAME.pt ({"loss", "grads"}) or WORK/NAME.json (why not)."""
    import logging

    from orpo_plugin.data import prepare_dataset  # noqa: F401  (imports the package before Liger patches anything)

    logging.basicConfig(level=logging.WARNING)
    common.quiet_logs()
    if cuda and name != "fp32":  # the reference is not a memory figure: float32 activations need more than the cap
        bench.cap_memory(cuda)
    sizes = bench.Sizes(not cuda)
    tok = common.build_tokenizer(seed=1, vocab_size=sizes.vocab)
    rows = bench.make_rows(sizes, tok)
    dtype = torch.float32 if name == "fp32" else None
    model = proof.load_qlora_base(bench.checkpoint_dir(bench.model_config(sizes), cuda), cuda, dtype=dtype)
    extra = dict(VARIANTS[name])
    if not cuda and name == "bf16":
        extra["bf16"] = True  # the dry run's model is float32: bf16 autocast on CPU
    t0 = time.perf_counter()
    try:
        (loss, grads), _ = bench.first_step_loss("packing", model, rows, tok, sizes, cuda, work, extra=extra)
    except Exception as err:  # noqa: BLE001
        with open(os.path.join(work, f"{name}.json"), "w") as f:
            json.dump({"status": f"{type(err).__name__}: {str(err).splitlines()[0][:240]}"}, f)
        return
    torch.save({"loss": loss, "grads": {k: v.cpu() for k, v in grads.items()}}, os.path.join(work, f"{name}.pt"))
    bench.log(f"{name}: loss {loss:.6f}, {len(grads)} gradients, step {time.perf_counter() - t0:.1f}s")


def relative(grads: dict, ref: dict, keys) -> float:
    keys = list(keys)
    diff = math.sqrt(sum(float((grads[k] - ref[k]).pow(2).sum()) for k in keys))
    norm = math.sqrt(sum(float(ref[k].pow(2).sum()) for k in keys))
    return diff / max(norm, 1e-30)


def compare(results: dict) -> list[dict]:
    """One row per variant: loss and gradient differences against fp32 (and against bf16 for Liger's variants)."""
    ref, plain = results.get("fp32"), results.get("bf16")
    rows = []
    for name in [v for v in VARIANTS if v in results]:
        got = results.get(name)
        row = {"variant": name}
        if not isinstance(got, dict) or "grads" not in got:
            row["status"] = (got or {}).get("status", "did not run") if isinstance(got, dict) else "did not run"
            rows.append(row)
            continue
        row["status"] = "ok"
        row["loss"] = got["loss"]
        for label, base in (("fp32", ref), ("bf16", plain)):
            if base is None or "grads" not in base or (label == "bf16" and not name.startswith("liger")):
                continue
            if base is got:
                continue
            row[f"loss_vs_{label}"] = abs(got["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
            row[f"grad_vs_{label}"] = relative(got["grads"], base["grads"], got["grads"])
            if label == "fp32" and plain is not None and "grads" in plain and got is not plain:
                row["ratio_to_bf16"] = row["grad_vs_fp32"] / relative(plain["grads"], base["grads"], plain["grads"])
                if name.startswith("liger"):
                    row["verdict"] = (
                        "as exact as bf16" if row["ratio_to_bf16"] <= AS_EXACT_RATIO else "LESS EXACT than bf16"
                    )
            if label == "fp32":
                row["per_projection_vs_fp32"] = {
                    p: relative(got["grads"], base["grads"], [k for k in got["grads"] if f".{p}." in k])
                    for p in PROJECTIONS
                    if any(f".{p}." in k for k in got["grads"])
                }
        rows.append(row)
    return rows


def render(rows: list[dict], device: str, versions: str, seconds: float) -> str:
    fmt = lambda v: "" if v is None else f"{v:.2e}"  # noqa: E731
    table = common.table(
        [
            "variant",
            "status",
            "loss",
            "loss vs fp32",
            "grad vs fp32",
            "grad vs fp32 / bf16's",
            "verdict",
            "grad vs bf16",
        ]
        + [f"{p} vs fp32" for p in PROJECTIONS],
        [
            [
                r["variant"],
                r["status"][:90],
                "" if "loss" not in r else f"{r['loss']:.6f}",
                fmt(r.get("loss_vs_fp32")),
                fmt(r.get("grad_vs_fp32")),
                "" if "ratio_to_bf16" not in r else f"{r['ratio_to_bf16']:.2f}",
                r.get("verdict", ""),
                fmt(r.get("grad_vs_bf16")),
            ]
            + [fmt(r.get("per_projection_vs_fp32", {}).get(p)) for p in PROJECTIONS]
            for r in rows
        ],
    )
    return "\n".join(
        [
            f"# Liger parity on the user-shaped QLoRA step: {device}",
            "",
            versions,
            "",
            "One training step (bench.py's first packing micro-batch, gradient checkpointing, fresh LoRA adapter), "
            "each variant in its own process, against the same step in float32. `grad vs fp32 / bf16's`: the "
            f"variant's gradient error over plain bf16's (1.00: as exact as bf16 without Liger; verdict: <= "
            f"{AS_EXACT_RATIO:g}). {seconds:.0f}s.",
            "",
            table,
            "",
        ]
    )


def main(argv=None) -> int:
    start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes (Liger's variants are refused)")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant, in a child process
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order")
    p.add_argument("--budget", type=float, default=float(os.environ.get("ORPO_BENCH_BUDGET_S", BUDGET_S)))
    opts = p.parse_args(argv)
    cuda = not opts.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU version")
    if opts.variant:
        run_variant(opts.variant, opts.work, cuda)
        return 0
    import transformers

    os.makedirs(opts.out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="orpo-liger-")
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, orpo_plugin "
        f"{common.library_revision()}, python {sys.version.split()[0]}"
    )
    device = bench.cap_memory(cuda)
    results: dict[str, dict] = {}
    for name in opts.variants.split(","):
        left = opts.budget - (time.perf_counter() - start)
        if left < 20:
            results[name] = {"status": "skipped: no time left"}
            continue
        cmd = [sys.executable, os.path.abspath(__file__), opts.out_dir, "--variant", name, "--work", work]
        cmd += [] if cuda else ["--dry-run"]
        try:
            subprocess.run(cmd, check=True, timeout=left)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            results[name] = {"status": f"{type(err).__name__}"}
            continue
        pt, why = os.path.join(work, f"{name}.pt"), os.path.join(work, f"{name}.json")
        results[name] = torch.load(pt) if os.path.exists(pt) else json.load(open(why))
    rows = compare(results)
    text = render(rows, device, versions, time.perf_counter() - start)
    common.write_report(opts.out_dir, "liger", text, dict(device=device, versions=versions, rows=rows))
    ran = all(r["status"] == "ok" for r in rows if r["variant"] in ("fp32", "bf16"))
    return 0 if ran and not any(r.get("verdict", "").startswith("LESS") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
