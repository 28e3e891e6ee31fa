"""Axolotl 0.19 end to end: the real `axolotl train` CLI with `plugins: [orpo_plugin.axolotl.ORPOPlugin]`.

Axolotl pins its own transformers/TRL, so it runs in a venv of its own, built (or reused) by
`integration/axolotl/run.sh --venv` (default `$HOME/.cache/orpo-plugin/axolotl-venv`, override ORPO_AXOLOTL_VENV).
Each run trains a tiny random-init Llama (saved locally) on a local `chat_template.argilla` JSONL for 2 steps and
reads the logged metrics from the checkpoint's trainer_state.json.

Without the venv (and no way to build it) these tests skip, or fail when ORPO_REQUIRE_INTEGRATION=1 (CI).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "integration" / "axolotl"
TINY_CONFIG = REPO / "configs" / "axolotl" / "tiny-cpu-orpo.yml"
SHIPPED_CONFIGS = sorted((REPO / "configs" / "axolotl").glob("*.yml"))
REQUIRED = os.environ.get("ORPO_REQUIRE_INTEGRATION") == "1"
STEPS = 2
PLUGIN_KEYS = ("orpo_padding_free", "orpo_packing", "orpo_packing_max_tokens", "orpo_prefix_sharing",
               "orpo_chunked_loss", "orpo_nll_on_prompt")
ORPO_METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "tokens/real")

pytestmark = pytest.mark.integration


def _unavailable(reason: str):
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
        capture_output=True, text=True, timeout=600, env=_env(axolotl_python),
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


def _train(python: Path, cfg: dict, workdir: Path) -> AxolotlRun:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    proc = subprocess.run(
        [str(python.parent / "axolotl"), "train", str(path), "--launcher", "python"],
        capture_output=True, text=True, timeout=600, cwd=workdir, env=_env(python),
    )
    run = AxolotlRun(cfg, proc, time.perf_counter() - start)
    (workdir / "axolotl.log").write_text(run.output)
    return run


def _trained(run: AxolotlRun) -> AxolotlRun:
    assert run.proc.returncode == 0, f"axolotl train failed ({run.seconds:.0f}s):\n{_tail(run.output, 80)}"
    return run


_RUNS: dict[str, AxolotlRun] = {}


@pytest.fixture(scope="session")
def train(axolotl_python, fixtures_dir, tmp_path_factory):
    """train(name, plugin=True, **yaml overrides) -> AxolotlRun, each configuration run once per session."""

    def run(name: str, plugin: bool = True, **overrides) -> AxolotlRun:
        if name not in _RUNS:
            workdir = tmp_path_factory.mktemp(f"axolotl-{name}")
            _RUNS[name] = _train(axolotl_python, _config(fixtures_dir, workdir, plugin, **overrides), workdir)
        return _RUNS[name]

    return run


def _check_orpo_metrics(run: AxolotlRun):
    steps = run.steps
    assert len(steps) == STEPS, steps
    for entry in steps:
        missing = [m for m in ORPO_METRICS if m not in entry]
        assert not missing, f"orpo_plugin metrics {missing} not logged: {entry}"
        assert all(math.isfinite(entry[m]) for m in ORPO_METRICS), entry
        assert entry["tokens/real"] > 0


# ------------------------------------------------------------------------------------------------------ tests
def test_plugin_matches_builtin_orpo_first_step(train):
    """(a) the plugin, padded layout: same first-step loss as Axolotl's own `rl: orpo` on the same data and seed."""
    ours = _trained(train("plugin-padded"))
    builtin = _trained(train("builtin", plugin=False))
    _check_orpo_metrics(ours)
    assert "tokens/real" not in builtin.steps[0]  # two different trainers: only ours logs token counts
    first, ref = ours.steps[0], builtin.steps[0]
    assert abs(first["loss"] - ref["loss"]) < 1e-4, (first, ref)
    for key in ("nll_loss", "log_odds_ratio", "rewards/accuracies"):
        assert abs(first[key] - ref[key]) < 1e-4, (key, first[key], ref[key])
    assert (ours.out_dir / "model.safetensors").exists()


def test_plugin_packing(train):
    """(b) `orpo_packing: true`: trains, logs our metrics with no padding tokens, saves the model."""
    run = _trained(train("plugin-packed", orpo_packing=True, orpo_packing_max_tokens=1024))
    _check_orpo_metrics(run)
    assert all(entry["tokens/padding_fraction"] == 0 for entry in run.steps), run.steps
    assert (run.out_dir / "model.safetensors").exists()


def test_plugin_qlora_packing(train):
    """(c) QLoRA (4-bit nf4 base, bitsandbytes on CPU) with packing: trains and saves the adapter."""
    run = _trained(
        train(
            "plugin-qlora-packed",
            orpo_packing=True,
            orpo_packing_max_tokens=1024,
            load_in_4bit=True,
            adapter="qlora",
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            lora_target_linear=True,
            learning_rate=1e-3,
        )
    )
    _check_orpo_metrics(run)
    assert (run.out_dir / "adapter_config.json").exists()
    assert (run.out_dir / "adapter_model.safetensors").exists()


def test_wrong_key_value_names_the_key(axolotl_python, fixtures_dir, tmp_path):
    """A wrong orpo_* value stops `axolotl train` with Axolotl's (pydantic) validation error naming the key."""
    cfg = _config(fixtures_dir, tmp_path, orpo_packing="maybe")
    run = _train(axolotl_python, cfg, tmp_path)
    assert run.proc.returncode != 0
    assert "orpo_packing" in run.output and "valid boolean" in run.output, _tail(run.output)
    assert not (tmp_path / "out" / f"checkpoint-{STEPS}").exists()


def test_shipped_configs_validate(axolotl_python, tmp_path):
    """Every configs/axolotl/*.yml passes Axolotl's own validator with the plugin registered; bad keys do not."""
    assert SHIPPED_CONFIGS
    bad = tmp_path / "bad.yml"
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    bad.write_text(yaml.safe_dump(dict(cfg, orpo_packing_max_tokens=1)))
    wrong_rl = tmp_path / "wrong-rl.yml"
    wrong_rl.write_text(yaml.safe_dump(dict(cfg, rl="dpo")))
    proc = subprocess.run(
        [str(axolotl_python), str(HERE / "validate_configs.py"), *map(str, SHIPPED_CONFIGS), str(bad), str(wrong_rl)],
        capture_output=True, text=True, timeout=600, env=_env(axolotl_python), cwd=REPO,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item["path"]] = item
    assert len(results) == len(SHIPPED_CONFIGS) + 2, _tail(proc.stdout + proc.stderr)
    for path in SHIPPED_CONFIGS:
        item = results[str(path)]
        assert item["ok"], f"{path.name}: {item.get('error')}"
        assert item["rl"] == "orpo" and "orpo_plugin.axolotl.ORPOPlugin" in item["plugins"], item
        assert item["orpo"].get("orpo_packing") is True, item
    assert not results[str(bad)]["ok"] and "orpo_packing_max_tokens" in results[str(bad)]["error"]
    assert not results[str(wrong_rl)]["ok"] and "rl: orpo" in results[str(wrong_rl)]["error"]
