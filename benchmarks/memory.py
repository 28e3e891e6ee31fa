"""Peak memory of one ORPO training step at a 128k vocabulary: TRL's ORPOTrainer vs ours (chunked / unchunked loss).

    python benchmarks/memory.py                    # 8 pairs x 256 tokens per sequence, vocab 128,256
    python benchmarks/memory.py --seq-len 512      # the issue's size; TRL then needs ~15 GB of RAM

Each method runs in its own fresh process (so one method's peak can't hide in another's high-water mark). The
model is a random-init Llama with a 128,256-row embedding and output layer but a small hidden size, so the
[tokens x vocab] logits dominate. The text comes from a small toy tokenizer: its ids are all < 128,256 and the
model simply has rows the data never uses, which changes nothing about memory.

What is reported (CPU): the memory a steady-state training step adds on top of what the process already holds,
"step peak" = high-water RSS during the step - RSS just before it. The step is the SECOND optimizer step (the
first, untimed, creates AdamW's states, so they sit in the baseline of every method alike); it spans forward,
backward, optimizer step and zero_grad. The high-water mark is reset right before the step (Linux
/proc/self/clear_refs "5"); the child's malloc is told to return every block >= 128 KiB to the system on free
(MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors. The process's absolute peak (ru_maxrss: setup, both
steps, everything) is reported too. On a GPU the step peak is torch.cuda.max_memory_allocated() during the step
minus torch.cuda.memory_allocated() before it.

The child also times `--timed-steps` further steps, so the chunked loss's throughput can be compared with the
unchunked path's (target: >= 0.9x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = {
    "trl": ("trl", {}),
    "ours_chunked": ("ours", {"chunked_loss": True}),
    "ours_unchunked": ("ours", {"chunked_loss": False}),
}
VOCAB = 128_256  # Llama 3


# ------------------------------------------------------------------------------------------------ child side
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Measures the step with index `step` (0-based) from on_step_begin to on_step_end."""

    def __init__(self, step: int, cuda: bool):
        self.step_index, self.cuda = step, cuda
        self.seen = 0
        self.result: dict = {}

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if probe.seen != probe.step_index:
                    return
                if probe.cuda:
                    import torch

                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    probe.result["before_mib"] = torch.cuda.memory_allocated() / 2**20
                else:
                    probe.result["before_mib"] = _status_kib("VmRSS") / 1024
                    probe.result["hwm_reset"] = _reset_hwm()

            def on_step_end(self, args, state, control, **kw):
                if probe.seen == probe.step_index:
                    if probe.cuda:
                        import torch

                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() / 2**20
                    elif probe.result["hwm_reset"]:
                        peak = _status_kib("VmHWM") / 1024
                    else:  # no clear_refs: the process high-water mark, exact only if this step is the peak
                        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    probe.result["peak_mib"] = peak
                    probe.result["step_peak_mib"] = peak - probe.result["before_mib"]
                probe.seen += 1

        return _Cb()


