"""Training throughput in REAL (non-pad) tokens per second: TRL's ORPOTrainer vs orpo_plugin's layouts, on CPU.

    python benchmarks/throughput.py                      # TRL vs ours: padded, padding_free, packing
    python benchmarks/throughput.py --set prompt-heavy   # packing vs packing + prefix_sharing
    python benchmarks/throughput.py --gradient-checkpointing off   # the same with checkpointing off for everyone
    python benchmarks/throughput.py --model smollm2      # pretrained SmolLM2-135M-Instruct, conversational pairs:
                                                         # TRL vs packing vs packing + prefix_sharing

Gradient checkpointing is on by default for every method, TRL included: it is the default of both trainers'
configs (TRL's `gradient_checkpointing=True`, with transformers' default kwargs, i.e. non-reentrant
checkpointing) and what a 24 GB GPU run uses. `Trainer.train` turns it on in the model for both trainers, and
both trainers' constructors call `enable_input_require_grads`. Before timing, the script checks that it does not
time a broken path: for every method, one optimizer step with checkpointing on and one with it off on the same
fresh model and batch must give the same loss and gradients (`--no-check` skips this).

Every method trains the same random-init tiny Llama (a fresh copy built from the same seed for each run; with
`--model`, a fresh copy of the pretrained model) on the
same synthetic preference set (log-normal prompt/response lengths) for a fixed number of optimizer steps after
a few untimed warm-up steps. Real tokens are counted from the micro-batches each run actually trained on, the
same way for every method: 2*prompt + chosen + rejected per pair (prefix sharing computes the prompt once but
trains the same tokens). A step is timed from fetching its batch to the end of the optimizer step.

In one round every method trains once; by default the methods' trainers run side by side in threads that take
turns one optimizer step each (only one computes at a time), so bursts of load from other jobs on a shared
machine hit all methods alike; `--sequential` runs them one after the other instead. `--repeats` rounds (fresh
models, rotated order); the table shows medians, each ratio being the median of the per-round ratios against
the baseline of the same round.

`--model smollm2` trains the pretrained SmolLM2-135M-Instruct (`orpo_plugin.pretrained`, loaded offline) with its
real tokenizer on conversational rows (`--set chat`: message lists rendered by SmolLM2's ChatML template through
each trainer's own data path; lengths in common.CHAT_LENGTHS). TRL appends an EOS after ChatML's `<|im_end|>\n`
(orpo_plugin does not): the script checks that this is the only difference between the two tokenizations, and
TRL's real tokens include that extra EOS, since they are counted from its own batches. Its default run (4 pairs per
TRL batch, 1 warm-up + 2 timed steps, 3 rounds) takes 20-25 minutes on 2 shared cores and peaks at 16-18 GiB of
RAM (three trainers in one process, TRL's [8 x ~1,000 x 49,152] float32 logits); the script refuses to start when
its estimate exceeds the available RAM (`--force` overrides).

Packing budget: `packing_max_tokens` is calibrated so that a packed micro-batch holds, on average, as many real
tokens as TRL's batch of `--batch` pairs (8; 4 with SmolLM2). Prefix sharing keeps the same budget, which then
bounds the computed positions (a shared prompt once), so its micro-batches hold more pairs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 8  # pairs per micro-batch for the padded methods (TRL's setting in the issue); --batch changes it
REAL_MODELS = {"smollm2": "SmolLM2-135M-Instruct"}  # --model: orpo_plugin.pretrained checkpoints

METHODS = {
    # name: (trainer, our config fields)
    "trl": ("trl", {}),
    "padded": ("ours", {}),
    "padding_free": ("ours", {"padding_free": True}),
    "packing": ("ours", {"packing": True}),
    "packing+prefix_sharing": ("ours", {"packing": True, "prefix_sharing": True}),
}
DEFAULTS = {
    "mixed": dict(methods=["trl", "padded", "padding_free", "packing"], baseline="trl"),
    "prompt-heavy": dict(methods=["packing", "packing+prefix_sharing"], baseline="packing"),
    "chat": dict(methods=["trl", "packing", "packing+prefix_sharing"], baseline="trl"),
}
# --model smollm2's defaults: 20-25 minutes on 2 shared cores (a TRL step of 4 pairs took 21-79 s)
REAL_DEFAULTS = dict(length_set="chat", batch=4, pairs=200, max_length=1024, steps=2, warmup=1, repeats=3)


def pair_costs(dataset) -> list[int]:
    """2*prompt + chosen + rejected tokens of every prepared pair (what a padded or padding-free batch trains)."""
    return [
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"])
    ]


def calibrate_budget(costs: list[int], target_tokens: float, seed: int) -> tuple[int, dict]:
    """packing_max_tokens whose packed groups hold `target_tokens` real tokens on average (packing only the pairs'
    plain-layout cost, as `packing=True` does), never below the longest pair."""
    from orpo_plugin.packing import PackedBatchSampler

    budget = max(int(target_tokens), max(costs))
    for _ in range(8):
        stats = PackedBatchSampler(costs, budget, seed=seed).stats()
        new = max(int(round(budget * target_tokens / stats["mean_group_tokens"])), max(costs))
        if new == budget:
            break
        budget = new
    return budget, PackedBatchSampler(costs, budget, seed=seed).stats()


def check_same_tokenization(rows, tokenizer, ours, opts) -> str:
    """TRL and orpo_plugin must train the same tokens per pair, or tokens/s would not be comparable.

    The one difference allowed is TRL's: an EOS appended to a response that already ends with the chat template's
    end of turn (ChatML's `<|im_end|>\\n`). Returns a line saying how many responses got it.
    """
    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    probe = rows[:64]
    model = make_model(opts, tokenizer, probe=True)
    with tempfile.TemporaryDirectory() as out:
        args = ORPOConfig(output_dir=out, max_length=opts.max_length, **cpu_args(False, opts.batch))
        trl = ORPOTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(probe), processing_class=tokenizer
        )
    eos, extra = tokenizer.eos_token_id, 0
    for i in range(len(probe)):
        prompt = list(ours[i]["prompt_input_ids"])
        if list(trl.train_dataset[i]["prompt_input_ids"]) != prompt:
            raise SystemExit(f"TRL and orpo_plugin tokenize the prompt of pair {i} differently")
        for name in ("chosen", "rejected"):
            mine, theirs = prompt + list(ours[i][f"{name}_input_ids"]), list(trl.train_dataset[i][f"{name}_input_ids"])
            if theirs == mine:
                continue
            if theirs == mine + [eos] and mine[-1] != eos:
                extra += 1
                continue
            raise SystemExit(
                f"tokenization differs between TRL and orpo_plugin at pair {i} ({name}): "
                f"{len(theirs)} vs {len(mine)} tokens"
            )
    if not extra:
        return "TRL and orpo_plugin tokenize every probed pair identically"
    return (
        f"TRL and orpo_plugin tokenize every probed pair identically except for the EOS TRL appends after the "
        f"template's end of turn ({extra} of {2 * len(probe)} responses, one token each; counted in TRL's real tokens)"
    )


def make_model(opts, tokenizer, probe: bool = False):
    """The model every method trains: a fresh random-init tiny Llama (same seed for every method; `probe`: an even
    smaller one, for the tokenization check), or the pretrained checkpoint of `--model`."""
    if opts.model != "toy":
        return common.load_pretrained(opts.model, opts.layers, attn_implementation="sdpa")
    from orpo_plugin.toy import build_model

    hidden, layers, heads, seed = (64, 1, 2, 0) if probe else (opts.hidden, opts.layers, opts.heads, opts.seed)
    return build_model(
        len(tokenizer), hidden_size=hidden, num_layers=layers, num_heads=heads, seed=seed, attn_implementation="sdpa"
    )


def cpu_args(checkpointing: bool, batch: int) -> dict:
    return dict(
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=checkpointing,
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
    )


def build_trainer(
    method: str, rows, tokenizer, opts, budget: int, out: str, turns=None, steps=None, checkpointing=None, callbacks=()
):
    """A fresh model (same seed for every method) and a metered trainer for `method`. `steps` and `checkpointing`
    override the run's settings (`checkpointing`: None = `--gradient-checkpointing`)."""
    import datasets
    from transformers import TrainerCallback

    kind, fields = METHODS[method]
    meter = common.StepMeter(opts.warmup, method, turns)
    logs: list[dict] = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                kept.append(dict(logs))

    kept = logs
    steps = steps or opts.warmup + opts.steps
    if checkpointing is None:
        checkpointing = opts.gradient_checkpointing == "on"
    if kind == "trl":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    else:
        from orpo_plugin import ORPOConfig, ORPOTrainer

        if fields.get("packing"):
            fields = {**fields, "packing_max_tokens": budget}
    args = ORPOConfig(
        output_dir=out,
        max_length=opts.max_length,
        max_steps=steps,
        learning_rate=1e-4,
        seed=opts.seed,
        data_seed=opts.seed,
        logging_steps=steps,
        **cpu_args(checkpointing, opts.batch),
        **fields,
    )
    model = make_model(opts, tokenizer)
    trainer = common.metered(ORPOTrainer, meter)(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[meter.callback(), KeepLogs(), *callbacks],
    )
    common.silence_printer(trainer)
    return trainer, meter, logs


def check_memory(opts, methods, prepared, tokenizer) -> None:
    """Refuse a pretrained-model run that would not fit in the available RAM (unless --force).

    All of a round's trainers live in one process: per trainer float32 weights, AdamW's two states and gradients
    (16 bytes per parameter), plus TRL's step, whose [2 x batch x longest pair x vocab] float32 logits, their
    log-softmax and gradients take several times the logits, plus ~3 GiB for the rest (SmolLM2's default run:
    16.3-17.9 GiB peak RSS measured, 17 GiB estimated).
    """
    path = common.pretrained_path(opts.model)
    weights_gib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30  # float32, every layer
    longest = max(
        len(p) + max(len(c), len(r)) + 1
        for p, c, r in zip(prepared["prompt_input_ids"], prepared["chosen_input_ids"], prepared["rejected_input_ids"])
    )
    logits_gib = 2 * opts.batch * longest * len(tokenizer) * 4 / 2**30
    need = 3 + 4 * weights_gib * len(methods) + (6 * logits_gib if "trl" in methods else 0)
    avail = common.meminfo_gib("MemAvailable")
    print(f"memory: about {need:.0f} GiB at peak (estimate); " + (f"{avail:.0f} GiB available" if avail else ""))
    if avail is not None and need > 0.9 * avail and not opts.force:
        raise SystemExit(
            f"this run needs roughly {need:.0f} GiB and only {avail:.0f} GiB is available; lower --batch/--max-length, "
            "drop methods, or pass --force (an out-of-memory kill may hit other processes)"
        )


def check_checkpointing(methods: list[str], rows, tokenizer, opts, budget: int) -> None:
    """One optimizer step per method with checkpointing on and off (fresh model, same seed and batch): the loss and
    the gradients must agree, and the on-run's model must really checkpoint. Prints one line per method."""
    import torch
    from transformers import TrainerCallback

    class Grads(TrainerCallback):
        def __init__(self):
            self.flat, self.checkpointing = None, None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            params = [p for p in model.parameters() if p.grad is not None]
            self.flat = torch.cat([p.grad.detach().reshape(-1).double() for p in params])
            self.checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))

    print("checkpointing check (first optimizer step, checkpointing on vs off, same model and batch):")
    with tempfile.TemporaryDirectory() as out:
        for m in methods:
            got = {}
            for on in (True, False):
                grads = Grads()
                trainer, _, logs = build_trainer(
                    m, rows, tokenizer, opts, budget, f"{out}/{m}-{on}", steps=1, checkpointing=on, callbacks=[grads]
                )
                trainer.train()
                loss = next(entry["loss"] for entry in logs if "loss" in entry)
                got[on] = (loss, grads.flat, grads.checkpointing)
                del trainer
                gc.collect()
            (loss_on, g_on, ckpt_on), (loss_off, g_off, ckpt_off) = got[True], got[False]
            loss_diff = abs(loss_on - loss_off)
            grad_diff = float((g_on - g_off).abs().max() / g_off.abs().max())
            ok = ckpt_on and not ckpt_off and loss_diff <= 1e-5 * max(1.0, abs(loss_off)) and grad_diff <= 1e-5
            print(
                f"  {m:24s} loss on {loss_on:.7f} off {loss_off:.7f} (|diff| {loss_diff:.1e}); "
                f"max grad diff / max grad {grad_diff:.1e}; model checkpointing on={ckpt_on} off={ckpt_off}"
                + ("" if ok else "  MISMATCH"),
                flush=True,
            )
            if not ok:
                raise SystemExit(f"{m}: checkpointing changes the first step (or was not enabled); not timing it")


