"""Axolotl 0.19 end to end: the real `axolotl train` CLI with `plugins: [orpo_plugin.axolotl.ORPOPlugin]`.

Axolotl pins its own transformers/TRL, so it runs in a venv of its own, built (or reused) by
`integration/axolotl/run.sh --venv` (default `$HOME/.cache/orpo-plugin/axolotl-venv`, override ORPO_AXOLOTL_VENV).
Each run trains a tiny random-init Llama (saved locally) on a local `chat_template.argilla` JSONL for 2 steps and
reads the logged metrics from the checkpoint's trainer_state.json. Every shipped configs/axolotl/*.yml also runs with
its options as written except model, data, sizes and what a CPU cannot run (the SHIPPED_* tables).
Every preference dataset type Axolotl ships for DPO trains under `rl: orpo` with the plugin (TYPE_RUNS: one
`axolotl train` per chat-format family, one dataset per type, a test-only plugin recording what the trainer received),
and what the trainer received equals what `rl: dpo` makes of the same YAML, tokenized by orpo_plugin's rules
(integration/axolotl/preference_data.py computes that reference, and the errors bad rows and bad types give).

Without the venv (and no way to build it) these tests skip, or fail when ORPO_REQUIRE_INTEGRATION=1 (CI).
The first tests (not integration-marked) check the YAML keys' pydantic model on the host, without Axolotl.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "integration" / "axolotl"
TINY_CONFIG = REPO / "configs" / "axolotl" / "tiny-cpu-orpo.yml"
SHIPPED_CONFIGS = sorted((REPO / "configs" / "axolotl").glob("*.yml"))
REQUIRED = os.environ.get("ORPO_REQUIRE_INTEGRATION") == "1"
STEPS = 2
PLUGIN_KEYS = (
    "orpo_padding_free",
    "orpo_packing",
    "orpo_packing_max_tokens",
    "orpo_prefix_sharing",
    "orpo_chunked_loss",
    "orpo_nll_on_prompt",
    "orpo_max_prompt_length",
    "orpo_truncation_mode",
)
ORPO_METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "tokens/real")


# ------------------------------------------------------------------------------------------------------ host tests
def test_plugin_package_imports_without_axolotl():
    """`orpo_plugin` never imports Axolotl; the keys' model (args.py) needs only pydantic."""
    code = (
        "import sys, orpo_plugin, orpo_plugin.axolotl\n"
        "from orpo_plugin.axolotl import ORPOPluginArgs\n"
        "assert 'axolotl' not in sys.modules, 'orpo_plugin imported axolotl'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_plugin_keys_validation_names_the_key():
    pydantic = pytest.importorskip("pydantic")
    from orpo_plugin.axolotl.args import ORPOPluginArgs

    ORPOPluginArgs(rl="orpo", context_parallel_size=1, sequence_parallel_degree=None)  # no split: accepted
    ok = ORPOPluginArgs(rl="orpo", orpo_packing=True, orpo_packing_max_tokens=4096, orpo_chunked_loss=False)
    assert ok.orpo_packing is True and ok.orpo_packing_max_tokens == 4096 and ok.orpo_prefix_sharing is None
    for bad, key in [
        (dict(rl="orpo", orpo_packing="maybe"), "orpo_packing"),
        (dict(rl="orpo", orpo_packing=True, orpo_packing_max_tokens=1), "orpo_packing_max_tokens"),
        (dict(rl="orpo", orpo_nll_on_prompt=[1]), "orpo_nll_on_prompt"),
        (dict(rl="dpo", orpo_prefix_sharing=True), "orpo_prefix_sharing"),
        (dict(rl="orpo", orpo_packing=False, orpo_packing_max_tokens=2048), "orpo_packing_max_tokens"),
        (dict(rl="orpo", orpo_truncation_mode="keep_middle"), "orpo_truncation_mode"),
        (dict(rl="orpo", orpo_max_prompt_length=0), "orpo_max_prompt_length"),
        (dict(rl="orpo", sequence_len=256, orpo_max_prompt_length=256), "orpo_max_prompt_length"),
        (dict(rl="dpo", orpo_truncation_mode="keep_end"), "orpo_truncation_mode"),
        # a sequence or layer split across GPUs: refused, never a silent run on shards
        (dict(rl="orpo", context_parallel_size=2), "context_parallel_size: 2"),
        (dict(rl="orpo", sequence_parallel_degree=4), "sequence_parallel_degree: 4"),
        (dict(rl="orpo", tensor_parallel_size=2), "tensor_parallel_size: 2"),
    ]:
        with pytest.raises(pydantic.ValidationError, match=key):
            ORPOPluginArgs(**bad)


def test_row_transform_names_the_row_and_field_without_axolotl():
    """The wrapper around Axolotl's row transforms (orpo_plugin/axolotl/dataset_types.py), on stand-in transforms."""
    from orpo_plugin.axolotl.dataset_types import RowTransform, check_argilla_row

    def chatml_like(sample):  # reads like Axolotl's chatml.intel: system optional, question required
        system = sample["system"] if "system" in sample and sample["system"] else ""
        system = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        sample["prompt"] = f"{system}<|im_start|>user\n{sample['question']}<|im_end|>\n<|im_start|>assistant\n"
        sample["chosen"], sample["rejected"] = f"{sample['chosen']}<|im_end|>", f"{sample['rejected']}<|im_end|>"
        return sample

    where = "datasets[0] (x.jsonl, type: chatml.intel)"
    wrapped = RowTransform(chatml_like, "chatml.intel", where, frozenset({"system"}))
    good = {"system": None, "question": "Why?", "chosen": "Because.", "rejected": "No."}
    out = wrapped(dict(good), 0)
    assert out["prompt"].startswith("<|im_start|>user") and out["chosen"] == "Because.<|im_end|>"
    cases = [
        ({**good, "question": None}, "datasets[0] (x.jsonl, type: chatml.intel): row 3: field 'question' is null"),
        ({k: v for k, v in good.items() if k != "question"}, "row 3: field 'question' is missing"),
        ({**good, "question": ["a", "list"]}, None),  # rendered as text by the transform: not ours to refuse
    ]
    for row, message in cases:
        if message is None:
            wrapped(row, 3)
            continue
        with pytest.raises(ValueError, match=re.escape(message)):
            wrapped(row, 3)
    failing = RowTransform(lambda sample: sample["answers"][1], "zephyr.nectar", "datasets[1]", frozenset())
    with pytest.raises(ValueError, match=re.escape("datasets[1]: row 5: field 'answers' could not be read")):
        failing({"answers": [1]}, 5)
    empty = RowTransform(lambda sample: sample, "passthrough.default", "datasets[0]", frozenset())
    with pytest.raises(ValueError, match=re.escape("row 0: field 'rejected' after the passthrough.default")):
        empty({"prompt": "Q", "chosen": "A", "rejected": ""}, 0)

    def argilla(sample):
        raise AssertionError("invalid number of turns")  # what Axolotl's transform does with the rows below

    checked = RowTransform(argilla, "chat_template.argilla", "datasets[0]", frozenset({"system"}), check_argilla_row)
    user, answer = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    for row, message in [
        ({"chosen": [answer], "rejected": [user, answer]}, "row 2: field 'chosen' has the turns ['assistant']"),
        ({"chosen": [user, answer], "rejected": "A"}, "row 2: field 'rejected' must be a non-empty list of messages"),
        (
            {"chosen": [user, {"role": "assistant", "content": None}], "rejected": [answer]},
            "row 2: field 'chosen[1].content' is missing",
        ),
        ({"chosen": [user, answer], "rejected": [answer, user]}, "row 2: field 'rejected' ends with a 'user' turn"),
        ({"chosen": [user, answer], "rejected": [answer], "prompt": None}, "row 2: field 'prompt' is null"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            checked(row, 2)
    with pytest.raises(ValueError, match=re.escape("row 2: the row could not be read")) as err:
        checked({"chosen": [user, answer], "rejected": [answer]}, 2)  # passes the checks; the transform still fails
    assert isinstance(err.value.__cause__, AssertionError)


def _unavailable(reason: str):
    reason += "\n(point ORPO_AXOLOTL_VENV at an Axolotl 0.19.0 + torch 2.13.0 venv, or let run.sh build one online)"
    if REQUIRED:
        pytest.fail(f"{reason} (ORPO_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)


def _env(venv_python: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("PYTHONPATH", None)  # the venv has this repo installed (editable); nothing from the host leaks in
    env.pop("VIRTUAL_ENV", None)
    return env


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def axolotl_python() -> Path:
    """The Axolotl venv's python, built on first use by run.sh (minutes; reused while its marker matches)."""
    try:
        proc = subprocess.run(
            ["bash", str(HERE / "run.sh"), "--venv"], capture_output=True, text=True, timeout=3600, cwd=REPO
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        _unavailable(f"could not build the Axolotl venv with integration/axolotl/run.sh: {err}")
    if proc.returncode != 0:
        _unavailable(f"could not build the Axolotl venv (integration/axolotl/run.sh --venv):\n{_tail(proc.stderr)}")
    python = Path(proc.stdout.strip().splitlines()[-1])
    if not python.exists():
        _unavailable(f"run.sh reported {python}, which does not exist")
    return python


@pytest.fixture(scope="session")
def fixtures_dir(axolotl_python, tmp_path_factory) -> Path:
    """Tiny Llama + tokenizer (save_pretrained) and a chat_template.argilla JSONL, written by the venv's python."""
    out = tmp_path_factory.mktemp("axolotl-fixtures")
    proc = subprocess.run(
        [str(axolotl_python), str(HERE / "fixtures.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(axolotl_python),
    )
    assert proc.returncode == 0, f"fixtures.py failed:\n{_tail(proc.stdout + proc.stderr)}"
    return out


def _config(fixtures: Path, workdir: Path, plugin: bool = True, **overrides) -> dict:
    """The shipped tiny config with this run's paths and steps; `plugin=False` gives Axolotl's built-in ORPO."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg.update(
        base_model=str(fixtures / "model"),
        dataset_prepared_path=str(workdir / "prepared"),
        output_dir=str(workdir / "out"),
        max_steps=STEPS,
        save_steps=STEPS,
    )
    cfg["datasets"] = [dict(cfg["datasets"][0], path=str(fixtures / "prefs.jsonl"))]
    for key in PLUGIN_KEYS:
        cfg.pop(key, None)
    if not plugin:
        cfg.pop("plugins")
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------ shipped configs, tiny
# A shipped config runs with every option as written except these. What a CPU cannot run: key -> {value as written:
# value here}; a written value missing from its row fails the test (say how a CPU runs it, or fix the config).
SHIPPED_CPU = {
    # flash-attn runs on CUDA only; sdpa runs the same layouts (orpo_plugin's exact per-sequence attention)
    "attn_implementation": {"flash_attention_2": "sdpa", "sdpa": "sdpa", "eager": "eager"},
    # Axolotl has no use_cpu, and transformers refuses bf16 without a bf16 accelerator: float32
    "bf16": {True: False, False: False},
    # TF32 is a CUDA matmul mode; transformers refuses it without an Ampere GPU
    "tf32": {True: False, False: False},
}
# Sizes and cadence: capped at a tiny run's, never raised.
SHIPPED_SIZES = {
    "sequence_len": 256,
    "orpo_packing_max_tokens": 512,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "save_steps": STEPS,
    "warmup_steps": 1,
}
SHIPPED_ALWAYS = {"max_steps": STEPS, "logging_steps": 1}
# Special tokens named after the real model's tokenizer -> the tiny tokenizer's token of the same role.
TINY_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# The tiny model, its tokens, the local JSONL and this run's directories.
SHIPPED_PATHS = ("base_model", "special_tokens", "datasets", "dataset_prepared_path", "output_dir")
SHIPPED_CHANGEABLE = set(SHIPPED_CPU) | set(SHIPPED_SIZES) | set(SHIPPED_ALWAYS) | set(SHIPPED_PATHS)


def _shipped_config(path: Path, fixtures: Path, workdir: Path) -> dict:
    """A shipped config as a tiny CPU run: only the keys the tables above name change."""
    written = yaml.safe_load(path.read_text())
    cfg = dict(written)
    for key, table in SHIPPED_CPU.items():
        if key in written:
            if written[key] not in table:
                pytest.fail(
                    f"{path.name}: {key}: {written[key]!r}: no CPU substitution known; add one or fix the config"
                )
            cfg[key] = table[written[key]]
    cfg.update({k: min(written[k], cap) for k, cap in SHIPPED_SIZES.items() if k in written})
    cfg.update(SHIPPED_ALWAYS)
    if "special_tokens" in written:
        unknown = set(written["special_tokens"]) - set(TINY_SPECIAL_TOKENS)
        assert not unknown, f"{path.name}: special_tokens {unknown}: no tiny-tokenizer counterpart known"
        cfg["special_tokens"] = {k: TINY_SPECIAL_TOKENS[k] for k in written["special_tokens"]}
    data = fixtures / "prefs.jsonl"
    cfg["datasets"] = [dict(d, path=str(data), ds_type="json") for d in written["datasets"]]
    cfg.update(
        base_model=str(fixtures / "model"),
        dataset_prepared_path=str(workdir / "prepared"),
        output_dir=str(workdir / "out"),
    )
    changed = {k for k in cfg if k not in written or cfg[k] != written[k]}
    assert set(written) <= set(cfg) and changed <= SHIPPED_CHANGEABLE, changed - SHIPPED_CHANGEABLE
    return cfg


class AxolotlRun:
    def __init__(self, cfg: dict, proc: subprocess.CompletedProcess, seconds: float):
        self.cfg, self.proc, self.seconds = cfg, proc, seconds
        self.output = proc.stdout + proc.stderr
        self.out_dir = Path(cfg["output_dir"])

    @property
    def log_history(self) -> list[dict]:
        state = self.out_dir / f"checkpoint-{STEPS}" / "trainer_state.json"
        assert state.exists(), f"no {state}; output:\n{_tail(self.output)}"
        return json.loads(state.read_text())["log_history"]

    @property
    def steps(self) -> list[dict]:
        return [h for h in self.log_history if "loss" in h]


def _train(python: Path, cfg: dict, workdir: Path, threads: int | None = None) -> AxolotlRun:
    """`axolotl train cfg.yml` in `workdir` (in-process launcher: one process, no accelerate re-launch)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = _env(python)
    if any(p.startswith("record_plugin.") for p in cfg.get("plugins", [])):
        env["PYTHONPATH"] = str(HERE)  # the recording plugin's module, and nothing else from the host
    env["HF_DATASETS_CACHE"] = str(workdir / "hf-datasets")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(python.parent / "axolotl"), "train", str(path), "--launcher", "python"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=workdir,
        env=env,
    )
    run = AxolotlRun(cfg, proc, time.perf_counter() - start)
    (workdir / "axolotl.log").write_text(run.output)
    return run


def _trained(run: AxolotlRun) -> AxolotlRun:
    assert run.proc.returncode == 0, f"axolotl train failed ({run.seconds:.0f}s):\n{_tail(run.output, 80)}"
    return run


# Each test's `axolotl train` runs; the session starts the selected ones together (ORPO_AXOLOTL_JOBS at a time)
QLORA = dict(load_in_4bit=True, adapter="qlora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True)
# ------------------------------------------------------------------------------ Axolotl's preference dataset types
RECORD_PLUGIN = "record_plugin.RecordTrainData"  # integration/axolotl/record_plugin.py: what the trainer received
# One `axolotl train` per chat-format family, with the tokenizer set up as for a real model of that family
# (`special_tokens:` over the tiny tokenizer, which knows both families' tokens) and one dataset per type
# (integration/axolotl/fixtures.py writes their rows; `+fields` is chat_template.default with its field options).
# llama3: a Llama 3 base tokenizer, whose EOS (<|end_of_text|>) is not the end of a turn (<|eot_id|>).
TYPE_RUNS = {
    "types-chatml": dict(
        chat_template="chatml",
        types=(
            *(f"chatml.{f}" for f in ("default", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")),
            "chat_template.default+fields",
            "chat_template.argilla_chat",
            "chat_template.argilla",
            "zephyr.nectar",
            "user_defined.default",
            "passthrough.default",
        ),
    ),
    "types-llama3": dict(
        chat_template="llama3",
        special_tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        types=(
            *(f"llama3.{f}" for f in ("default", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")),
            "chat_template.default",
        ),
        orpo_packing=True,  # the packed layout over these rows too
    ),
}


def _dataset_entry(fixtures: Path, name: str, rows_file: Path | None = None) -> dict:
    """The `datasets:` entry a user writes for the fixture rows of type `name` (see integration/axolotl/fixtures.py)."""
    sys.path.insert(0, str(HERE))
    try:
        from fixtures import TYPE_FIELD_OPTIONS, USER_DEFINED_TYPE
    finally:
        sys.path.remove(str(HERE))
    entry = {"path": str(rows_file or fixtures / "types" / f"{name}.jsonl"), "split": "train"}
    entry["type"] = USER_DEFINED_TYPE if name == "user_defined.default" else name.split("+")[0]
    entry.update(TYPE_FIELD_OPTIONS.get(name, {"ds_type": "json"}))
    return entry


def _types_config(fixtures: Path, workdir: Path, run: str) -> dict:
    spec = dict(TYPE_RUNS[run])
    types = spec.pop("types")
    cfg = _config(
        fixtures,
        workdir,
        gradient_checkpointing=True,
        shuffle_merged_datasets=False,
        **spec,
        datasets=[_dataset_entry(fixtures, name) for name in types],
    )
    cfg["plugins"] = [*cfg["plugins"], RECORD_PLUGIN]
    return cfg


def _bad_argilla_rows(folder: Path) -> Path:
    """Argilla rows whose row 2 has a `chosen` conversation without the user's turn (the issue's example)."""
    rows = [
        {
            "chosen": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Yes {i}."}],
            "rejected": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"No {i}."}],
        }
        for i in range(4)
    ]
    rows[2]["chosen"] = rows[2]["chosen"][1:]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad-argilla.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Turns that end in no special token: orpo_plugin appends no EOS after a chat template's end-of-turn token (the tiny
# tokenizer's <|end|>), Axolotl's built-in ORPO (TRL's tokenization) always does; with this template both append EOS,
# so the two trainers see the same tokens and their losses can be compared.
PLAIN_TURNS = dict(
    chat_template="jinja",
    chat_template_jinja="{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
)
RUN_SPECS = {
    "plugin-padded": dict(**PLAIN_TURNS),
    "builtin": dict(plugin=False, **PLAIN_TURNS),
    # pad_to_multiple_of makes Axolotl pass its DPO collator, which ours replaces; accumulation over 2 packed batches;
    # with an eval split: our eval metrics go through Axolotl's evaluation loop
    "plugin-qlora-packed": dict(
        orpo_packing=True,
        orpo_packing_max_tokens=1024,
        pad_to_multiple_of=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        val_set_size=0.25,
        eval_steps=STEPS,
        **QLORA,
        # the prompt truncation keys reach the trainer: its model card lists them
        orpo_max_prompt_length=100,
        orpo_truncation_mode="keep_start",
    ),
    "wrong-value": dict(orpo_packing="maybe"),
    # every configs/axolotl/*.yml as a tiny CPU run (see _shipped_config); the tiny one is also the packed run
    **{f"shipped-{path.stem}": dict(shipped=path) for path in SHIPPED_CONFIGS},
    # every preference dataset type (see TYPE_RUNS), and the argilla row without its user turn
    **{name: dict(types=name) for name in TYPE_RUNS},
    "bad-argilla-row": dict(bad_rows=True),
    # num_epochs with packing and no max_steps: a set of short pairs (many per micro-batch) and one of long pairs
    "epochs-short": dict(epochs=True, long_pairs=False),
    "epochs-long": dict(epochs=True, long_pairs=True),
}
PACKED_RUN = f"shipped-{TINY_CONFIG.stem}"
USED_BY = {
    "test_plugin_matches_builtin_orpo_first_step": ("plugin-padded", "builtin"),
    "test_plugin_packing": (PACKED_RUN,),
    "test_plugin_qlora_packing": ("plugin-qlora-packed",),
    "test_plugin_qlora_backprop_avoids_cpu_inference_kernel": ("plugin-qlora-packed",),
    "test_wrong_key_value_names_the_key": ("wrong-value",),
    "test_shipped_config_trains": tuple(f"shipped-{path.stem}" for path in SHIPPED_CONFIGS),
    "test_dataset_type_trains_as_rl_dpo_loads_it": tuple(TYPE_RUNS),
    "test_bad_argilla_row_names_the_row_and_field": ("bad-argilla-row",),
    "test_packed_epochs_train_every_pair_num_epochs_times": ("epochs-short", "epochs-long"),
}
EPOCHS, MICRO_BATCH, WARMUP_RATIO = 2, 4, 0.25


def _epochs_config(fixtures: Path, workdir: Path, long_pairs: bool) -> dict:
    """`orpo_packing: true`, num_epochs and no max_steps, a cosine schedule with warmup_ratio; the long set repeats
    every message of the fixture rows 8 times (about one pair per micro-batch), the short set is them as they are."""
    rows = [json.loads(line) for line in (fixtures / "prefs.jsonl").read_text().splitlines()][:16]
    if long_pairs:
        for row in rows:
            for key in ("chosen", "rejected"):
                row[key] = [dict(m, content=" ".join([m["content"]] * 8)) for m in row[key]]
    data = workdir / "data" / "rows.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(
        fixtures,
        workdir,
        orpo_packing=True,
        orpo_packing_max_tokens=1024,
        sequence_len=1024,
        micro_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=1,
        num_epochs=EPOCHS,
        lr_scheduler="cosine",
        warmup_ratio=WARMUP_RATIO,
        learning_rate=1e-3,
        save_steps=10_000,
    )
    cfg.pop("max_steps")
    cfg["datasets"] = [dict(cfg["datasets"][0], path=str(data))]
    cfg["plugins"] = [*cfg["plugins"], "record_plugin.RecordSeen"]
    return cfg


@pytest.fixture(scope="session")
def axolotl_runs(request, axolotl_python, fixtures_dir, tmp_path_factory):
    """name -> Future[AxolotlRun] for the runs the selected tests need, started concurrently."""
    wanted = {name for item in request.session.items for name in USED_BY.get(getattr(item, "originalname", ""), ())}
    jobs = int(os.environ.get("ORPO_AXOLOTL_JOBS", 0)) or max(2, min(len(wanted), os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = {}
    for name, spec in RUN_SPECS.items():
        if name in wanted:
            spec = dict(spec)
            plugin, shipped = spec.pop("plugin", True), spec.pop("shipped", None)
            types, bad_rows = spec.pop("types", None), spec.pop("bad_rows", False)
            workdir = tmp_path_factory.mktemp(f"axolotl-{name}")
            if shipped:
                cfg = _shipped_config(shipped, fixtures_dir, workdir)
            elif types:
                cfg = _types_config(fixtures_dir, workdir, types)
            elif spec.pop("epochs", False):
                cfg = _epochs_config(fixtures_dir, workdir, long_pairs=spec.pop("long_pairs"))
            elif bad_rows:
                cfg = _config(fixtures_dir, workdir)
                cfg["datasets"][0]["path"] = str(_bad_argilla_rows(workdir / "data"))
            else:
                cfg = _config(fixtures_dir, workdir, plugin, **spec)
            futures[name] = pool.submit(_train, axolotl_python, cfg, workdir, threads)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _check_orpo_metrics(run: AxolotlRun):
    steps = run.steps
    assert len(steps) == STEPS, steps
    for entry in steps:
        missing = [m for m in ORPO_METRICS if m not in entry]
        assert not missing, f"orpo_plugin metrics {missing} not logged: {entry}"
        assert all(math.isfinite(entry[m]) for m in ORPO_METRICS), entry
        assert entry["tokens/real"] > 0


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.integration
def test_shipped_configs_validate(axolotl_python, axolotl_runs, tmp_path):
    """Every configs/axolotl/*.yml passes Axolotl's own validator with the plugin registered; bad keys do not.

    First in the file: requesting `axolotl_runs` starts the training runs, which go on while this one validates.
    """
    assert SHIPPED_CONFIGS
    bad = tmp_path / "bad.yml"
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    bad.write_text(yaml.safe_dump(dict(cfg, orpo_packing_max_tokens=1)))
    wrong_rl = tmp_path / "wrong-rl.yml"
    wrong_rl.write_text(yaml.safe_dump(dict(cfg, rl="dpo")))
    split = tmp_path / "context-parallel.yml"  # refused by the plugin before Axolotl's flash-attention requirement
    split.write_text(yaml.safe_dump(dict(cfg, context_parallel_size=2)))
    proc = subprocess.run(
        [
            str(axolotl_python),
            str(HERE / "validate_configs.py"),
            *map(str, SHIPPED_CONFIGS),
            str(bad),
            str(wrong_rl),
            str(split),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(axolotl_python),
        cwd=REPO,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item["path"]] = item
    assert len(results) == len(SHIPPED_CONFIGS) + 3, _tail(proc.stdout + proc.stderr)
    for path in SHIPPED_CONFIGS:
        item = results[str(path)]
        assert item["ok"], f"{path.name}: {item.get('error')}"
        assert item["rl"] == "orpo" and "orpo_plugin.axolotl.ORPOPlugin" in item["plugins"], item
        assert item["orpo"].get("orpo_packing") is True, item
    assert not results[str(bad)]["ok"] and "orpo_packing_max_tokens" in results[str(bad)]["error"]
    assert not results[str(split)]["ok"] and "context_parallel_size: 2: under rl: orpo" in results[str(split)]["error"]
    assert not results[str(wrong_rl)]["ok"] and "rl: orpo" in results[str(wrong_rl)]["error"]


@pytest.mark.integration
def test_plugin_matches_builtin_orpo_first_step(axolotl_runs):
    """(a) the plugin, padded layout: same first-step loss as Axolotl's own `rl: orpo` on the same data and seed
    (a chat template whose turns end in no special token, see PLAIN_TURNS)."""
    ours = _trained(axolotl_runs["plugin-padded"].result())
    builtin = _trained(axolotl_runs["builtin"].result())
    _check_orpo_metrics(ours)
    assert "tokens/real" not in builtin.steps[0]  # two different trainers: only ours logs token counts
    first, ref = ours.steps[0], builtin.steps[0]
    assert abs(first["loss"] - ref["loss"]) < 1e-4, (first, ref)
    for key in ("nll_loss", "log_odds_ratio", "rewards/accuracies"):
        assert abs(first[key] - ref[key]) < 1e-4, (key, first[key], ref[key])
    # the same loss after one optimizer step: the gradients agree too
    assert abs(ours.steps[1]["loss"] - builtin.steps[1]["loss"]) < 1e-4, (ours.steps[1], builtin.steps[1])
    assert (ours.out_dir / "model.safetensors").exists()


@pytest.mark.integration
def test_plugin_packing(axolotl_runs):
    """(b) `orpo_packing: true` (the shipped tiny config): trains, logs our metrics with no padding tokens, saves."""
    run = _trained(axolotl_runs[PACKED_RUN].result())
    assert run.cfg.get("orpo_packing") is True, f"{TINY_CONFIG.name} is this test's packed run: keep orpo_packing on"
    _check_orpo_metrics(run)
    assert all(entry["tokens/padding_fraction"] == 0 for entry in run.steps), run.steps
    assert (run.out_dir / "model.safetensors").exists()
    card = (run.out_dir / "README.md").read_text()
    for row in ("| `layout` | `padding_free` |", "| `packing` | `True` |", "@article{hong2024orpo"):
        assert row in card, (row, card)


@pytest.mark.integration
def test_plugin_qlora_packing(axolotl_runs):
    """(c) QLoRA (4-bit nf4 base, bitsandbytes on CPU) with packing: trains, evaluates, saves the adapter."""
    run = _trained(axolotl_runs["plugin-qlora-packed"].result())
    _check_orpo_metrics(run)
    evals = [h for h in run.log_history if "eval_loss" in h]
    assert evals and all(math.isfinite(h["eval_log_odds_ratio"]) and "eval_nll_loss" in h for h in evals), evals
    assert (run.out_dir / "adapter_config.json").exists()
    assert (run.out_dir / "adapter_model.safetensors").exists()
    card = (run.out_dir / "README.md").read_text()
    for row in ("| `max_prompt_length` | `100` |", "| `truncation_mode` | `keep_start` |"):
        assert row in card, (row, card)


@pytest.mark.integration
def test_plugin_qlora_backprop_avoids_cpu_inference_kernel(axolotl_runs):
    """QLoRA on CPU: no backward pass through bitsandbytes' inference-only 4-bit kernel."""
    run = _trained(axolotl_runs["plugin-qlora-packed"].result())
    assert "gemv_4bit: an autograd kernel was not registered" not in run.output


@pytest.mark.integration
def test_wrong_key_value_names_the_key(axolotl_runs):
    """A wrong orpo_* value stops `axolotl train` with Axolotl's (pydantic) validation error naming the key."""
    run = axolotl_runs["wrong-value"].result()
    assert run.proc.returncode != 0
    assert "orpo_packing" in run.output and "valid boolean" in run.output, _tail(run.output)
    assert not (run.out_dir / f"checkpoint-{STEPS}").exists()


# Axolotl key -> the training-argument field that carries it into orpo_plugin's trainer
SHIPPED_ARG_FIELDS = {
    "gradient_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_kwargs": "gradient_checkpointing_kwargs",
    "orpo_alpha": "beta",
    "sequence_len": "max_length",
    "optimizer": "optim",
    "lr_scheduler": "lr_scheduler_type",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "seed": "seed",
    "bf16": "bf16",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_steps": "max_steps",
    "orpo_padding_free": "padding_free",
    "orpo_packing": "packing",
    "orpo_packing_max_tokens": "packing_max_tokens",
    "orpo_prefix_sharing": "prefix_sharing",
    "orpo_chunked_loss": "chunked_loss",
    "orpo_nll_on_prompt": "nll_on_prompt",
}
LOAD_ARGS = """
import enum, json, sys, torch
for path in sys.argv[1:]:
    args = torch.load(path, weights_only=False)
    fields = {k: v.value if isinstance(v, enum.Enum) else v for k, v in vars(args).items()}
    print(json.dumps({"path": path, "class": type(args).__name__, "fields": fields}, default=str))
"""


@pytest.fixture(scope="session")
def shipped_run_args(axolotl_runs, axolotl_python) -> dict[str, dict]:
    """The training arguments each shipped-config run saved, read back by the venv's python in one process."""
    paths = {}
    for name, future in axolotl_runs.items():
        if name.startswith("shipped-"):
            state = future.result().out_dir / f"checkpoint-{STEPS}" / "training_args.bin"
            if state.exists():
                paths[str(state)] = name
    if not paths:
        return {}
    proc = subprocess.run(
        [str(axolotl_python), "-c", LOAD_ARGS, *paths],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(axolotl_python),
    )
    assert proc.returncode == 0, _tail(proc.stderr)
    loaded = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {paths[item["path"]]: item for item in loaded}


@pytest.mark.integration
@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_trains(path, axolotl_runs, shipped_run_args):
    """Each configs/axolotl/*.yml trains 2 steps through `axolotl train` with its options as written, except the
    model, data, sizes and what a CPU cannot run (SHIPPED_CPU: flash attention -> sdpa, bf16/tf32 -> float32)."""
    written = yaml.safe_load(path.read_text())
    run = _trained(axolotl_runs[f"shipped-{path.stem}"].result())
    _check_orpo_metrics(run)
    assert all(math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0 for entry in run.steps), run.steps
    if written.get("orpo_packing") or written.get("orpo_padding_free"):
        assert all(entry["tokens/padding_fraction"] == 0 for entry in run.steps), run.steps

    # the options as the trainer received them
    saved = shipped_run_args[f"shipped-{path.stem}"]
    assert saved["class"] == "AxolotlORPOPluginConfig", saved["class"]  # orpo_plugin's trainer, not Axolotl's ORPO
    args = saved["fields"]
    for key, field in SHIPPED_ARG_FIELDS.items():
        if key in run.cfg:
            want = run.cfg[key]
            assert args[field] == want or (isinstance(want, float) and math.isclose(args[field], want)), (
                key,
                field,
                args[field],
                want,
            )

    if written.get("adapter") in ("lora", "qlora"):
        adapter = json.loads((run.out_dir / "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (
            written["lora_r"],
            written["lora_alpha"],
            written["lora_dropout"],
        ), adapter
        if written.get("lora_target_linear"):
            linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == linear, adapter["target_modules"]
        assert (run.out_dir / "adapter_model.safetensors").exists()
    else:
        assert (run.out_dir / "model.safetensors").exists()
    if written.get("load_in_4bit"):
        quant = json.loads((run.out_dir / "config.json").read_text())["quantization_config"]
        assert quant["load_in_4bit"] and quant["quant_method"] == "bitsandbytes", quant
        for key, value in (written.get("bnb_config_kwargs") or {}).items():
            assert quant[key] == value, (key, quant[key], value)


# ------------------------------------------------------------------------------ dataset types: reference and errors
def _error_cases(fixtures: Path, folder: Path) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """name -> (config, what the error must say): a bad type, and bad rows of DPO types, through the plugin's hook."""
    folder.mkdir(parents=True, exist_ok=True)

    def rows_file(name: str, rows: list[dict]) -> Path:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def fixture_rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (fixtures / "types" / f"{name}.jsonl").read_text().splitlines()]

    def config(*entries: dict, **overrides) -> dict:
        return _config(fixtures, folder, datasets=list(entries), **overrides)

    intel = fixture_rows("llama3.intel")
    intel[1]["question"] = None  # null in one row (a JSONL row without the key reads the same)
    pairs = [{k: v for k, v in r.items() if k != "prompt"} for r in fixture_rows("chatml.prompt_pairs")]
    nectar = fixture_rows("zephyr.nectar")
    nectar[3]["answers"] = nectar[3]["answers"][:1]
    passthrough = fixture_rows("passthrough.default")
    passthrough[0]["chosen"] = "  "
    argilla = fixture_rows("chat_template.argilla")
    argilla[1]["rejected"][0]["content"] = "Another question altogether."
    swapped = fixture_rows("chat_template.argilla")
    swapped[2]["chosen"] = swapped[2]["chosen"][::-1]
    # a longer conversation in row 1, for a type that reads one exchange
    chats = fixture_rows("chatml.argilla_chat")
    earlier = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    chats[1] = {k: earlier + v for k, v in chats[1].items()}
    # chat_template.argilla with a prompt column: every row's prompt is its last user turn except row 2's
    prompted = fixture_rows("chat_template.argilla")
    prompted[0] = {**prompted[0], **{k: earlier + prompted[0][k] for k in ("chosen", "rejected")}}  # multi-turn
    for row in prompted:
        row["prompt"] = row["chosen"][-2]["content"]
    disagreeing = [dict(r) for r in prompted]
    disagreeing[2]["prompt"] = "Something else entirely."
    entry = lambda name, rows=None: _dataset_entry(fixtures, name, rows)  # noqa: E731
    # a transform of one's own, as Axolotl's dotted path names it (`module.function`, a top-level module)
    (folder / "my_orpo_rows.py").write_text(
        "def pairs(cfg, **kwargs):\n"
        "    return lambda row: {'prompt': 'Q: ' + row['q'], 'chosen': ' ' + row['good'],\n"
        "                        'rejected': ' ' + row['bad']}\n"
    )
    custom = [{"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(3)]
    return {
        "unknown-type": (
            config(dict(entry("chatml.intel"), type="alpaca")),
            (
                "datasets[0].type 'alpaca'",
                "chatml.intel",
                "llama3.default",
                "zephyr.nectar",
                "chat_template.argilla",
                "user_defined.default",
                "passthrough.default",
            ),
        ),
        "unknown-function": (
            config(dict(entry("llama3.intel"), type="llama3.nonexistent")),
            ("llama3.nonexistent", "Types that work", "llama3.ultra"),
        ),
        "null-field": (config(entry("llama3.intel", rows_file("null", intel))), ("row 1: field 'question' is null",)),
        "missing-column": (
            config(entry("chatml.prompt_pairs", rows_file("missing", pairs))),
            ("row 0: field 'prompt' is missing",),
        ),
        "one-answer": (
            config(entry("zephyr.nectar", rows_file("nectar", nectar))),
            ("row 3: field 'answers'", "IndexError"),
        ),
        "empty-response": (
            config(entry("passthrough.default", rows_file("passthrough", passthrough))),
            ("row 0: field 'chosen'",),
        ),
        # Axolotl's DPO dataset schema has no message_property_mappings/roles: the rows are read with role/content,
        # as under rl: dpo, and the first row stops with its field named
        "mappings-ignored": (
            config(entry("chat_template.default+mappings"), chat_template="chatml"),
            ("row 0: field 'messages'", "KeyError"),
        ),
        "dataset-chat-template": (
            config(dict(entry("chat_template.default"), chat_template="llama3"), chat_template="chatml"),
            ("`chat_template` is set for this dataset", "'chatml'"),
        ),
        "argilla-other-prompt": (
            config(entry("chat_template.argilla", rows_file("argilla", argilla))),
            ("row 1: field 'rejected'", "differ from chosen's"),
        ),
        "argilla-turn-order": (
            config(entry("chat_template.argilla", rows_file("swapped", swapped))),
            ("row 2: field 'chosen'", "['assistant', 'user']"),
        ),
        "one-exchange-multiturn": (
            config(entry("chatml.argilla_chat", rows_file("chats", chats))),
            (
                "row 1: field 'chosen' is a conversation of 4 messages",
                "chatml.argilla_chat reads only its first exchange",
                "chat_template.argilla_chat",
            ),
        ),
        "argilla-prompt-disagrees": (
            config(entry("chat_template.argilla", rows_file("disagreeing", disagreeing))),
            ("row 2: field 'prompt' is 'Something else entirely.'", "in place of every user turn"),
        ),
        "argilla-prompt-agrees": (config(entry("chat_template.argilla", rows_file("prompted", prompted))), ()),
        "default-system-refused": (
            config(entry("chatml.argilla_chat"), default_system_message="Be brief."),
            ("default_system_message is set", "type: chatml.argilla_chat) has no system"),
        ),
        # not errors: rows already prompt/chosen/rejected under no `type:` load as given (all 4), and a transform
        # of one's own loads its 3 rows
        "no-type": (config({k: v for k, v in entry("passthrough.default").items() if k != "type"}), ()),
        "custom-transform": (
            config(dict(entry("passthrough.default", rows_file("custom", custom)), type="my_orpo_rows.pairs")),
            (),
        ),
    }


@pytest.fixture(scope="session")
def preference_data(axolotl_python, fixtures_dir, tmp_path_factory) -> dict:
    """In one venv process (integration/axolotl/preference_data.py): the dataset types the plugin finds in Axolotl,
    the rows `rl: dpo` makes of each TYPE_RUNS config tokenized by our rules, and each error case's message."""
    tmp = tmp_path_factory.mktemp("preference-data")
    spec = {"types": True, "reference": [], "errors": [], "sys_path": [str(tmp / "errors")]}
    for run in TYPE_RUNS:
        path = tmp / f"{run}.yml"
        path.write_text(yaml.safe_dump(_types_config(fixtures_dir, tmp / run, run), sort_keys=False))
        spec["reference"].append(str(path))
    for name, (cfg, _) in _error_cases(fixtures_dir, tmp / "errors").items():
        path = tmp / f"error-{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        spec["errors"].append(str(path))
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = _env(axolotl_python)
    env["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
    proc = subprocess.run(
        [str(axolotl_python), str(HERE / "preference_data.py"), str(tmp / "spec.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp,
    )
    (tmp / "preference_data.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    out = {"reference": {}, "errors": {}}
    for line in proc.stdout.splitlines():
        if line.startswith('{"mode": '):  # the script's lines (Axolotl prints other things too)
            item = json.loads(line)
            if item["mode"] == "types":
                out["types"] = item["types"]
            else:
                out[item["mode"]][Path(item["path"]).stem.removeprefix("error-")] = item
    return out


@pytest.mark.integration
def test_dataset_types_cover_every_preference_type_axolotl_ships(preference_data):
    """TYPE_RUNS train a dataset of every type the installed Axolotl ships for DPO, and its ORPO type."""
    found = preference_data["types"]
    assert found.get("chat_template.argilla") == "orpo", found
    assert {"chatml.intel", "llama3.default", "zephyr.nectar", "user_defined.default", "passthrough.default"} <= set(
        found
    ), found
    covered = {name.split("+")[0] for run in TYPE_RUNS.values() for name in run["types"]}
    assert set(found) <= covered, f"types no run trains: {sorted(set(found) - covered)}"
    fields = {
        k for run in TYPE_RUNS.values() for name in run["types"] if "+" in name for k in _dataset_entry(Path("."), name)
    }
    assert {"field_messages", "field_chosen", "field_rejected"} <= fields  # chat_template.default's field options


@pytest.mark.integration
@pytest.mark.parametrize("run_name", list(TYPE_RUNS))
def test_dataset_type_trains_as_rl_dpo_loads_it(run_name, axolotl_runs, preference_data):
    """`axolotl train` with one dataset per type: trains, and the trainer's pairs are exactly what `rl: dpo` makes of
    the same YAML (Axolotl's ORPO loader for chat_template.argilla), tokenized by orpo_plugin's rules: one BOS first,
    each response ending in one end-of-turn token, EOS not added after one."""
    run = _trained(axolotl_runs[run_name].result())
    _check_orpo_metrics(run)
    assert all(math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0 for entry in run.steps), run.steps
    received = [json.loads(line) for line in (run.out_dir / "received.jsonl").read_text().splitlines()]
    tokens = json.loads((run.out_dir / "received_tokens.json").read_text())
    assert tokens["trainer"] == "AxolotlORPOPluginTrainer", tokens
    ref = preference_data["reference"][run_name]
    names = TYPE_RUNS[run_name]["types"]
    assert len(ref["per_dataset"]) == len(names) and all(n > 0 for n in ref["per_dataset"]), (names, ref["per_dataset"])
    assert ref["stats"] == {
        "kept": sum(ref["per_dataset"]),
        "rows": sum(ref["per_dataset"]),
        "dropped": {},
        "truncated": 0,
    }, ref["stats"]
    start = 0
    for name, count in zip(names, ref["per_dataset"]):  # per type, so a failure names it
        got, want = received[start : start + count], ref["ids"][start : start + count]
        assert got == want, (name, ref["texts"][start], got[:1], want[:1])
        start += count
    assert len(received) == start
    bos, ends, blank = tokens["bos"], set(tokens["end_of_turn"]), set(tokens["whitespace"])
    assert bos is not None and tokens["eos"] in ends and len(ends) >= 2, tokens  # EOS and the template's end of turn
    for prompt, *responses in received:
        assert prompt[0] == bos and prompt.count(bos) == 1, prompt
        for response in responses:
            while response and response[-1] in blank:  # a rendered turn may end "<|im_end|>\n"
                response = response[:-1]
            assert response[-1] in ends and response[-2] not in ends, response


@pytest.mark.integration
def test_bad_argilla_row_names_the_row_and_field(axolotl_runs):
    """The argilla row whose chosen conversation lacks the user's turn: `axolotl train` stops naming row 2 and the
    field, not with Axolotl's bare AssertionError."""
    run = axolotl_runs["bad-argilla-row"].result()
    assert run.proc.returncode != 0
    assert "datasets[0]" in run.output and "row 2: field 'chosen' has the turns ['assistant']" in run.output, _tail(
        run.output
    )
    assert "AssertionError" not in run.output and "invalid number of turns" not in run.output
    assert not (run.out_dir / f"checkpoint-{STEPS}").exists()


@pytest.mark.integration
def test_packed_epochs_train_every_pair_num_epochs_times(axolotl_runs):
    """`orpo_packing: true` + num_epochs (no max_steps): every pair is trained exactly num_epochs times, for short
    pairs (many per packed micro-batch) and long ones (about one), although Axolotl counts rows / micro_batch_size
    steps per epoch; the cosine schedule's warm-up (warmup_ratio) and its end lie on the true total of steps."""
    from collections import Counter

    for name in ("epochs-short", "epochs-long"):
        run = _trained(axolotl_runs[name].result())
        out = run.out_dir
        rows = (
            [json.dumps(r) for r in (json.loads(x) for x in (out / "received.jsonl").read_text().splitlines())]
            if (out / "received.jsonl").exists()
            else None
        )
        batches = [json.loads(line) for line in (out / "seen.jsonl").read_text().splitlines()]
        seen = Counter(json.dumps(pair) for batch in batches for pair in batch)
        assert len(seen) == 16 and set(seen.values()) == {EPOCHS}, (name, sorted(seen.values()))
        assert rows is None or set(rows) == set(seen)
        logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
        steps = [entry for entry in logs if "loss" in entry]
        total = len(batches)  # one micro-batch per optimizer step (gradient_accumulation_steps 1)
        assert [entry["step"] for entry in steps] == list(range(1, total + 1)), (name, steps)
        assert total != EPOCHS * 16 // MICRO_BATCH, f"{name}: the data must pack unlike rows / micro_batch_size"
        assert steps[-1]["epoch"] == pytest.approx(EPOCHS), steps[-1]
        # Axolotl's warm-up rule on the true total (int(warmup_ratio x total), 1 read as 2), transformers' cosine;
        # the learning rate logged at step s is the one that step used (scheduler position s - 1)
        warmup = max(int(WARMUP_RATIO * total), 0)
        warmup = 2 if warmup == 1 else warmup
        want = [
            1e-3 * (s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
            for s in range(total)
        ]
        assert [entry["learning_rate"] for entry in steps] == pytest.approx(want, rel=1e-5, abs=1e-9), name


@pytest.mark.integration
def test_entry_without_a_type_loads_its_rows_as_given(preference_data):
    """A `datasets:` entry with no `type:` (rows already prompt/chosen/rejected), as Axolotl allows."""
    result = preference_data["errors"]["no-type"]
    assert result["ok"] and result["rows"] == 4, result


@pytest.mark.integration
def test_argilla_prompt_that_says_the_last_user_turn_loads(preference_data):
    """A chat_template.argilla `prompt` column equal to each row's last user turn loads every row (the conversation's
    turns are used as they are: tests/test_axolotl_rows.py); one that disagrees names the row (error cases)."""
    result = preference_data["errors"]["argilla-prompt-agrees"]
    assert result["ok"] and result["rows"] >= 3, result


@pytest.mark.integration
def test_custom_transform_by_dotted_path(preference_data):
    """`type: my_module.my_function` (Axolotl's own dotted path) loads through the plugin too."""
    result = preference_data["errors"]["custom-transform"]
    assert result["ok"] and result["rows"] == 3, result


@pytest.mark.integration
@pytest.mark.parametrize(
    "case",
    [
        "unknown-type",
        "unknown-function",
        "null-field",
        "missing-column",
        "one-answer",
        "empty-response",
        "mappings-ignored",
        "dataset-chat-template",
        "argilla-other-prompt",
        "argilla-turn-order",
        "one-exchange-multiturn",
        "argilla-prompt-disagrees",
        "default-system-refused",
    ],
)
def test_bad_dataset_type_or_row_is_named(case, preference_data, fixtures_dir, tmp_path):
    """A type that resolves nowhere lists the types that work; a bad row names the dataset, the row and the field."""
    result = preference_data["errors"][case]
    _, expected = _error_cases(fixtures_dir, tmp_path)[case]
    assert not result["ok"] and result["error_type"] == "ValueError", result
    for text in expected:
        assert text in result["error"], (text, result["error"])
    assert "AssertionError" not in result["error"]


# ----------------------------------------------------------------------------------------- the commands as written
def _tiny_config_commands() -> list[str]:
    """The commands the tiny config's header gives, verbatim (comments after them cut)."""
    lines = [line[1:].strip() for line in TINY_CONFIG.read_text().splitlines() if line.startswith("#   ")]
    return [line.split("  #")[0].strip() for line in lines]


@pytest.mark.parametrize("switches", ["as written", "HF_HUB_OFFLINE=1 only"])
def test_tiny_config_commands_run_as_written_and_exit(axolotl_python, tmp_path, switches):
    """`python integration/axolotl/fixtures.py ...` then `... axolotl train configs/axolotl/tiny-cpu-orpo.yml` from a
    checkout's root, in a shell, with nothing from this test's environment switching Axolotl's telemetry off: the
    run trains, saves and exits. With HF_HUB_OFFLINE=1 alone the plugin turns the telemetry off itself (its uploads
    could only fail, and Axolotl waits for them at exit: orpo_plugin/axolotl/telemetry.py)."""
    import shutil

    commands = _tiny_config_commands()
    assert commands == [
        "python integration/axolotl/fixtures.py outputs/axolotl-tiny",
        "AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 axolotl train configs/axolotl/tiny-cpu-orpo.yml",
    ]
    if switches != "as written":
        commands[1] = commands[1].replace("AXOLOTL_DO_NOT_TRACK=1 ", "")
    checkout = tmp_path / "checkout"  # the files the commands read, where they expect them
    shutil.copytree(HERE, checkout / "integration" / "axolotl")
    shutil.copytree(TINY_CONFIG.parent, checkout / "configs" / "axolotl")
    env = _env(axolotl_python)
    for name in (
        "AXOLOTL_DO_NOT_TRACK",
        "DO_NOT_TRACK",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        env.pop(name, None)
    for command in commands:
        try:
            proc = subprocess.run(
                ["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True, timeout=900
            )
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"{command!r} did not exit within {err.timeout} s:\n{_tail(str(err.stderr or ''))}")
        assert proc.returncode == 0, f"{command!r} failed:\n{_tail(proc.stdout + proc.stderr)}"
    out = checkout / "outputs" / "axolotl-tiny" / "run"
    assert (out / "adapter_model.safetensors").exists() or (out / "model.safetensors").exists(), sorted(
        p.name for p in out.iterdir()
    )
    turned_off = "Axolotl telemetry turned off for this run" in proc.stdout + proc.stderr
    assert turned_off == (switches != "as written")
