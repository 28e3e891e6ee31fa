"""Shared pieces of the benchmarks: synthetic preference text, tiny tokenizer/model, per-step timing and token counts.

Everything is built locally and deterministically from a seed; nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
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
        chosen_words = lognormal_words(rng, spec["response_median"], spec["response_sigma"], max_length)
        rejected_words = lognormal_words(rng, spec["response_median"], spec["response_sigma"], max_length)
        rows.append(
            {
                "prompt": maker.text(rng, lp) + " ?",
                "chosen": " " + maker.text(rng, chosen_words),
                "rejected": " " + maker.text(rng, rejected_words),
            }
        )
    return rows


# ------------------------------------------------------------------------------------ conversational pairs
# Lengths in tokens of the real tokenizer, message content only (the chat template adds its own tokens):
# log-normal draws (median, sigma), capped so that a pair is never truncated (see make_chat_pairs).
CHAT_LENGTHS = dict(
    system_share=0.5,
    system=(30, 0.6),  # half the rows bring a system message; the others get the template's default
    history_share=0.25,
    history_user=(40, 0.7),
    history_assistant=(80, 0.7),  # a quarter have one earlier exchange
    user=(60, 0.9),  # the question
    response=(110, 0.7),  # chosen and rejected, drawn independently
)

# A small English lexicon written for this benchmark, so a real BPE sees ordinary words (about one token each):
# function words take the top Zipf ranks, content words follow in a seeded order.
FUNCTION_WORDS = "the a of and to in is it that for on with as at by from this be are was or not can will you we they I if but so".split()
CONTENT_WORDS = """
able about above act add after again against ago air all also always among an animal answer any appear area ask back
base beauty been before began begin behind best better between big bird black blue boat body book both box boy bring
brought build busy call came car care carry cause center certain change check children city class clear close cold
color come common complete contain correct could country course cover cross cry cut dark day decide deep develop did
differ direct distant do does dog done door down draw drive dry during each early earth ease east eat end enough
equate even ever every example explain eye face fact fall family far farm fast father feel feet few field figure
fill final find fine fire first fish five fly follow food foot force form found four free friend front full game
gave get girl give go gold good got govern great green ground group grow had half hand happen hard has have he head
hear heard heat help her here high him his hold home horse hot hour house how hundred idea inch interest island just
keep kind king knew know land language large last late laugh lay lead learn leave left less let letter life light
like line list listen little live long look love low machine made main make man many map mark may me mean measure
men might mile mind minute miss money moon more morning most mother mountain move much multiply music must my name
near need never new next night no north note nothing notice noun now number numeral object ocean off often old once
one only open order other our out over own page paint paper part pass pattern people person picture piece place
plain plan plane plant play point port pose possible pound power press problem produce product pull put question
quick rain ran reach read ready real reason record red remember rest right river road rock room round rule run said
same saw say school science sea second see seem self sentence serve set several shape she ship short should show
side simple since sing six slow small snow some song soon sound south space special spell stand star start state
stay step still stood stop story street strong study such sun sure surface system table tail take talk teach tell
ten test than their them then there these thing think those though thought thousand three through time tire together
told too took top toward town travel tree true try turn two under unit until up us use usual verb very voice vowel
wait walk want war warm watch water way week well went were west what wheel when where which while white who whole
why wind wonder wood word work world would write year yes young your
""".split()


class ChatMaker:
    """Conversational preference rows (message lists) of a chosen length in tokens of a real tokenizer.

    Zipf-weighted common English words; each word's token count (with its leading space) is read off the tokenizer
    once, so a message can be grown word by word to a target length.
    """

    def __init__(self, tokenizer, seed: int = 0):
        rng = random.Random(seed)
        content = [w for w in CONTENT_WORDS if w not in FUNCTION_WORDS]
        rng.shuffle(content)
        self.words = FUNCTION_WORDS + content  # in Zipf rank order
        weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        total = sum(weights)
        self.cum = list(_accumulate([w / total for w in weights]))
        ids = tokenizer([" " + w for w in self.words], add_special_tokens=False)["input_ids"]
        self.cost = [len(x) for x in ids]
        self.period = len(tokenizer(" word.", add_special_tokens=False)["input_ids"]) - len(
            tokenizer(" word", add_special_tokens=False)["input_ids"]
        )

    def text(self, rng: random.Random, tokens: int, question: bool = False) -> str:
        """Sentences of about `tokens` tokens (a question ends with "?")."""
        out, n, sentence, length = [], 0, 0, rng.randint(6, 16)
        while n < tokens:
            i = _bisect(self.cum, rng.random())
            word = self.words[i]
            out.append(word.capitalize() if sentence == 0 else word)
            n += self.cost[i]
            sentence += 1
            if sentence == length and n < tokens - 2:  # end the sentence
                out[-1] += "."
                n += self.period
                sentence, length = 0, rng.randint(6, 16)
        return " ".join(out) + ("?" if question else ".")


def _draw(rng: random.Random, spec: tuple[float, float], cap: int) -> int:
    median, sigma = spec
    return lognormal_words(rng, median, sigma, cap)


def make_chat_pairs(n: int, tokenizer, max_length: int, seed: int = 0) -> list[dict]:
    """`n` conversational preference rows (`prompt` = [system?, (user, assistant)?, user], `chosen`/`rejected` =
    [assistant]) with CHAT_LENGTHS' log-normal lengths in tokens.

    Caps keep every pair within `max_length` after the chat template (and one more token: TRL appends an EOS), so
    neither trainer truncates: of what the template leaves of `max_length` (less a margin), the prompt's messages
    together take at most 55 % in content tokens, each response at most 45 %.
    """
    spec = CHAT_LENGTHS
    maker = ChatMaker(tokenizer, seed)
    rng = random.Random(seed + 1)
    # the template's own tokens around the longest prompt shape ([system, user, assistant, user]) and a response;
    # without a system message a template may insert its default one (SmolLM2's does)
    shape = [{"role": r, "content": ""} for r in ("system", "user", "assistant", "user", "assistant")]
    overhead = max(len(tokenizer.apply_chat_template(s, tokenize=True, return_dict=False)) for s in (shape, shape[1:]))
    room = max_length - overhead - 8
    if room < 40:
        raise ValueError(f"max_length {max_length} leaves too little room for conversational pairs")
    prompt_cap, response_cap = int(0.55 * room), int(0.45 * room)
    rows = []
    for _ in range(n):
        budget = prompt_cap
        prompt = []
        if rng.random() < spec["system_share"]:
            k = _draw(rng, spec["system"], budget // 3)
            prompt.append({"role": "system", "content": maker.text(rng, k)})
            budget -= k
        if rng.random() < spec["history_share"]:
            ku = _draw(rng, spec["history_user"], budget // 4)
            ka = _draw(rng, spec["history_assistant"], budget // 3)
            prompt += [
                {"role": "user", "content": maker.text(rng, ku, question=True)},
                {"role": "assistant", "content": maker.text(rng, ka)},
            ]
            budget -= ku + ka
        prompt.append({"role": "user", "content": maker.text(rng, _draw(rng, spec["user"], max(1, budget)), True)})
        chosen, rejected = (
            [{"role": "assistant", "content": maker.text(rng, _draw(rng, spec["response"], response_cap))}]
            for _ in range(2)
        )
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# ------------------------------------------------------------------------------------------- real models
@functools.cache
def pretrained_path(name: str):
    """The cached checkpoint folder of an `orpo_plugin.pretrained` model (converted once from its GGUF package)."""
    from orpo_plugin import pretrained

    return pretrained.checkpoint(name)


def pretrained_config(name: str, layers: int | None = None):
    """The model's config; `layers`: keep only its first layers (a smoke-test size, not a benchmark)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained_path(name))
    if layers is not None and layers < config.num_hidden_layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def load_pretrained(name: str, layers: int | None = None, **kwargs):
    """The pretrained model in float32 (with `layers`, only its first layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = pretrained_config(name, layers)
    return AutoModelForCausalLM.from_pretrained(pretrained_path(name), config=config, dtype=torch.float32, **kwargs)


def pretrained_line(name: str, config, full_layers: int) -> str:
    """One line describing a pretrained model as loaded."""
    layers = f"{config.num_hidden_layers} layers"
    if config.num_hidden_layers < full_layers:
        layers = f"its first {config.num_hidden_layers} of {full_layers} layers (a smoke-test size)"
    window = getattr(config, "sliding_window", None)
    return (
        f"pretrained {name} ({config.model_type}, {layers}, hidden {config.hidden_size}, vocab "
        f"{config.vocab_size:,}{', tied output layer' if config.tie_word_embeddings else ''}"
        f"{f', sliding window {window}' if window else ''}), float32"
    )


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
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
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


def meminfo_gib(field: str) -> float | None:
    """A /proc/meminfo field in GiB (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def write_report(out_dir: str, name: str, text: str, record: dict) -> None:
    """Write a benchmark's markdown table to OUT_DIR/NAME.md and its raw record to OUT_DIR/name.json, then print it."""
    with open(os.path.join(out_dir, f"{name.upper()}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(text)


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
    transformers.logging.disable_progress_bar()  # "Loading weights" of pretrained checkpoints
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("orpo_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