def make_rows(n: int, seq_len: int, seed: int, maker):
    """Rows whose prompt+response overflow `seq_len` tokens, so after truncation every sequence is exactly seq_len
    tokens long (no padding anywhere: the comparison is about logits, not about padding)."""
    import random

    rng = random.Random(seed + 1)
    return [
        {
            "prompt": maker.text(rng, seq_len // 4) + " ?",
            "chosen": " " + maker.text(rng, seq_len),
            "rejected": " " + maker.text(rng, seq_len),
        }
        for _ in range(n)
    ]


def child(opts) -> dict:
    import torch

    torch.set_num_threads(opts.threads)
    import common

    common.quiet_logs()
    import datasets

    from orpo_plugin.toy import build_model

    cuda = torch.cuda.is_available() and not opts.cpu
    kind, fields = METHODS[opts.child]
    maker = common.TextMaker(opts.seed)
    tokenizer = common.build_tokenizer(opts.seed, 1024, maker)
    steps = 2 + opts.timed_steps  # step 0 warm-up (creates optimizer state), step 1 measured, then timed steps
    rows = make_rows(opts.pairs * steps, opts.seq_len, opts.seed, maker)
    model = build_model(
        VOCAB, hidden_size=opts.hidden, num_layers=opts.layers, num_heads=opts.heads, seed=opts.seed,
        max_position_embeddings=max(2048, opts.seq_len),
    )
    probe = MemoryProbe(1, cuda)
    meter = common.StepMeter(warmup=1)
    with tempfile.TemporaryDirectory() as out:
        if kind == "trl":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        else:
            from orpo_plugin import ORPOConfig, ORPOTrainer
        args = ORPOConfig(
            output_dir=out,
            max_length=opts.seq_len,
            per_device_train_batch_size=opts.pairs,
            max_steps=steps,
            learning_rate=1e-4,
            seed=opts.seed,
            bf16=False,
            use_cpu=not cuda,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            gradient_checkpointing=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **fields,
        )
        trainer = common.metered(ORPOTrainer, meter)(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[probe.callback(), meter.callback()],
        )
        common.silence_printer(trainer)
        trainer.train()
    timing = meter.result()
    return {
        "method": opts.child,
        "device": "cuda" if cuda else "cpu",
        **probe.result,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": timing["tokens_per_s"],
        "pad_fraction": timing["pad_fraction"],
        "tokens_per_step": timing["trained"] / timing["steps"],
        "timed_steps": timing["steps"],
        "seconds": timing["seconds"],
    }


# ------------------------------------------------------------------------------------------------ parent side
def _meminfo_gib(field: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run_child(method: str, opts) -> dict:
    argv = [sys.executable, __file__, "--child", method]
    for k in ("seq_len", "pairs", "hidden", "layers", "heads", "threads", "timed_steps", "seed"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(opts, k))]
    if opts.cpu:
        argv.append("--cpu")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv += ["--result", f.name]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise SystemExit(f"{method}: child failed (exit {proc.returncode}):\n{tail}")
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seq-len", type=int, default=256, help="tokens of every sequence (prompt + one response)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (2x sequences)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timed-steps", type=int, default=3, help="steps timed after the measured one (throughput)")
    p.add_argument("--repeats", type=int, default=1, help="child runs per method; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    p.add_argument("--json", help="also write the per-run results here")
    p.add_argument("--force", action="store_true", help="run even if TRL's estimated peak exceeds available RAM")
    p.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.child:
        Path(opts.result).write_text(json.dumps(child(opts)))
        return 0

    import common

    logits_gib = 2 * opts.pairs * opts.seq_len * VOCAB * 4 / 2**30
    print(f"# memory: {common.versions().rsplit(', threads', 1)[0]}, threads {opts.threads}")
    print(
        f"model: Llama vocab {VOCAB:,}, hidden {opts.hidden}, {opts.layers} layers; batch {opts.pairs} pairs x 2 "
        f"sequences x {opts.seq_len} tokens (no padding); full float32 logits of the batch: {logits_gib:.2f} GiB; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    need_gib = 1.5 + 4.5 * logits_gib  # rough TRL peak: logits, their copies/softmax and gradients, + fixed
    avail_gib = _meminfo_gib("MemAvailable")
    if "trl" in opts.methods and avail_gib is not None and need_gib > 0.9 * avail_gib and not opts.force:
        raise SystemExit(
            f"TRL's step needs roughly {need_gib:.0f} GiB here and only {avail_gib:.0f} GiB is available; lower "
            "--seq-len/--pairs or pass --force (an out-of-memory kill may hit other processes on this machine)"
        )
    t0 = time.perf_counter()
    runs = []
    for r in range(opts.repeats):
        for m in opts.methods:
            res = run_child(m, opts)
            res["repeat"] = r
            runs.append(res)
            print(
                f"  {m:15s} step peak {res['step_peak_mib']:8.0f} MiB  (before {res['before_mib']:.0f}, process peak "
                f"{res['process_peak_mib']:.0f}) {res['tokens_per_s']:7.0f} tok/s",
                flush=True,
            )

    def med(m, key):
        return common.median([x[key] for x in runs if x["method"] == m])

    ref = "trl" if "trl" in opts.methods else None
    rows = []
    for m in opts.methods:
        row = [m, f"{med(m, 'step_peak_mib'):,.0f}"]
        row.append(f"{med(m, 'step_peak_mib') / med(ref, 'step_peak_mib'):.3f}x" if ref else "-")
        row += [f"{med(m, 'process_peak_mib'):,.0f}"]
        row.append(f"{med(m, 'process_peak_mib') / med(ref, 'process_peak_mib'):.3f}x" if ref else "-")
        row.append(f"{med(m, 'tokens_per_s'):,.0f}")
        if "ours_unchunked" in opts.methods:
            row.append(f"{med(m, 'tokens_per_s') / med('ours_unchunked', 'tokens_per_s'):.2f}x")
        else:
            row.append("-")
        rows.append(row)
    unit = "MiB" if runs[0]["device"] == "cpu" else "MiB (CUDA allocated)"
    print()
    print(
        common.table(
            [
                "method",
                f"step peak {unit}",
                "vs trl",
                "process peak RSS MiB",
                "vs trl",
                "real tokens/s",
                "vs ours_unchunked",
            ],
            rows,
        )
    )
    print(f"\ndevice {runs[0]['device']}; load average at end {os.getloadavg()[0]:.1f}; wall {time.perf_counter() - t0:.0f}s")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"opts": vars(opts), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
