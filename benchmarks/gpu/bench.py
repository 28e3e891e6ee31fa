"""A user's QLoRA run on one consumer-sized GPU: TRL's ORPOTrainer against ours, real tokens/s, memory, pad and MFU.

    python benchmarks/gpu/bench.py OUT_DIR             # CUDA: Llama-3-8B shapes, bf16 (run through run.sh)
    python benchmarks/gpu/bench.py OUT_DIR --dry-run   # the same code on CPU at tiny sizes, float32, no memory cap

The run, as a user with a 24 GB card would set it up (configs/trl/llama-3-8b-qlora-orpo.yaml):
- Llama-3-8B shapes with random weights (written once as a checkpoint), nf4 + double quantization, LoRA r=16 on every
  linear layer, bf16, gradient checkpointing (non-reentrant), the config's optimizer (paged 8-bit AdamW; the dry run
  uses torch's AdamW, bitsandbytes' paged optimizers need CUDA), chunked loss, max_length 2,048.
- Lengths (LENGTHS): log-normal prompt, chosen and rejected lengths in tokens, drawn independently. The medians follow
  what UltraFeedback-style preference sets show (prompt about 130 tokens, responses about 300); the sigmas give
  the long tail of such sets. They are the issue's stated figures, not measured on the dataset here (no network).
  Draws are capped so that prompt + response <= max_length (no pair is truncated by either trainer); the realised
  token lengths are measured after tokenization and printed.
- Every method runs under torch.cuda.set_per_process_memory_fraction equal to 24 GiB (a consumer card emulated).
- Methods: TRL's ORPOTrainer at the config's micro-batch; ours padded at the same micro-batch; packing (rows of
  packing_max_tokens, the config's 8,192); packing + prefix sharing; packing + Liger kernels where liger_kernel
  imports (with a one-step difference against packing in bf16; the verdict on Liger's exactness, against float32,
  is liger_parity.py's), last and twice in a row: Liger patches the model in place, so every other method runs
  before it.
- Each method: a fresh adapter, WARMUP untimed steps, then timed optimizer steps; every method measured REPEATS
  times, alternating (A B C D A B C D), spread printed. A per-measurement time guard stops a measurement early (after
  at least 2 timed steps) so the whole call fits (the table says how many steps each timed).
- Columns: real tokens/s (2 x prompt + chosen + rejected per pair, the tokens a padded batch trains, whatever the
  layout) and the ratio to TRL; peak memory (torch.cuda.max_memory_allocated); pad fraction (computed positions
  that are padding); MFU = model FLOPs per real token x real tokens/s / the bf16 matmul rate measured in this run.
  Model FLOPs per token (`model_flops`): 4 x the linear layers' weights (forward 2N and the input-gradient
  backward 2N; the frozen 4-bit base has no weight gradient; LoRA's own FLOPs and checkpoint recomputation are not
  counted) plus attention, 3 x forward's 4 x layers x heads x head_dim x (causal context) per token, summed over the
  real sequences of the set.
- The long-pair ladder (LADDER): one pair of L tokens (2 x prompt + chosen + rejected: prompt L/8, responses 3L/8
  each) trained for one step by TRL,
  by ours (packing + prefix sharing) and by ours with activation_offloading; the largest L each trains under the
  cap; what has no time is skipped.
- Phases (`--parts`, in this order): main (the table), profile (profile_steps.py's table on the same loaded model),
  ladder, liger (last: its patches cannot be undone). Each later phase asked for keeps RESERVE_S seconds of the
  budget (`--budget`, ORPO_BENCH_BUDGET_S, 440 s); the main table gets the rest. The report is rewritten after
  every phase, so a call cut short still returns what it measured. The random checkpoint is written once per
  machine (`checkpoint_dir`) and reused by the next call on a warm machine. The two GPU calls:
      run.sh bench "$OUT" --parts main,profile
      ORPO_BENCH_BUDGET_S=220 run.sh bench "$OUT" --parts ladder,liger
  and Liger's exactness against float32 is a third script, liger_parity.py (run.sh liger).

The accumulation: by default 1 micro-batch per optimizer step (`--accumulation`), not the config's 4, so that 20
timed steps per measurement fit in one 8-minute call; the optimizer step of a LoRA adapter is a small part of a
step, and `--accumulation 4` gives the config exactly.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/common.py
sys.path.insert(0, HERE)  # proof.py's checkpoint and QLoRA helpers

import common  # noqa: E402
import proof  # noqa: E402
import torch  # noqa: E402

SHIPPED_CONFIG = os.path.join(os.path.dirname(os.path.dirname(HERE)), "configs/trl/llama-3-8b-qlora-orpo.yaml")
CAP_GIB = 24.0
# Log-normal lengths in tokens: (median, sigma); UltraFeedback-like (see the module docstring).
LENGTHS = dict(prompt=(130, 0.9), response=(300, 0.7))
LADDER = (2048, 4096, 8192, 16384, 32768)
METHODS = ("trl", "padded", "packing", "prefix_sharing")
# The script's time in seconds from its start: --budget, else ORPO_BENCH_BUDGET_S, else 440 (run.sh gives the
# script its budget + 20 s, and reads the same variable).
BUDGET_S = int(os.environ.get("ORPO_BENCH_BUDGET_S", "440"))
PARTS = ("main", "profile", "ladder", "liger")
# seconds kept, at the end of the budget, for each later phase when it is asked for (the main table gets the rest)
RESERVE_S = dict(profile=100, ladder=100, liger=70)
PROFILE_STEPS = 3


class Sizes:
    def __init__(self, dry: bool):
        self.dry = dry
        self.model = proof.Sizes(dry).qlora_model
        self.max_length = 64 if dry else 2048
        self.scale = self.max_length / 2048  # length draws scaled with max_length
        self.pairs = 12 if dry else 160
        self.vocab = 1024 if dry else 4096
        self.warmup = 1 if dry else 2
        self.steps = 2 if dry else 20
        self.repeats = 2
        self.ladder = (128,) if dry else LADDER
        self.budget_s = 10_000 if dry else BUDGET_S


def cap_memory(cuda: bool) -> str:
    """Cap this process at CAP_GIB of the GPU (a consumer card emulated); returns the device's description."""
    if not cuda:
        return "CPU dry run (tiny model, float32, no memory cap): NOT a speed figure"
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * 2**30 / total))
    return f"{torch.cuda.get_device_name(0)} capped at {CAP_GIB:g} GiB"