def run_round(order: list[str], rows, tokenizer, opts, budget: int) -> list[dict]:
    """Train every method once. Interleaved (default): all trainers run in threads taking turns, one optimizer
    step each; otherwise one method after the other."""
    results = []
    with tempfile.TemporaryDirectory() as out:
        if opts.sequential:
            built = []
            for m in order:
                trainer, meter, logs = build_trainer(m, rows, tokenizer, opts, budget, f"{out}/{m}")
                trainer.train()
                built.append((m, meter, logs))
                del trainer
                gc.collect()
        else:
            turns = common.Turns(order)
            built, jobs = [], []
            for m in order:
                trainer, meter, logs = build_trainer(m, rows, tokenizer, opts, budget, f"{out}/{m}", turns)
                built.append((m, meter, logs))
                jobs.append((m, trainer, meter))
            common.train_interleaved(jobs)
    for m, meter, logs in built:
        result = meter.result()
        result["method"] = m
        last = next((entry for entry in reversed(logs) if "loss" in entry), {})
        result["logged_padding_fraction"] = last.get("tokens/padding_fraction")
        result["logged_computed_per_trained"] = last.get("tokens/computed_per_trained")
        results.append(result)
    gc.collect()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=["toy", *REAL_MODELS],
        default="toy",
        help="toy: a random-init tiny Llama and a toy BPE (default); smollm2: the pretrained SmolLM2-135M-Instruct and "
        "its tokenizer (changes the defaults of --set, --batch, --pairs, --max-length, --steps, --warmup, --repeats: "
        f"{REAL_DEFAULTS})",
    )
    p.add_argument(
        "--set",
        dest="length_set",
        choices=[*sorted(common.LENGTH_SETS), "chat"],
        help="length mix: mixed (default), prompt-heavy (plain text, lengths in words), chat (conversational rows, "
        "lengths in tokens; needs a chat template: --model smollm2)",
    )
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="default: depends on --set")
    p.add_argument("--baseline", help="the method ratios are taken against (default: trl, or packing for prompt-heavy)")
    p.add_argument("--batch", type=int, help=f"pairs per micro-batch of TRL and our padded layouts (default {BATCH})")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (default 8)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps before timing (default 2)")
    p.add_argument("--repeats", type=int, help="rounds (every method once, fresh models); medians reported (default 3)")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the methods of a round one after the other instead of interleaving them step by step",
    )
    p.add_argument("--pairs", type=int, help="pairs in the synthetic dataset (default 600)")
    p.add_argument("--max-length", type=int, help="default 512")
    p.add_argument("--hidden", type=int, default=256, help="toy model only")
    p.add_argument(
        "--layers",
        type=int,
        help="toy model: its layers (default 4); a pretrained model: keep only its first layers "
        "(a smoke-test size; default all)",
    )
    p.add_argument("--heads", type=int, default=4, help="toy model only")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary of the toy tokenizer (= toy model vocab)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, help="packing_max_tokens (default: calibrated to TRL's real tokens per batch)")
    common.add_checkpointing_option(p)
    p.add_argument(
        "--no-check", action="store_true", help="skip the checkpointing on-vs-off first-step check before timing"
    )
    p.add_argument("--json", help="also write the per-run results here")
    p.add_argument(
        "--force", action="store_true", help="run even if the estimated memory exceeds available RAM (--model smollm2)"
    )
    opts = p.parse_args(argv)
    defaults = dict(length_set="mixed", batch=BATCH, pairs=600, max_length=512, steps=8, warmup=2, repeats=3)
    if opts.model != "toy":
        defaults.update(REAL_DEFAULTS)
    else:
        defaults["layers"] = 4
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.length_set == "chat" and opts.model == "toy":
        p.error("--set chat needs a tokenizer with a chat template: --model smollm2")
    methods = opts.methods or DEFAULTS[opts.length_set]["methods"]
    baseline = opts.baseline or DEFAULTS[opts.length_set]["baseline"]
    if baseline not in methods:
        p.error(f"the baseline {baseline!r} must be one of the methods run")

    import torch

    torch.set_num_threads(opts.threads)
    common.quiet_logs()
    from orpo_plugin.data import prepare_dataset

    t0 = time.perf_counter()
    if opts.model == "toy":
        maker = common.TextMaker(opts.seed)
        tokenizer = common.build_tokenizer(opts.seed, opts.vocab, maker)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(common.pretrained_path(opts.model))
        maker = None
    if opts.length_set == "chat":
        rows = common.make_chat_pairs(opts.pairs, tokenizer, opts.max_length, opts.seed)
    else:
        rows = common.make_pairs(opts.pairs, opts.length_set, opts.max_length, opts.seed, maker)
    prepared, prep_stats = prepare_dataset(rows, tokenizer, max_length=opts.max_length)
    if len(prepared) != len(rows):
        raise SystemExit(f"{len(rows) - len(prepared)} synthetic pairs were dropped; lower the lengths")
    costs = pair_costs(prepared)
    prompts = [len(x) for x in prepared["prompt_input_ids"]]
    responses = [len(x) for x in prepared["chosen_input_ids"]] + [len(x) for x in prepared["rejected_input_ids"]]
    target = opts.batch * statistics.fmean(costs)
    budget, pstats = (opts.budget, None) if opts.budget else calibrate_budget(costs, target, opts.seed)
    tokenization = None
    if any(k == "trl" for k in (METHODS[m][0] for m in methods)):
        tokenization = check_same_tokenization(rows, tokenizer, prepared, opts)

    print(f"# throughput, set={opts.length_set}: {common.versions()}; load average {os.getloadavg()[0]:.1f}")
    if opts.model == "toy":
        model_line = f"Llama hidden {opts.hidden}, {opts.layers} layers, {opts.heads} heads, vocab {len(tokenizer)}"
    else:
        config = common.pretrained_config(opts.model, opts.layers)
        full = common.pretrained_config(opts.model).num_hidden_layers
        model_line = f"{common.pretrained_line(REAL_MODELS[opts.model], config, full)}, its tokenizer and chat template"
    print(
        f"model: {model_line}; max_length {opts.max_length}; {opts.warmup} warm-up + {opts.steps} timed steps; "
        f"{opts.repeats} repeats; gradient checkpointing {opts.gradient_checkpointing} for every method"
    )

    def spread(xs):
        q = statistics.quantiles(xs, n=10)
        return f"p10 {q[0]:.0f}, median {statistics.median(xs):.0f}, p90 {q[-1]:.0f}, max {max(xs)}"

    print(
        f"data: {len(rows)} pairs; tokens per prompt {spread(prompts)}; per response {spread(responses)}; "
        f"{prep_stats.truncated_prompts + prep_stats.truncated_responses} truncated; "
        f"real tokens per {opts.batch} pairs {target:.0f}; packing_max_tokens {budget}"
        + (
            f" (packed groups: {pstats['mean_group_tokens']:.0f} tokens, {pstats['mean_pairs_per_group']:.1f} pairs on average)"
            if pstats
            else ""
        )
    )
    if tokenization:
        print(f"tokenization: {tokenization}")
    if opts.model != "toy":
        check_memory(opts, methods, prepared, tokenizer)

    if opts.gradient_checkpointing == "on" and not opts.no_check:
        check_checkpointing(methods, rows, tokenizer, opts, budget)

    runs: list[dict] = []
    for r in range(opts.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for res in run_round(order, rows, tokenizer, opts, budget):
            res["repeat"] = r
            runs.append(res)
            print(
                f"  repeat {r} {res['method']:24s} {res['tokens_per_s']:7.0f} real tok/s, "
                f"{res['tokens_per_cpu_s']:6.0f} per CPU-s ({res['trained']} tokens, {res['pairs']} pairs, "
                f"{res['seconds']:.1f}s, pad {res['pad_fraction']:.3f})",
                flush=True,
            )

    def ratio_cell(m, key):
        base = {x["repeat"]: x[key] for x in runs if x["method"] == baseline}
        ratios = [x[key] / base[x["repeat"]] for x in runs if x["method"] == m]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        return f"{common.median(ratios):.2f}x{spread}"

    rows_out = []
    for m in methods:
        mine = [x for x in runs if x["method"] == m]
        med = lambda key, mine=mine: common.median([x[key] for x in mine])  # noqa: E731
        rows_out.append(
            [
                m,
                f"{med('tokens_per_s'):,.0f}",
                ratio_cell(m, "tokens_per_s"),
                f"{med('tokens_per_cpu_s'):,.0f}",
                ratio_cell(m, "tokens_per_cpu_s"),
                f"{med('pad_fraction'):.3f}",
                f"{med('computed_per_trained'):.3f}",
                f"{common.median([x['pairs'] / x['steps'] for x in mine]):.1f}",
                f"{common.median([x['trained'] / x['steps'] for x in mine]):,.0f}",
                f"{common.median([1 - x['compute_s'] / x['seconds'] for x in mine]):.1%}",
            ]
        )
    print()
    print(
        common.table(
            [
                "method",
                "real tokens/s",
                f"ratio vs {baseline} (min-max)",
                "real tokens/CPU-s",
                f"CPU-time ratio vs {baseline} (min-max)",
                "pad fraction",
                "computed/trained",
                "pairs/step",
                "real tokens/step",
                "time fetching+collating",
            ],
            rows_out,
        )
    )
    print(
        "ratios: median over repeats of (method / baseline of the same repeat); CPU-s = the process's CPU time "
        "(all threads), less sensitive than wall time to other jobs on a shared machine"
    )
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f}s; load average at end {os.getloadavg()[0]:.1f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"opts": vars(opts), "budget": budget, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
