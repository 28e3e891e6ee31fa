"""DeepSpeed ZeRO-3 and ZeRO-2 on CPU: 2 gloo processes train exactly like 1 process, the chunked loss kept.

The real thing, no stand-in: `accelerate launch --config_file configs/accelerate/deepspeed-zero3.yaml` (the shipped
config as written: ZeRO stage 3, `zero3_init_flag`, 16-bit save) and `deepspeed-zero2.yaml` (stage 2, as written),
with DS_ACCELERATOR=cpu, so DeepSpeed's CPU accelerator runs its collectives over gloo (oneCCL is not installed); the
training runs pass `--use_cpu True` as on any CPU. Nothing in accelerate, transformers or DeepSpeed is changed:
accelerate's DeepSpeed plugin builds the DeepSpeedEngine; under ZeRO-3 transformers partitions the model while
loading it (zero.Init) and DeepSpeed gathers each module's parameters around its forward, reduce-scatters gradients
and steps a partitioned optimizer; under ZeRO-2 the parameters stay whole and gradients and optimizer state are
partitioned.
tests/distributed/deepspeed_cpu.py records, per run, how the trained model was held (ZeRO stage, partitioned or not) and
that orpo_plugin's chunked loss ran (under ZeRO-3 inside the output layer's forward, by forward redirection, while the
weight was an empty placeholder outside it). DeepSpeed comes from a venv built on first use by
tests/distributed/deepspeed_env.py (DeepSpeed only, over this interpreter's packages); without it these tests skip, or
fail when ORPO_REQUIRE_INTEGRATION=1 (CI).

The 1-process references and the global batches per step are built as in tests/distributed/test_distributed.py (its module
docstring explains how): padded and padding-free runs cover the whole 8-pair dataset every step; packed runs use the
2-rank global grouping through `FixedGroups`. Gradient checkpointing is on in every run (the default a user gets).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_distributed import ROOT, FixedGroups, base_args, free_port, run_two_processes
from test_fsdp import CHECKPOINTING, LORA, PACKED, assert_same_steps, steps

from orpo_plugin import cli

sys.path.insert(0, str(ROOT / "tests" / "distributed"))

CONFIGS = {stage: ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml" for stage in (2, 3)}
DENSE = dict(gradient_accumulation_steps=2)
CHUNK = dict(loss_chunk_size=16)  # several chunks per micro-batch (the default makes one chunk at this vocabulary)
RUNS = {
    "padded": ("batch8.jsonl", dict(**DENSE)),
    "packing": ("packed.jsonl", dict(**PACKED, **CHUNK)),
    "prefix_sharing": ("packed.jsonl", dict(prefix_sharing=True, **PACKED)),
    "lora": ("batch8.jsonl", dict(padding_free=True, **DENSE, **LORA, **CHUNK)),
}
ZERO2_RUNS = ("padded", "packing")  # ZeRO-2 leaves the model whole: the layouts' code paths are those of 1 process


def ds_args(tiny, data, out, **kw):
    return base_args(tiny, data, out, **{**CHECKPOINTING, **kw})


def launch(tiny, ds_python, stage, names, tmp):
    """One 2-process DeepSpeed launch of the shipped stage-`stage` config holding the runs `names` (start-up paid once).

    Returns the folder holding each run's output folder."""
    two = tmp / "two"
    runs = [ds_args(tiny, RUNS[name][0], two / name, **RUNS[name][1]) for name in names]
    (tmp / "runs.json").write_text(json.dumps(runs))
    cmd = [
        str(ds_python),
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS[stage]),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests/distributed/deepspeed_cpu.py"),
        str(tmp / "runs.json"),
        str(tmp / "info.json"),
    ]
    run_deepspeed_cpu(cmd, tmp / "deepspeed.log", f"ZeRO-{stage}")
    assert json.loads((tmp / "info.json").read_text()) == {"world_size": 2, "backend": "gloo"}
    return two


