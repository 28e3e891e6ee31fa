"""Peak memory of one ORPO training step at a 128k vocabulary: TRL's ORPOTrainer vs ours (chunked / unchunked loss).

    python benchmarks/memory.py                    # 8 pairs x 256 tokens per sequence, vocab 128,256
    python benchmarks/memory.py --seq-len 512      # the issue's size; TRL then needs ~15 GB of RAM
    python benchmarks/memory.py --gradient-checkpointing off   # checkpointing off for every method
    python benchmarks/memory.py --fsdp2 --pairs 2  # 2 CPU processes, FSDP2: chunked vs full logits, per rank
    python benchmarks/memory.py --model gemma3     # pretrained Gemma 3 270M (vocab 262,144): TRL vs ours chunked,
                                                   # padded and packed; 2 pairs x 512 tokens per sequence

Gradient checkpointing is on by default for every method, TRL included (both trainers' config default, what a
24 GB GPU run uses; `Trainer.train` enables it in the model, non-reentrant by transformers' default). Every child
prints its first optimizer step's loss, so a run with `--gradient-checkpointing off` shows that checkpointing
changes no loss.

The model is a random-init Llama with a 128,256-row embedding and output layer but a small hidden size, so the
[tokens x vocab] logits dominate. The text comes from a small toy tokenizer: its ids are all < 128,256 and the
model simply has rows the data never uses, which changes nothing about memory. Every sequence is exactly
`--seq-len` tokens (prompt + response, truncated), so no method gains or loses anything from padding.

`--model gemma3` trains the pretrained Gemma 3 270M (`orpo_plugin.pretrained`, loaded offline; 18 layers, hidden
640, tied 262,144 x 640 embedding and output layer, sliding window 512) with its own tokenizer, a full fine-tune in
float32, on plain-text rows of common English words (common.ChatMaker) cut to exactly `--seq-len` tokens per
sequence. `ours_packing` packs each step's pairs into one row (chunked loss, as `ours_chunked`).

Memory phase: each method runs in its own fresh process (so no method's peak hides in another's high-water mark).
Reported (CPU): "step peak" = high-water RSS during the step - RSS just before it, i.e. what one steady-state
training step adds on top of what the process already holds (model, optimizer states, data). The measured step is
the SECOND optimizer step: the first creates AdamW's states, which then sit in every method's baseline alike. It
spans forward, backward, optimizer step and zero_grad. The high-water mark is reset right before the step (Linux
/proc/self/clear_refs "5"; without it the process's ru_maxrss is used, exact only if that step is the process's
peak), and the child's malloc returns every block >= 128 KiB to the system when it is freed
(MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors. The absolute process peak (ru_maxrss: imports, setup,
both steps) is reported too. On a GPU: torch.cuda.max_memory_allocated() during the step minus
torch.cuda.memory_allocated() before it.

--fsdp2: each method runs as 2 processes (gloo, CPU) under accelerate's FSDP2 plugin (decoder layers, the
[final norm, output layer] group and the root sharded; tests/distributed/fsdp_cpu.py turns FSDP on for CPU processes),
`--pairs` pairs per rank. `ours_chunked` computes the chunked loss inside the sharded forward (forward redirection);
`ours_model_logits` is the same sharded run with the model computing full logits inside its forward (what TRL does,
and what ORPOTrainer did under FSDP before). The reported step peak is the larger of the two ranks'.

Timing phase: one more process (default malloc) trains the `--timing-methods` side by side, taking turns one
optimizer step each (see common.Turns), and reports real tokens/s and the ratio to our unchunked path (target for
the chunked loss: >= 0.9x).
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
    "ours_model_logits": ("ours", {"chunked_loss": False}),  # the model computes full logits in its forward
    "ours_packing": ("ours", {"chunked_loss": True, "packing": True}),  # each step's pairs in one packed row
}
REAL_MODELS = {"gemma3": "Gemma 3 270M"}  # --model: orpo_plugin.pretrained checkpoints
# --model gemma3's defaults (measured process peaks: TRL about 11 GiB, ours about 6 GiB)
REAL_DEFAULTS = dict(methods=["trl", "ours_chunked", "ours_packing"], timing_methods=[], pairs=2, seq_len=512)
FSDP2_METHODS = ["ours_chunked", "ours_model_logits"]
FSDP2_CONFIG = {
    "fsdp_version": 2,
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "SHARDED_STATE_DICT",
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
                    else:
                        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    probe.result["peak_mib"] = peak
                    probe.result["step_peak_mib"] = peak - probe.result["before_mib"]
                probe.seen += 1

        return _Cb()


def make_rows(n: int, seq_len: int, seed: int, maker):
    """Rows whose prompt+response overflow `seq_len` tokens, so after truncation every sequence is exactly seq_len
    tokens long. `maker.text(rng, n)`: about n words (common.TextMaker) or n tokens (common.ChatMaker), both at
    least one token each."""
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


def model_and_tokenizer(opts):
    """The model every method trains and its tokenizer and text maker: the random-init toy Llama at VOCAB with a toy
    BPE, or `--model`'s pretrained checkpoint and tokenizer."""
    import common

    if opts.model == "toy":
        from orpo_plugin.toy import build_model

        maker = common.TextMaker(opts.seed)
        tokenizer = common.build_tokenizer(opts.seed, 1024, maker)
        model = build_model(
            VOCAB,
            hidden_size=opts.hidden,
            num_layers=opts.layers,
            num_heads=opts.heads,
            seed=opts.seed,
            max_position_embeddings=max(2048, opts.seq_len),
        )
        return model, tokenizer, maker
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.pretrained_path(opts.model))
    model = common.load_pretrained(opts.model, opts.layers)
    return model, tokenizer, common.ChatMaker(tokenizer, opts.seed)