def model_config(sizes: Sizes):
    """The benchmark's Llama config (Llama-3-8B shapes on the GPU), positions for the longest ladder pair."""
    return proof.llama_config(sizes.model, max_positions=max(8192, 2 * max(LADDER)))


def checkpoint_dir(config, cuda: bool) -> str:
    """A random-weight checkpoint of `config`, written once per machine (under the temp dir, keyed by the config)
    and reused by later calls on the same machine (bench.py's parts, profile_steps.py)."""
    import hashlib
    import json

    key = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"orpo-bench-ckpt-{key}")
    done = os.path.join(path, "WRITTEN")
    if not os.path.exists(done):
        t0 = time.perf_counter()
        os.makedirs(path, exist_ok=True)
        proof.write_random_checkpoint(config, path, cuda)
        open(done, "w").close()
        log(f"random checkpoint written to {path} in {time.perf_counter() - t0:.0f}s")
    return path


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shipped_config() -> dict:
    """The training fields of the shipped 8B QLoRA config that the benchmark follows (a flat YAML: key: value)."""
    import yaml

    with open(SHIPPED_CONFIG) as f:
        return yaml.safe_load(f)


# ---- data ---------------------------------------------------------------------------------------------------------


def draw_tokens(rng: random.Random, spec: tuple[float, float], scale: float, cap: int) -> int:
    median, sigma = spec
    return max(1, min(cap, int(round(median * scale * math.exp(rng.gauss(0.0, sigma))))))


TEXT_SEED = 1  # the benchmark tokenizer's corpus seed (common.build_tokenizer(seed=1)): its words are whole tokens


def token_text(tok, maker, rng: random.Random, n_tokens: int) -> str:
    """Words of the tokenizer's own lexicon, cut at the end of the token that makes `n_tokens` tokens.

    (Words from another lexicon split into 2-3 tokens each, which made the realised lengths 2.5x the drawn ones.)
    """
    text = maker.text(rng, n_tokens + 8)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text[: enc["offset_mapping"][min(n_tokens, len(enc["input_ids"])) - 1][1]]


