"""Shared pieces of the benchmarks: synthetic preference text, tiny tokenizer/model, per-step timing and token counts.

Everything is built locally and deterministically from a seed; nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import threading
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")

# Length mixes, in words: (prompt median, prompt sigma, response median, response sigma) of log-normal draws.
LENGTH_SETS = {
    # chat-like: short-to-medium prompts, longer answers, a long tail (TRL pads every batch to its longest pair)
    "mixed": dict(prompt_median=60, prompt_sigma=0.7, response_median=90, response_sigma=0.6),
    # RAG/few-shot-like: the prompt is about twice as long as each response
    "prompt-heavy": dict(prompt_median=150, prompt_sigma=0.5, response_median=75, response_sigma=0.5),
}


def _words(rng: random.Random, n: int) -> list[str]:
    """`n` pronounceable pseudo-words (distinct), the benchmark's lexicon."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        syllables = rng.choice((1, 2, 2, 3))
        out.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(out)


class TextMaker:
    """Zipf-distributed pseudo-word sentences, so a small BPE maps most words to one token."""

    def __init__(self, seed: int = 0, lexicon: int = 1500):
        rng = random.Random(seed)
        self.words = _words(rng, lexicon)
        weights = [1.0 / (rank + 1) ** 1.05 for rank in range(lexicon)]
        total = sum(weights)
        self.cum = list(_accumulate([w / total for w in weights]))

    def text(self, rng: random.Random, n_words: int) -> str:
        idx = [_bisect(self.cum, rng.random()) for _ in range(n_words)]
        words = [self.words[i] for i in idx]
        # sentence-ish punctuation every ~12 words keeps the BPE realistic
        return " ".join(w + ("." if (k + 1) % 12 == 0 else "") for k, w in enumerate(words))

    def corpus(self, rng: random.Random, n: int = 400) -> list[str]:
        return [self.text(rng, 200) for _ in range(n)]


def _accumulate(xs):
    s = 0.0
    for x in xs:
        s += x
        yield s


def _bisect(cum, x):
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def lognormal_words(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, int(round(median * math.exp(rng.gauss(0.0, sigma))))))


def make_pairs(
    n: int,
    length_set: str,
    max_length: int,
    seed: int = 0,
    maker: TextMaker | None = None,
) -> list[dict[str, str]]:
    """`n` plain-text preference rows with independent log-normal prompt/chosen/rejected lengths (in words).

    Word counts are capped so a prompt stays well below `max_length` tokens; responses may still be truncated to
    `max_length` by the trainers (both truncate the same way: responses, never the prompt).
    """
    spec = LENGTH_SETS[length_set]
    maker = maker or TextMaker(seed)
    rng = random.Random(seed + 1)
    prompt_cap = int(0.6 * max_length)
    rows = []
    for _ in range(n):
        lp = lognormal_words(rng, spec["prompt_median"], spec["prompt_sigma"], prompt_cap)
        lc = lognormal_words(rng, spec["response_median"], spec["response_sigma"], max_length)
        lr = lognormal_words(rng, spec["response_median"], spec["response_sigma"], max_length)
        rows.append(
            {
                "prompt": maker.text(rng, lp) + " ?",
                "chosen": " " + maker.text(rng, lc),
                "rejected": " " + maker.text(rng, lr),
            }
        )
    return rows


def build_tokenizer(seed: int = 0, vocab_size: int = 4096, maker: TextMaker | None = None):
    from orpo_plugin.toy import build_tokenizer as toy_tokenizer

    maker = maker or TextMaker(seed)
    return toy_tokenizer(maker.corpus(random.Random(seed + 2)), vocab_size=vocab_size, chat_template=False)