def build_trainer(method: str, opts, steps: int, callbacks, meter, out: str, cuda: bool, losses=None):
    import common
    import datasets

    kind, fields = METHODS[method]
    model, tokenizer, maker = model_and_tokenizer(opts)
    rows = make_rows(opts.pairs * steps, opts.seq_len, opts.seed, maker)
    if fields.get("packing"):  # room for exactly one micro-batch's pairs: every sequence is seq_len tokens
        fields = {**fields, "packing_max_tokens": 2 * opts.pairs * opts.seq_len}
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
        gradient_checkpointing=opts.gradient_checkpointing == "on",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **({"fsdp": "full_shard auto_wrap", "fsdp_config": dict(FSDP2_CONFIG)} if opts.fsdp2 else {}),
        **fields,
    )
    trainer_cls = common.metered(ORPOTrainer, meter)
    if losses is not None:

        class Recording(trainer_cls):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                losses.append(float(loss))
                return loss

        trainer_cls = Recording
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[*callbacks, meter.callback()],
    )
    common.silence_printer(trainer)
    if method == "ours_model_logits":
        trainer.logits_in_forward, trainer.chunk_size = True, None
    return trainer


def _child_setup(opts):
    import torch

    if opts.fsdp2:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
        from fsdp_cpu import enable_fsdp_on_cpu

        enable_fsdp_on_cpu()

    torch.set_num_threads(opts.threads)
    import common

    common.quiet_logs()
    return torch.cuda.is_available() and not opts.cpu


def memory_child(opts) -> dict:
    import common

    cuda = _child_setup(opts)
    probe = MemoryProbe(1, cuda)  # step 0 creates the optimizer state; step 1 is measured
    meter = common.StepMeter(warmup=1)
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(opts.child, opts, 2, [probe.callback()], meter, out, cuda, losses)
        trainer.train()
        from orpo_plugin.sharded_head import unwrap

        checkpointing = bool(getattr(unwrap(trainer.model), "is_gradient_checkpointing", False))
        head = getattr(trainer, "head", None)  # ours only; TRL's trainer has no separate output head
        sharded = head is not None and type(head.module.weight).__name__ == "DTensor"
    return {
        "rank": int(os.environ.get("RANK", 0)),
        "head_sharded": sharded,
        "method": opts.child,
        "device": "cuda" if cuda else "cpu",
        **probe.result,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_step": meter.trained,
        "first_loss": losses[0],
        "checkpointing": checkpointing,
    }


def timing_child(opts) -> list[dict]:
    import common

    cuda = _child_setup(opts)
    methods = opts.timing_methods
    turns = common.Turns(methods)
    steps = 1 + opts.timed_steps
    meters, jobs = {}, []
    with tempfile.TemporaryDirectory() as out:
        for m in methods:
            meters[m] = common.StepMeter(1, m, turns)
            jobs.append((m, build_trainer(m, opts, steps, [], meters[m], f"{out}/{m}", cuda), meters[m]))
        common.train_interleaved(jobs)
    return [{"method": m, "device": "cuda" if cuda else "cpu", **meters[m].result()} for m in methods]