def make_rows(sizes: Sizes, tok, seed: int = 0) -> list[dict]:
    """Plain-text pairs whose parts have LENGTHS' log-normal lengths in the benchmark tokenizer's tokens."""
    maker, rng = common.TextMaker(TEXT_SEED), random.Random(seed + 11)
    margin = 8  # BOS/EOS and a token merged across a cut
    rows = []
    for _ in range(sizes.pairs):
        lp = draw_tokens(rng, LENGTHS["prompt"], sizes.scale, sizes.max_length // 2)
        room = sizes.max_length - lp - margin
        lc = draw_tokens(rng, LENGTHS["response"], sizes.scale, room)
        lr = draw_tokens(rng, LENGTHS["response"], sizes.scale, room)
        rows.append(
            {
                "prompt": token_text(tok, maker, rng, lp) + " ?",
                "chosen": " " + token_text(tok, maker, rng, lc),
                "rejected": " " + token_text(tok, maker, rng, lr),
            }
        )
    return rows


def length_stats(dataset) -> dict:
    """Realised token lengths of a prepared dataset (ours): median, 90th percentile and max per part."""
    out = {}
    for part in ("prompt", "chosen", "rejected"):
        lens = sorted(len(x) for x in dataset[f"{part}_input_ids"])
        out[part] = dict(median=lens[len(lens) // 2], p90=lens[int(0.9 * (len(lens) - 1))], max=lens[-1])
    pairs = [
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"])
    ]
    out["real_tokens"] = sum(pairs)
    out["attention_context"] = sum(
        n * (n + 1) // 2
        for p, c, r in zip(dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"])
        for n in (len(p) + len(c), len(p) + len(r))
    )
    return out


# ---- FLOPs and the matmul rate ------------------------------------------------------------------------------------


def model_flops(config, real_tokens: int, attention_context: int) -> float:
    """Model FLOPs of training once over a set: linear layers and attention (see the module docstring).

    `attention_context`: sum over the set's sequences of n(n+1)/2 (the keys causal queries see).
    """
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    linear = layers * (h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inter) + h * vocab
    # attention forward: QK^T and PV, 2 FLOPs per multiply-add each, per (query, visible key) and head dim
    attn_fwd = 4 * layers * heads * head_dim * attention_context
    return 4 * linear * real_tokens + 3 * attn_fwd


def matmul_rate(cuda: bool) -> float:
    """FLOP/s of a large square matmul in the run's dtype (bf16 on the GPU, float32 in the dry run)."""
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    proof.sync(cuda)
    reps = 50 if cuda else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    proof.sync(cuda)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ---- trainers -----------------------------------------------------------------------------------------------------


class Guard:
    """Stops a training after `steps` timed steps or past `deadline` (perf_counter seconds), whichever first; syncs
    the device at each step's end so a step's time is its own (the same for every method)."""

    def __init__(self, meter: common.StepMeter, steps: int, deadline: float, cuda: bool):
        self.meter, self.steps, self.deadline, self.cuda = meter, steps, deadline, cuda

    def callback(self):
        from transformers import TrainerCallback

        guard = self

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                proof.sync(guard.cuda)
                guard.meter.end_step()
                timed = guard.meter.step - guard.meter.warmup
                if timed >= guard.steps or (timed >= 2 and time.perf_counter() > guard.deadline):
                    control.should_training_stop = True

            def on_step_begin(self, args, state, control, **kw):
                guard.meter._t_begin = time.perf_counter()

        return _Cb()


def make_trainer(
    method, model, dataset, tok, sizes, cuda, out, max_steps, accumulation, callbacks=(), extra=None, micro_batch=None
):
    """A fresh trainer (and adapter) of `method` on `model`; on the GPU after freeing what the last one left."""
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    cfg = shipped_config()
    fields = dict(
        output_dir=out,
        learning_rate=float(cfg["learning_rate"]),
        max_length=sizes.max_length,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=dict(cfg["gradient_checkpointing_kwargs"]),
        seed=0,
        data_seed=0,
        bf16=cuda,
        use_cpu=not cuda,
        max_steps=max_steps,
        beta=float(cfg["beta"]),
        per_device_train_batch_size=micro_batch or int(cfg["per_device_train_batch_size"]),
        gradient_accumulation_steps=accumulation,
        optim=cfg["optim"] if cuda else "adamw_torch",
        max_grad_norm=float(cfg["max_grad_norm"]),
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    if method == "trl":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**fields)
    else:
        from orpo_plugin import ORPOConfig, ORPOTrainer

        layout = {}
        if method != "padded":
            layout = dict(packing=True, packing_max_tokens=int(cfg["packing_max_tokens"]) * sizes.max_length // 2048)
        if method == "prefix_sharing":
            layout["prefix_sharing"] = True
        args = ORPOConfig(
            chunked_loss=True, nll_on_prompt=bool(cfg["nll_on_prompt"]), **layout, **{**fields, **(extra or {})}
        )
    trainer = ORPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=proof.lora(),
        callbacks=list(callbacks),
    )
    common.silence_printer(trainer)
    return trainer


def measure(method, model, rows, tok, sizes, cuda, out, deadline, accumulation, extra=None, micro_batch=None):
    """One measurement: a fresh adapter, warm-up, timed steps. Returns (entry, the base model without the adapter)."""
    from datasets import Dataset

    meter = common.StepMeter(warmup=sizes.warmup, name=method)
    guard = Guard(meter, sizes.steps, deadline, cuda)
    base = method.split("+")[0]
    trainer_entry = {}
    trainer = None
    try:
        trainer = make_trainer(
            base,
            model,
            Dataset.from_list(rows),
            tok,
            sizes,
            cuda,
            out,
            max_steps=sizes.warmup + sizes.steps,
            accumulation=accumulation,
            callbacks=[guard.callback()],
            extra=extra,
            micro_batch=micro_batch,
        )
        trainer.__class__ = _metered_class(type(trainer), meter)
        meter.pending = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        for step, inputs in meter.pending:  # after the timed steps (see _metered_class)
            meter.step, saved = step, meter.step
            meter.count(inputs)
            meter.step = saved
        trainer_entry.update(meter.result())
        spread = meter.step_wall
        trainer_entry["step_s_min_max"] = (min(spread), max(spread)) if spread else None
        if cuda:
            trainer_entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if base != "trl":
            trainer_entry["attention"] = trainer.attention_override
    except Exception as err:  # noqa: BLE001 - reported in the table
        trainer_entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        traceback.print_exc()
    finally:
        if trainer is not None:
            try:
                model = trainer.model.unload()  # the base model without this run's adapter
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            trainer.accelerator.free_memory()
            del trainer
    return trainer_entry, model


COUNTED_KEYS = (
    "pred_pos",
    "input_ids",
    "real_tokens",
    "unshared_tokens",
    "num_pairs",
    "chosen_attention_mask",
    "rejected_attention_mask",
)


def _metered_class(cls, meter):
    """`cls` with get_batch_samples/training_step reporting to `meter` (common.metered without its step callback).

    Micro-batches are counted after training (`count_pending`): counting TRL's batches sums device masks, a device
    read that would otherwise add one synchronisation per micro-batch to TRL's timed steps.
    """

    class Metered(cls):
        def get_batch_samples(self, *args, **kwargs):
            meter.start_step()
            return super().get_batch_samples(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            meter.pending.append((meter.step, {k: inputs[k] for k in COUNTED_KEYS if k in inputs}))
            return super().training_step(model, inputs, *args, **kwargs)

    Metered.__name__ = cls.__name__
    return Metered


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def first_step_loss(method, model, rows, tok, sizes, cuda, out, extra=None):
    """Loss and gradient (flattened, float32) of one training step on a fresh, seeded adapter."""
    from datasets import Dataset

    trainer = make_trainer(
        method, model, Dataset.from_list(rows), tok, sizes, cuda, out, max_steps=1, accumulation=1, extra=extra
    )
    trainer.__class__ = proof.capture(type(trainer))
    trainer.train()
    loss, grads = trainer.captured
    model = trainer.model.unload()
    return (loss, grads), model


# ---- the ladder ---------------------------------------------------------------------------------------------------


def ladder_rows(length: int, tok, seed: int = 0) -> list[dict]:
    """One pair of about `length` tokens (2 x prompt + chosen + rejected): prompt length/8, responses 3 length/8."""
    maker, rng = common.TextMaker(TEXT_SEED), random.Random(seed)
    q = length // 8
    return [
        {
            "prompt": token_text(tok, maker, rng, q - 4) + " ?",
            "chosen": " " + token_text(tok, maker, rng, 3 * q - 4),
            "rejected": " " + token_text(tok, maker, rng, 3 * q - 4),
        }
    ]


def run_ladder(model, tok, sizes, cuda, out, deadline):
    """The longest pair each method trains one step on under the cap (None: not reached, 'skipped': no time)."""
    from datasets import Dataset

    methods = {
        "trl": ("trl", {}),
        "ours": ("prefix_sharing", {}),
        "ours+offloading": ("prefix_sharing", {"activation_offloading": True}),
    }
    result = {m: {} for m in methods}
    failed = set()
    for length in sizes.ladder:
        for name, (method, extra) in methods.items():
            if name in failed:
                result[name][length] = "not tried (a shorter pair failed)"
                continue
            if time.perf_counter() > deadline:
                result[name][length] = "skipped (time)"
                continue
            trainer = None
            t0 = time.perf_counter()
            try:
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()  # before the peak is reset (make_trainer frees again, harmlessly)
                    torch.cuda.reset_peak_memory_stats()
                local = Sizes(sizes.dry)
                local.max_length = length
                trainer = make_trainer(
                    method,
                    model,
                    Dataset.from_list(ladder_rows(length, tok)),
                    tok,
                    local,
                    cuda,
                    out,
                    max_steps=1,
                    accumulation=1,
                    extra=extra,
                )
                trainer.train()
                entry = {"status": "ok", "seconds": time.perf_counter() - t0}
                if cuda:
                    entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                entry = {"status": "OOM"}
                failed.add(name)
            except ValueError as err:  # refused at start (activation_offloading without an accelerator)
                entry = {"status": f"refused: {str(err).splitlines()[0][:120]}"}
                failed.add(name)
            except Exception as err:  # noqa: BLE001
                entry = {"status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"}
                failed.add(name)
                traceback.print_exc()
            finally:
                if trainer is not None:
                    try:
                        model = trainer.model.unload()
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()
                    trainer.accelerator.free_memory()
                    del trainer
            result[name][length] = entry
            log(f"ladder {name} {length}: {entry}")
    return result, model


# ---- the table ----------------------------------------------------------------------------------------------------


def summarise(results: dict, flops_per_token: float, rate: float) -> list[dict]:
    """Per method: median tokens/s over its measurements, the spread, and the other columns."""
    rows = []
    trl = [m["tokens_per_s"] for m in results.get("trl", []) if "tokens_per_s" in m]
    trl_tps = statistics.median(trl) if trl else None
    for method, runs in results.items():
        ok = [m for m in runs if "tokens_per_s" in m]
        errors = [m["error"] for m in runs if "error" in m]
        if not ok:
            rows.append(dict(method=method, error=errors[0] if errors else "did not run"))
            continue
        tps = [m["tokens_per_s"] for m in ok]
        med = statistics.median(tps)
        peaks = [m["peak_gib"] for m in ok if "peak_gib" in m]
        rows.append(
            dict(
                method=method,
                runs=len(ok),
                steps=[m["steps"] for m in ok],
                tokens_per_s=med,
                spread=(max(tps) - min(tps)) / med if med else float("nan"),
                runs_tps=tps,
                vs_trl=med / trl_tps if trl_tps else None,
                peak_gib=max(peaks) if peaks else None,
                micro_batch=f"{ok[0]['micro_batch']} x {ok[0]['accumulation']}" if "micro_batch" in ok[0] else None,
                oom_micro_batches=sorted({b for m in runs for b in m.get("oom_micro_batches", [])}, reverse=True),
                pad_fraction=statistics.mean(m["pad_fraction"] for m in ok),
                mfu=flops_per_token * med / rate if rate else None,
                attention=ok[0].get("attention"),
                error=errors[0] if errors else None,
            )
        )
    return rows


LABELS = {
    "trl": "TRL ORPOTrainer",
    "padded": "orpo_plugin padded",
    "packing": "orpo_plugin packing",
    "prefix_sharing": "orpo_plugin packing + prefix sharing",
    "packing+liger": "orpo_plugin packing + Liger",
}
COLUMNS = [
    "method",
    "micro-batch x accumulation",
    "runs x timed steps",
    "real tokens/s (median)",
    "spread",
    "vs TRL",
    "peak GiB",
    "pad fraction",
    "MFU",
]


def render(summary, meta: dict, cuda: bool) -> str:
    device = meta["device"]
    lines = [f"# User-shaped QLoRA run: {device}", "", meta["versions"], "", meta["setup"], ""]
    cells = []
    for r in summary:
        if r.get("tokens_per_s") is None:
            cells.append([LABELS.get(r["method"], r["method"]), "", f"error: {r.get('error')}"] + [""] * 6)
            continue
        cells.append(
            [
                LABELS.get(r["method"], r["method"]),
                (r["micro_batch"] or "") + (f" (OOM at {r['oom_micro_batches']})" if r["oom_micro_batches"] else ""),
                f"{r['runs']} x {'/'.join(str(s) for s in r['steps'])}",
                f"{r['tokens_per_s']:.0f}",
                f"{100 * r['spread']:.1f} %",
                "n/a" if r["vs_trl"] is None else f"{r['vs_trl']:.2f}x",
                "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
                f"{r['pad_fraction']:.3f}",
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
            ]
        )
    lines.append(common.table(COLUMNS, cells))
    if meta.get("liger_parity"):
        lines += ["", f"Liger parity (one step, packing with vs without Liger): {meta['liger_parity']}"]
    if meta.get("liger_refusal"):
        lines += ["", f"use_liger_kernel on this machine: {meta['liger_refusal']}"]
    if meta.get("profile"):
        lines += ["", f"The profile of this call is in {meta['profile']}."]
    if meta.get("ladder"):
        lines += ["", "Long-pair ladder (one training step of one pair of L tokens; peak GiB, or why not):", ""]
        lengths = sorted({k for v in meta["ladder"].values() for k in v})
        head = ["method"] + [str(n) for n in lengths]
        body = []
        for name, entries in meta["ladder"].items():
            row = [name]
            for n in lengths:
                e = entries.get(n, "")
                if isinstance(e, dict) and e.get("status") == "ok":
                    row.append(f"{e['peak_gib']:.1f}" if "peak_gib" in e else "ok")
                else:
                    row.append(e["status"] if isinstance(e, dict) else str(e))
            body.append(row)
        lines.append(common.table(head, body))
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------------------------


def _measure_plan(plan, results, model, rows, tok, sizes, cuda, work, end, accumulation, fit):
    """Measure each method of `plan` in turn, each given an equal share of the time left before `end`.

    `fit` maps a padded method to its micro-batch. TRL starts at the shipped config's; when it runs out of memory
    under the cap, it is halved (the accumulation doubled: the same pairs per optimizer step) until it fits, and our
    padded layout then runs at TRL's micro-batch (the same padded batches).
    """
    for i, method in enumerate(plan):
        share = (end - time.perf_counter()) / (len(plan) - i)
        extra = {"use_liger_kernel": True} if method == "packing+liger" else None
        ooms = []
        while True:
            mb = fit.get(method)
            acc = accumulation * (fit["shipped"] // mb) if mb else accumulation
            entry, model = measure(
                method,
                model,
                rows,
                tok,
                sizes,
                cuda,
                work,
                time.perf_counter() + share,
                acc,
                extra=extra,
                micro_batch=mb,
            )
            if method == "trl" and mb > 1 and entry.get("error", "").startswith("OutOfMemoryError"):
                ooms.append(mb)
                fit["trl"] = fit["padded"] = mb // 2
                log(f"trl: out of memory at micro-batch {mb} under the cap; trying {mb // 2}")
                continue
            break
        entry["micro_batch"], entry["accumulation"] = mb or fit["shipped"], acc
        if ooms:
            entry["oom_micro_batches"] = ooms
        log(f"{method}: { ({k: v for k, v in entry.items() if k != 'step_wall'}) }")
        results[method].append(entry)
    return model


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise SystemExit(f"--parts: {text!r}; choose from {', '.join(PARTS)} (comma-separated)")
    return [p for p in PARTS if p in parts]  # always in PARTS' order: Liger last (it patches the model for good)


def main(argv=None) -> int:
    start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes (float32, no memory cap)")
    p.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per optimizer step (the shipped config has 4; see the module docstring)",
    )
    p.add_argument(
        "--parts",
        default="main",
        help="comma-separated phases, run in this order: main (the table), profile (profile_steps.py's table on "
        "the same loaded model), ladder (the longest pair), liger (parity and speed of packing + Liger; last, its "
        "patches stay). Later phases keep RESERVE_S seconds of the budget; the main table gets the rest",
    )
    p.add_argument("--budget", type=float, default=None, help=f"seconds for the whole script (default {BUDGET_S})")
    opts = p.parse_args(argv)
    parts = parse_parts(opts.parts)
    cuda = not opts.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU version")
    logging.basicConfig(level=logging.WARNING)
    common.quiet_logs()
    os.makedirs(opts.out_dir, exist_ok=True)
    sizes = Sizes(opts.dry_run)
    budget = opts.budget if opts.budget is not None else sizes.budget_s
    deadline = start + budget
    import transformers
    from datasets import Dataset

    from orpo_plugin.data import prepare_dataset

    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, orpo_plugin "
        f"{common.library_revision()}, python {sys.version.split()[0]}"
    )
    log(f"{versions}; parts {parts}, budget {budget:.0f}s")
    device = cap_memory(cuda)
    rate = matmul_rate(cuda)
    log(f"matmul rate {rate / 1e12:.1f} TFLOP/s")
    tok = common.build_tokenizer(seed=1, vocab_size=sizes.vocab)
    rows = make_rows(sizes, tok)
    prepared, _ = prepare_dataset(Dataset.from_list(rows), tokenizer=tok, max_length=sizes.max_length, name="bench")
    stats = length_stats(prepared)
    log(f"lengths {stats}")
    config = model_config(sizes)
    flops_per_token = (
        model_flops(config.to_dict(), stats["real_tokens"], stats["attention_context"]) / stats["real_tokens"]
    )
    cfg = shipped_config()
    work = tempfile.mkdtemp(prefix="orpo-bench-")
    liger = "liger" in parts and (not cuda or liger_available())
    methods = (list(METHODS) if "main" in parts else []) + (["packing+liger"] if liger and cuda else [])
    results: dict[str, list] = {m: [] for m in methods}
    meta = dict(
        device=device,
        versions=versions,
        parts=parts,
        lengths=stats,
        matmul_flops=rate,
        flops_per_token=flops_per_token,
        accumulation=opts.accumulation,
    )
    if "liger" in parts and not liger:
        meta["liger_parity"] = "not run: liger_kernel does not import here (carry its wheel: benchmarks/gpu/wheels.sh)"
    elif "liger" in parts and not cuda:
        meta["liger_parity"] = "not run: use_liger_kernel is refused without a GPU (the dry run checks the refusal)"

    def phase_end(phase: str) -> float:
        """When `phase` must end: the deadline less the reserves of the phases asked for after it."""
        later = parts[parts.index(phase) + 1 :]
        return deadline - sum(RESERVE_S[q] for q in later if q in RESERVE_S)

    def report() -> list[dict]:  # after every phase, so a call cut short still returns what it measured
        meta["setup"] = setup_text(sizes, cfg, opts.accumulation, stats, rate, flops_per_token, cuda, start)
        summary = summarise(results, flops_per_token, rate)
        text = render(summary, meta, cuda)
        common.write_report(opts.out_dir, "bench", text, dict(meta=meta, cuda=cuda, summary=summary, results=results))
        return summary

    shipped = int(cfg["per_device_train_batch_size"])
    fit = {"shipped": shipped, "trl": shipped, "padded": shipped}  # micro-batches of the padded methods
    meta["micro_batch"] = fit
    t0 = time.perf_counter()
    model = proof.load_qlora_base(checkpoint_dir(config, cuda), cuda)
    log(f"checkpoint ready and loaded in nf4 in {time.perf_counter() - t0:.0f}s")
    if "main" in parts:
        # methods alternating, each measured `repeats` times, each measurement with a time guard
        plan = [m for _ in range(sizes.repeats) for m in METHODS]
        model = _measure_plan(
            plan, results, model, rows, tok, sizes, cuda, work, phase_end("main"), opts.accumulation, fit
        )
        report()
    if "profile" in parts:
        import profile_steps

        steps = 2 if not cuda else PROFILE_STEPS
        profiled, model = profile_steps.profile_methods(model, rows, tok, sizes, cuda, work, steps, micro_batch=fit)
        pdevice = device if cuda else profile_steps.CPU_LABEL
        profile_steps.write(opts.out_dir, profiled, sizes, steps, pdevice, cuda)
        meta["profile"] = "PROFILE.md"
    if "ladder" in parts:
        meta["ladder"], model = run_ladder(model, tok, sizes, cuda, work, phase_end("ladder"))
        report()
    if "liger" in parts and not cuda:
        meta["liger_refusal"] = liger_refusal(model, rows, tok, sizes, work)
    elif liger:
        try:
            ref, model = first_step_loss("packing", model, rows, tok, sizes, cuda, work)  # before any patch
            lig, model = first_step_loss(
                "packing", model, rows, tok, sizes, cuda, work, extra={"use_liger_kernel": True}
            )
            loss_rel, grad_rel = proof.compare(lig, ref)
            meta["liger_parity"] = (
                f"loss rel. diff {loss_rel:.2e}, grad rel. diff {grad_rel:.2e} against packing without Liger, both "
                "bf16; measured after the other phases, twice in a row (its patches cannot be undone in-process). "
                "Not a verdict at 8B: two bf16 runs also differ by bf16 rounding; liger_parity.py (run.sh liger) "
                "compares each with the step in float32"
            )
        except Exception as err:  # noqa: BLE001
            meta["liger_parity"] = f"error: {type(err).__name__}: {err}"
            traceback.print_exc()
        plan = ["packing+liger"] * sizes.repeats
        model = _measure_plan(plan, results, model, rows, tok, sizes, cuda, work, deadline, opts.accumulation, fit)
    summary = report()
    return 1 if any(r.get("error") for r in summary) else 0


def liger_refusal(model, rows, tok, sizes, work) -> str:
    """On a CPU: the start-up refusal of use_liger_kernel, as the trainer words it."""
    from datasets import Dataset

    try:
        make_trainer(
            "packing", model, Dataset.from_list(rows), tok, sizes, False, work, 1, 1, extra={"use_liger_kernel": True}
        )
    except Exception as err:  # noqa: BLE001
        return f"refused: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return "NOT refused"


def setup_text(sizes, cfg, accumulation, stats, rate, flops_per_token, cuda, start) -> str:
    return (
        f"Llama-3-8B shapes {sizes.model}"
        + (" (dry run: tiny shapes)" if not cuda else "")
        + f", random weights, nf4 + double quantization, LoRA r=16 all linear, gradient checkpointing, "
        f"{'bf16' if cuda else 'float32'}, optimizer {cfg['optim'] if cuda else 'adamw_torch (dry run)'}, "
        f"micro-batch {cfg['per_device_train_batch_size']} pairs for the padded methods (halved for TRL, and ours "
        "padded with it, while TRL runs out of memory under the cap: the column), packing rows of "
        f"{int(cfg['packing_max_tokens']) * sizes.max_length // 2048} tokens, accumulation {accumulation}. "
        f"{sizes.pairs} pairs, log-normal lengths in tokens {LENGTHS} (x{sizes.scale:g}), capped by max_length "
        f"{sizes.max_length}; realised lengths {stats}. Each method: {sizes.warmup} warm-up steps then up to "
        f"{sizes.steps} timed steps, measured {sizes.repeats} times alternating; spread = (max - min) / median of "
        f"the runs' tokens/s. MFU over a measured matmul rate of {rate / 1e12:.2f} TFLOP/s, model FLOPs "
        f"{flops_per_token / 1e9:.2f} GFLOP per real token. Total {time.perf_counter() - start:.0f}s so far."
    )


if __name__ == "__main__":
    raise SystemExit(main())
