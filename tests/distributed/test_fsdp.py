"""FSDP2 on CPU: 2 gloo processes train exactly like 1 process, with the chunked loss kept under sharding.

Two levels, each said where it is used:

- test_fsdp2_trainer_*: the real ORPOTrainer under accelerate's FSDP2 plugin (`fsdp2_prepare_model`: `fully_shard`
  per decoder layer, the [final norm, output layer] group and the root; the sharded optimizer; DTensor gradient
  clipping; torch.distributed.checkpoint saves), launched like tests/distributed/test_distributed.py. accelerate 1.15 enables
  FSDP only for GPU-type setups, so tests/distributed/fsdp_cpu.py changes that one decision for CPU processes, in the
  test only; everything after it is accelerate's and transformers' code. The helper also records, per run, that the
  trained model was an FSDP2 root with its output layer sharded and the chunked loss on (not the fallback).
- test_fsdp2_output_layer_*: `fully_shard` applied directly to a model (decoder layers + root) to try every place
  the output layer can sit (root group, own group, accelerate's kept-gathered tail group; tied or not; frozen or not).

The 1-process references and the global batches per step are built as in tests/distributed/test_distributed.py (its module
docstring explains how): padded and padding-free runs cover the whole 8-pair dataset every step; packed runs use the
2-rank global grouping through `FixedGroups`.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_distributed import (
    ROOT,
    FixedGroups,
    base_args,
    free_port,
    launch,
    logged,
    run_two_processes,
)

from orpo_plugin import cli

FSDP = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": json.dumps(
        {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
        }
    ),
}
CHECKPOINTING = {"gradient_checkpointing": True}
LORA = {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "all-linear"}
PACKED = dict(packing=True, packing_max_tokens=104, per_device_train_batch_size=1)
METRICS = [
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "tokens/real",
    "tokens/padding_fraction",
]


def fsdp_args(tiny, data, out, **kw):
    args = base_args(tiny, data, out, **{**CHECKPOINTING, **kw})
    return args + [x for k, v in FSDP.items() for x in (f"--{k}", v)]


def steps(out):
    return {r["step"]: r for r in logged(out) if "loss" in r}


def assert_same_steps(got, want, name, upto=None, skip=()):
    keys = sorted(s for s in want if upto is None or s <= upto)
    assert keys and all(s in got for s in keys), f"{name}: steps {sorted(got)} vs {keys}"
    for s in keys:
        for m in [m for m in METRICS if m not in skip] + [k for k in want[s] if k.startswith("tokens/computed")]:
            assert got[s][m] == pytest.approx(want[s][m], rel=1e-5, abs=1e-5), (
                f"{name} step {s} {m}: {got[s][m]} vs {want[s][m]}"
            )
    losses = [want[s]["loss"] for s in keys]
    assert len(set(round(x, 6) for x in losses)) == len(losses), f"{name}: the loss should change every step"


@pytest.fixture(scope="module")
def fsdp_runs(tiny, tmp_path_factory):
    """One 2-process FSDP2 launch holding every run (start-up paid once), and the 1-process references."""
    tmp = tmp_path_factory.mktemp("fsdp")
    two, one = tmp / "two", tmp / "one"
    dense = dict(gradient_accumulation_steps=2)
    runs = {
        "padded": fsdp_args(tiny, "batch8.jsonl", two / "padded", **dense),
        "packing": fsdp_args(tiny, "packed.jsonl", two / "packing", max_steps=4, **PACKED),
        "prefix_sharing": fsdp_args(tiny, "packed.jsonl", two / "prefix_sharing", prefix_sharing=True, **PACKED),
        "lora": fsdp_args(tiny, "batch8.jsonl", two / "lora", padding_free=True, **dense, **LORA),
        # checkpoint at step 2 (sharded, torch.distributed.checkpoint), then resume to step 4
        "first_half": fsdp_args(
            tiny, "packed.jsonl", two / "resumed", max_steps=2, save_strategy="steps", save_steps=2, **PACKED
        ),
        "resumed": fsdp_args(
            tiny,
            "packed.jsonl",
            two / "resumed",
            max_steps=4,
            resume_from_checkpoint=str(two / "resumed" / "checkpoint-2"),
            **PACKED,
        ),
    }
    (tmp / "runs.json").write_text(json.dumps(list(runs.values())))
    launch(
        ["--multi_gpu"],
        [str(ROOT / "tests/distributed/fsdp_cpu.py"), str(tmp / "runs.json"), str(tmp / "info.json")],
        tmp / "fsdp.log",
    )
    assert json.loads((tmp / "info.json").read_text()) == {"world_size": 2, "backend": "gloo"}

    # 1 process, no sharding, the same global batch per step
    for name, extra in (("padded", {}), ("lora", dict(padding_free=True, **LORA))):
        assert (
            cli.main(
                [
                    "train",
                    *base_args(
                        tiny,
                        "batch8.jsonl",
                        one / name,
                        per_device_train_batch_size=4,
                        **{**dense, **CHECKPOINTING, **extra},
                    ),
                ]
            )
            == 0
        )
    import orpo_plugin.trainer

    original = orpo_plugin.trainer.ORPOTrainer
    orpo_plugin.trainer.ORPOTrainer = FixedGroups.trainer()
    try:
        for name, extra in (("packing", {}), ("prefix_sharing", {"prefix_sharing": True})):
            assert (
                cli.main(
                    [
                        "train",
                        *base_args(
                            tiny,
                            "packed.jsonl",
                            one / name,
                            **{**PACKED, **CHECKPOINTING, **extra, "gradient_accumulation_steps": 2},
                        ),
                    ]
                )
                == 0
            )
            assert len(FixedGroups.groups) >= 2 * 3, "3 steps must stay inside epoch 0"
    finally:
        orpo_plugin.trainer.ORPOTrainer = original
    return two, one


@pytest.mark.parametrize("name", ["padded", "packing", "prefix_sharing", "lora"])
def test_fsdp2_trainer_equals_one_process(fsdp_runs, name):
    two, one = fsdp_runs
    info = json.loads((two / name / "sharding.json").read_text())
    assert info["fsdp2_root"] and info["sharded_layers"] >= 3, info  # 2 decoder layers + root (+ accelerate's groups)
    assert info["head_weight_sharded"] and info["head_local_rows"] < info["vocab_size"], info
    assert info["chunk_size"] and not info["logits_in_forward"], "the chunked loss must run under FSDP2"
    assert info["gradient_checkpointing"] and info["peft"] == (name == "lora"), info
    # padded: each rank pads its own 2 pairs, the 1-process run its 4, so only the padding fraction may differ
    skip = ("tokens/padding_fraction",) if name == "padded" else ()
    assert_same_steps(steps(two / name), steps(one / name), name, upto=3, skip=skip)


def test_fsdp2_trainer_resumes_from_a_sharded_checkpoint(fsdp_runs):
    """Save at step 2 (sharded state through torch.distributed.checkpoint), resume: steps 3-4 as if uninterrupted,
    with the packed order restored (step 4 begins the next epoch's grouping)."""
    two, _ = fsdp_runs
    checkpoint = two / "resumed" / "checkpoint-2"
    shards = list(checkpoint.rglob("*.distcp"))
    assert len(shards) >= 2, f"expected one torch.distributed.checkpoint shard file per rank in {checkpoint}"
    assert not list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("pytorch_model.bin"))
    full = steps(two / "packing")
    resumed = {s: r for s, r in steps(two / "resumed").items() if s > 2}
    assert sorted(resumed) == [3, 4]
    assert_same_steps(resumed, {s: full[s] for s in (3, 4)}, "resumed")


def test_fsdp2_output_layer_everywhere_it_can_be_sharded(tmp_path):
    """Forward redirection: log-probs and every gradient equal the unsharded model's (see tests/distributed/fsdp_head.py)."""
    result = tmp_path / "head.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests/distributed/fsdp_head.py"),
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = run_two_processes(cmd, env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    cases = json.loads(result.read_text())
    assert len(cases) == 20
    owners = {c["owner"] for c in cases.values()}
    assert owners == {"root", "FSDPLinear"}
    for key, c in cases.items():
        assert c["logps"] <= 1e-5 and c["grad"] <= 1e-5, (key, c)
        assert c["head_grad"] == ("frozen=False" in key), (key, c)