def library_revision() -> str:
    """The orpo_plugin commit the benchmark ran against (+ "dirty" if its files differ from it), if in a git tree."""
    import subprocess

    import orpo_plugin

    root = os.path.dirname(os.path.dirname(os.path.abspath(orpo_plugin.__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "orpo_plugin"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")


def versions() -> str:
    import torch
    import transformers
    import trl

    return (
        f"orpo_plugin {library_revision()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}"
    )


def add_checkpointing_option(parser) -> None:
    """`--gradient-checkpointing on|off`, the same for every method of a benchmark (TRL included)."""
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="on",
        help="gradient checkpointing for every method, TRL included (default on: both trainers' default)",
    )


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (prints fine in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ------------------------------------------------------------------------------------------------ measuring
def batch_tokens(inputs: dict) -> tuple[int, int, int, int]:
    """(trained tokens, computed positions, non-pad computed positions, pairs) of one collated micro-batch, for
    TRL's or our batches.

    Trained tokens are counted the same way for every layout: 2*prompt + chosen + rejected per pair (a prompt
    shared by both branches still counts twice, as it does in a padded batch). Computed positions are what the
    model runs over: pad included, a shared prompt once.
    """
    if "pred_pos" in inputs:  # orpo_plugin's collator
        real = int(inputs["real_tokens"])  # non-pad positions of the row(s)
        trained = int(inputs["unshared_tokens"]) if "unshared_tokens" in inputs else real
        return trained, int(inputs["input_ids"].numel()), real, int(inputs["num_pairs"])
    # TRL's DPODataCollatorWithPadding: chosen/rejected = prompt + response, padded separately per batch;
    # concatenated_forward pads both to the longer one and runs [2B, T].
    cm, rm = inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]
    width = max(cm.shape[1], rm.shape[1])
    real = int(cm.sum() + rm.sum())
    return real, 2 * cm.shape[0] * width, real, int(cm.shape[0])


class Turns:
    """Round-robin turn-taking between trainers that run in threads, one optimizer step per turn.

    Only the thread holding the turn computes; the others wait on a condition variable. Interleaving methods step
    by step means a burst of load from other jobs on a shared machine hits every method alike, instead of
    whichever method happened to run during it.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.active = list(names)
        self.current = self.names[0]
        self.cond = threading.Condition()

    def acquire(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def release(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished and name in self.active:
                i = self.active.index(name)
                self.active.remove(name)
                nxt = self.active[i % len(self.active)] if self.active else None
            else:
                i = self.active.index(name)
                nxt = self.active[(i + 1) % len(self.active)]
            self.current = nxt
            self.cond.notify_all()


class StepMeter:
    """Counts tokens per micro-batch and times optimizer steps of one trainer.

    A step is timed from the moment the trainer starts fetching its batch (`get_batch_samples`) to on_step_end,
    so data loading and collation, forward, backward and the optimizer step all count; the first `warmup` steps
    are not timed. `compute_s` is the part between on_step_begin and on_step_end (not fetching/collating). The
    process's CPU time (all threads) is kept too: on a machine shared with other jobs, wall time also measures
    their load, CPU time mostly this process's own work. With `turns`, the step waits for its turn first.
    """

    def __init__(self, warmup: int, name: str = "", turns: Turns | None = None):
        self.warmup, self.name, self.turns = warmup, name, turns
        self.step = 0
        self.trained = self.computed = self.nonpad = self.pairs = 0
        self.wall = self.cpu = self.compute_s = 0.0
        self.step_wall: list[float] = []
        self.in_step = False
        self._t0 = self._cpu0 = self._t_begin = None

    # called by the Metered subclass
    def start_step(self):
        if self.in_step:  # a second fetch within one step (an epoch boundary): same timed step
            return
        if self.turns is not None:
            self.turns.acquire(self.name)
        self.in_step = True
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def count(self, inputs):
        if self.step >= self.warmup:  # inputs of step index `self.step` (0-based), counted once timed
            t, c, n, p = batch_tokens(inputs)
            self.trained += t
            self.computed += c
            self.nonpad += n
            self.pairs += p

    def end_step(self):
        now, cpu = time.perf_counter(), time.process_time()
        if self.step >= self.warmup:
            self.wall += now - self._t0
            self.cpu += cpu - self._cpu0
            self.compute_s += now - self._t_begin
            self.step_wall.append(now - self._t0)
        self.step += 1
        self.in_step = False
        if self.turns is not None:
            self.turns.release(self.name)

    def finish(self):
        """The trainer returned (or failed): let the others go on without it."""
        if self.turns is not None:
            if not self.in_step:
                self.turns.acquire(self.name)
            self.turns.release(self.name, finished=True)

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                meter._t_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                meter.end_step()

        return _Cb()

    def result(self) -> dict:
        return {
            "seconds": self.wall,
            "compute_s": self.compute_s,
            "cpu_s": self.cpu,
            "trained": self.trained,
            "computed": self.computed,
            "pairs": self.pairs,
            "steps": self.step - self.warmup,
            "tokens_per_s": self.trained / self.wall,
            "tokens_per_cpu_s": self.trained / self.cpu,
            "step_wall": self.step_wall,
            "pad_fraction": 1.0 - self.nonpad / self.computed if self.computed else float("nan"),
            "computed_per_trained": self.computed / self.trained,
        }


def train_interleaved(jobs) -> None:
    """Train (name, trainer, meter) jobs in threads that take turns step by step; re-raise the first failure."""
    threads, errors = [], {}
    for name, trainer, meter in jobs:

        def work(trainer=trainer, meter=meter, name=name):
            try:
                trainer.train()
            except BaseException as err:  # reported after the join
                errors[name] = err
            finally:
                meter.finish()

        threads.append(threading.Thread(target=work, name=name))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"{name} failed: {err!r}") from err


def metered(trainer_cls, meter: StepMeter):
    """A subclass of `trainer_cls` that reports its steps and micro-batches to `meter`."""

    class Metered(trainer_cls):
        def get_batch_samples(self, *args, **kwargs):
            meter.start_step()
            return super().get_batch_samples(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            meter.count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    Metered.__name__ = trainer_cls.__name__
    return Metered


def silence_printer(trainer) -> None:
    """Drop the callback that prints every log dict when tqdm is disabled."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def quiet_logs():
    import logging

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("orpo_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