def run_deepspeed_cpu(cmd: list[str], log, what: str):
    """A 2-process DeepSpeed launch on the CPU (gloo, `DS_ACCELERATOR=cpu`, offline); its output written to `log`; a
    failure fails the test with the traceback (or the output's end), named by `what`."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    run = run_two_processes(cmd, env)
    log.write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        lines = (run.stdout + run.stderr).splitlines()
        start = next((i for i, line in enumerate(lines) if "Traceback" in line), max(len(lines) - 60, 0))
        pytest.fail(f"{what} launch failed ({run.returncode}):\n" + "\n".join(lines[start : start + 80]))
    return run


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The 1-process references (no DeepSpeed), the same global batch per step as the 2-process runs."""
    one = tmp_path_factory.mktemp("one_process")
    for name in ("padded", "lora"):
        data, kw = RUNS[name]
        assert cli.main(["train", *ds_args(tiny, data, one / name, **{**kw, "per_device_train_batch_size": 4})]) == 0
    import orpo_plugin.trainer

    original = orpo_plugin.trainer.ORPOTrainer
    orpo_plugin.trainer.ORPOTrainer = FixedGroups.trainer()
    try:
        for name in ("packing", "prefix_sharing"):
            data, kw = RUNS[name]
            argv = ds_args(tiny, data, one / name, **{**kw, "gradient_accumulation_steps": 2})
            assert cli.main(["train", *argv]) == 0
            assert len(FixedGroups.groups) >= 2 * 3, "3 steps must stay inside epoch 0"
    finally:
        orpo_plugin.trainer.ORPOTrainer = original
    return one


@pytest.fixture(scope="module")
def zero3_runs(tiny, ds_python, one_process, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    return launch(tiny, ds_python, 3, list(RUNS), tmp), one_process


@pytest.fixture(scope="module")
def zero2_runs(tiny, ds_python, one_process, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    return launch(tiny, ds_python, 2, ZERO2_RUNS, tmp), one_process


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_zero3_trainer_equals_one_process(zero3_runs, name):
    """Loss, grad norm and every logged metric of each step within 1e-5 of 1 process (float32)."""
    two, one = zero3_runs
    info = json.loads((two / name / "deepspeed.json").read_text())
    assert info["engine"] == "DeepSpeedEngine" and info["zero_stage"] == 3, info
    assert info["all_params_partitioned"] and info["partitioned_at_init"], info  # zero.Init while loading
    assert info["head_local_numel"] * 2 == info["head_numel"], info  # each rank holds half the output layer
    # the chunked loss, inside the output layer's forward: an empty placeholder before the call, whole inside it
    assert info["chunk_size"] and not info["logits_in_forward"], "the chunked loss must run under ZeRO-3"
    assert info["head_owner"] == "Linear" and info["head_redirected_calls"] >= info["global_steps"], info
    assert ["NOT_AVAILABLE", 0] in info["head_outside_forward"], info
    assert info["head_inside_forward"] == [["AVAILABLE", info["head_numel"]]], info
    assert info["gradient_checkpointing"], info
    # padded: each rank pads its own 2 pairs, the 1-process run its 4, so only the padding fraction may differ
    skip = ("tokens/padding_fraction",) if name == "padded" else ()
    assert_same_steps(steps(two / name), steps(one / name), name, skip=skip)


@pytest.mark.integration
def test_zero3_saves_the_whole_model(zero3_runs):
    """`zero3_save_16bit_model: true`: the saved weights are whole (gathered from both ranks) and equal 1 process's."""
    from safetensors.torch import load_file

    two, one = zero3_runs
    got, want = load_file(two / "padded" / "model.safetensors"), load_file(one / "padded" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert (got[key] - value).abs().max().item() < 1e-5, key


@pytest.mark.integration
@pytest.mark.parametrize("name", ZERO2_RUNS)
def test_zero2_trainer_equals_one_process(zero2_runs, name):
    """The shipped ZeRO-2 config: loss, grad norm and every logged metric of each step within 1e-5 of 1 process."""
    two, one = zero2_runs
    info = json.loads((two / name / "deepspeed.json").read_text())
    assert info["engine"] == "DeepSpeedEngine" and info["zero_stage"] == 2, info
    assert not info["all_params_partitioned"] and not info["partitioned_at_init"], info  # parameters stay whole
    assert info["head_local_numel"] == info["head_numel"], info
    assert info["chunk_size"] and not info["logits_in_forward"], "the chunked loss must run under ZeRO-2"
    assert info["head_redirected_calls"] == 0, info  # an ordinary weight: no forward redirection needed
    assert info["gradient_checkpointing"], info
    skip = ("tokens/padding_fraction",) if name == "padded" else ()
    assert_same_steps(steps(two / name), steps(one / name), name, skip=skip)