# ------------------------------------------------------------------------------------------------ parent side
def run_child(role: str, opts, malloc_env: bool):
    argv = [sys.executable, __file__, role]
    if opts.fsdp2:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            __file__,
            role,
            "--fsdp2",
        ]
    for k in ("model", "seq_len", "pairs", "hidden", "layers", "heads", "threads", "timed_steps", "seed"):
        if getattr(opts, k) is not None:
            argv += [f"--{k.replace('_', '-')}", str(getattr(opts, k))]
    argv += ["--timing-methods", *opts.timing_methods, "--gradient-checkpointing", opts.gradient_checkpointing]
    if opts.cpu:
        argv.append("--cpu")
    env = dict(os.environ)
    if opts.fsdp2:
        root = str(Path(__file__).resolve().parents[1])
        env.update(OMP_NUM_THREADS=str(opts.threads), PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))
    if malloc_env:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv += ["--result", f.name]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise SystemExit(f"{role}: child failed (exit {proc.returncode}):\n{tail}")
        if opts.fsdp2:  # one result per rank: report the rank with the larger step peak
            ranks = [json.loads(Path(f"{f.name}.rank{r}").read_text()) for r in range(2)]
            for r in range(2):
                Path(f"{f.name}.rank{r}").unlink()
            worst = max(ranks, key=lambda x: x["step_peak_mib"])
            worst["ranks"] = ranks
            return worst
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> int:
    import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=["toy", *REAL_MODELS],
        default="toy",
        help="toy: a random-init Llama at vocab 128,256 (default); gemma3: the pretrained Gemma 3 270M and its "
        f"tokenizer (vocab 262,144; changes the defaults: {REAL_DEFAULTS})",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="memory phase (default: trl ours_chunked ours_unchunked ours_model_logits)",
    )
    p.add_argument(
        "--timing-methods",
        nargs="*",
        choices=list(METHODS),
        help="timing phase (default: ours_chunked ours_unchunked; add trl to time it too: ~2x slower per step here); "
        "nothing: skip the phase",
    )
    p.add_argument("--seq-len", type=int, help="tokens of every sequence (prompt + one response; default 256)")
    p.add_argument("--pairs", type=int, help="pairs per micro-batch (2x sequences; default 8)")
    p.add_argument("--hidden", type=int, default=128, help="toy model only")
    p.add_argument(
        "--layers",
        type=int,
        help="toy model: its layers (default 2); a pretrained model: keep only its first layers "
        "(a smoke-test size; default all)",
    )
    p.add_argument("--heads", type=int, default=4, help="toy model only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timed-steps", type=int, default=4, help="timed steps per method in the timing phase")
    p.add_argument("--repeats", type=int, default=1, help="memory children per method; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    common.add_checkpointing_option(p)
    p.add_argument(
        "--fsdp2",
        action="store_true",
        help="2 CPU processes under FSDP2: ours_chunked vs ours_model_logits, peak per rank (no timing phase)",
    )
    p.add_argument("--json", help="also write the per-run results here")
    p.add_argument("--force", action="store_true", help="run even if TRL's estimated peak exceeds available RAM")
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("role", nargs="?", default="main", choices=["main", *METHODS, "timing"], help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    defaults = dict(
        methods=["trl", "ours_chunked", "ours_unchunked", "ours_model_logits"],
        timing_methods=["ours_chunked", "ours_unchunked"],
        pairs=8,
        seq_len=256,
    )
    if opts.model != "toy":
        defaults.update(REAL_DEFAULTS)
    else:
        defaults["layers"] = 2
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.fsdp2 and opts.model != "toy":
        p.error("--fsdp2 runs the toy model only")

    if opts.role == "timing":
        Path(opts.result).write_text(json.dumps(timing_child(opts)))
        return 0
    if opts.role != "main":
        opts.child = opts.role
        result = memory_child(opts)
        Path(f"{opts.result}.rank{result['rank']}" if opts.fsdp2 else opts.result).write_text(json.dumps(result))
        return 0
    if opts.fsdp2:
        if "--methods" not in (argv if argv is not None else sys.argv):
            opts.methods = list(FSDP2_METHODS)
        opts.timing_methods = []
        if set(opts.methods) - set(FSDP2_METHODS):
            raise SystemExit(f"--fsdp2 compares {FSDP2_METHODS}")

    if opts.model == "toy":
        vocab, base_gib = VOCAB, 1.2  # the process before the step: torch, model, AdamW state (~1 GiB)
        model_line = f"Llama vocab {VOCAB:,}, hidden {opts.hidden}, {opts.layers} layers"
    else:
        config = common.pretrained_config(opts.model, opts.layers)
        vocab = config.vocab_size
        path = common.pretrained_path(opts.model)
        weights_gib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30  # float32, every layer
        base_gib = 0.9 + 4 * weights_gib  # torch + weights, AdamW's two states, the gradients
        full = common.pretrained_config(opts.model).num_hidden_layers
        model_line = f"{common.pretrained_line(REAL_MODELS[opts.model], config, full)}, full fine-tune"
    logits_gib = 2 * opts.pairs * opts.seq_len * vocab * 4 / 2**30
    print(f"# memory: {common.versions().rsplit(', threads', 1)[0]}, threads {opts.threads}")
    print(
        f"model: {model_line}; batch {opts.pairs} pairs x 2 "
        f"sequences x {opts.seq_len} tokens (no padding); full float32 logits of the batch: {logits_gib:.2f} GiB; "
        f"load average at start {os.getloadavg()[0]:.1f}; gradient checkpointing {opts.gradient_checkpointing} for every method"
    )
    # rough step peaks measured at 256 tokens: TRL ~3.6x the logits, our unchunked path ~4.1x; the chunked loss holds
    # a few chunks of at most 512 MiB of logits
    factor = {"trl": 3.8, "ours_unchunked": 4.3, "ours_model_logits": 4.3}
    step_gib = {m: factor[m] * logits_gib if m in factor else 3 * min(logits_gib, 0.5) for m in METHODS}
    if opts.fsdp2:
        step_gib = {k: 2 * v for k, v in step_gib.items()}  # two processes
    need_gib = base_gib + max(step_gib[m] for m in set(opts.methods) | set(opts.timing_methods))
    avail_gib = common.meminfo_gib("MemAvailable")
    if avail_gib is not None and need_gib > 0.9 * avail_gib and not opts.force:
        raise SystemExit(
            f"the largest step here needs roughly {need_gib:.0f} GiB and only {avail_gib:.0f} GiB is available; "
            "lower --seq-len/--pairs, drop methods, or pass --force (an out-of-memory kill may hit other processes)"
        )
    t0 = time.perf_counter()
    runs = []
    for r in range(opts.repeats):
        for m in opts.methods:
            res = run_child(m, opts, malloc_env=True)
            res["repeat"] = r
            runs.append(res)
            print(
                f"  memory {m:15s} step peak {res['step_peak_mib']:8.0f} MiB  (RSS before {res['before_mib']:.0f}, "
                f"process peak {res['process_peak_mib']:.0f}); first-step loss {res['first_loss']:.7f}, "
                f"model checkpointing {res['checkpointing']}",
                flush=True,
            )
    timing = []
    if opts.timing_methods:
        timing = run_child("timing", opts, malloc_env=False)
        for res in timing:
            print(
                f"  timing {res['method']:15s} {res['tokens_per_s']:7.0f} real tok/s, {res['tokens_per_cpu_s']:6.0f} "
                f"per CPU-s ({res['trained']} tokens in {res['steps']} steps, {res['seconds']:.1f}s)",
                flush=True,
            )

    def med(m, key):
        return common.median([x[key] for x in runs if x["method"] == m])

    unit = "MiB" if runs[0]["device"] == "cpu" else "MiB (CUDA allocated)"
    rows = []
    for m in opts.methods:
        ref = "trl" if "trl" in opts.methods else ("ours_model_logits" if opts.fsdp2 else None)
        rows.append(
            [
                m,
                f"{med(m, 'step_peak_mib'):,.0f}",
                f"{med(m, 'step_peak_mib') / med(ref, 'step_peak_mib'):.3f}x" if ref else "-",
                f"{med(m, 'process_peak_mib'):,.0f}",
                f"{med(m, 'process_peak_mib') / med(ref, 'process_peak_mib'):.3f}x" if ref else "-",
                f"{med(m, 'tokens_per_step'):,.0f}",
                f"{med(m, 'first_loss'):.7f}",
            ]
        )
    print()
    vs = "vs ours_model_logits" if opts.fsdp2 else "vs trl"
    if opts.fsdp2:
        unit = "MiB per rank (max of 2)"
        print(
            "FSDP2, 2 processes; output layer sharded in every run: "
            f"{all(r['head_sharded'] for x in runs for r in x['ranks'])}"
        )
    print(
        common.table(
            [
                "method",
                f"step peak {unit}",
                vs,
                "process peak RSS MiB",
                vs,
                "real tokens in the step",
                "first-step loss",
            ],
            rows,
        )
    )
    if len({x["tokens_per_step"] for x in runs}) > 1:
        print("NOTE: the methods' measured steps trained different numbers of tokens")
    if timing:
        by = {x["method"]: x for x in timing}
        ref = by.get("ours_unchunked")
        trows = [
            [
                x["method"],
                f"{x['tokens_per_s']:,.0f}",
                f"{x['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-",
                f"{x['tokens_per_cpu_s']:,.0f}",
                f"{x['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}x" if ref else "-",
                f"{common.median(x['step_wall']):.1f}",
            ]
            for x in timing
        ]
        print()
        print(
            common.table(
                [
                    "method",
                    "real tokens/s",
                    "vs ours_unchunked",
                    "real tokens/CPU-s",
                    "vs ours_unchunked (CPU)",
                    "median step s",
                ],
                trows,
            )
        )
    print(
        f"\ndevice {runs[0]['device']}; load average at end {os.getloadavg()[0]:.1f}; wall {time.perf_counter() - t0:.0f}s"
    )
    if opts.json:
        Path(opts.json).write_text(json.dumps({"opts": vars(opts), "memory": runs, "timing": timing}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
