"""Ulysses sequence parallelism on CPU: a row split over 2 ranks trains exactly like 1 process.

The real thing: `accelerate launch --config_file configs/accelerate/deepspeed-ulysses.yaml` (the shipped config as
written: ZeRO-2 and `parallelism_config_sp_size: 2`) running `python -m orpo_plugin.cli train`, with
DS_ACCELERATOR=cpu so DeepSpeed's collectives run over gloo, and `--use_cpu True`. accelerate builds DeepSpeed's
sequence-parallel groups, transformers wraps the loader in DeepSpeed's UlyssesSPDataLoaderAdapter (each rank trains
its half of every row), orpo_plugin wraps its packed-row attention in DeepSpeed's UlyssesSPAttentionHF and sums the
per-sequence log-probs, counts and NLL over the group (orpo_plugin/sequence_parallel.py).

Compared with 1 process training the same global batches per step (`FixedGroups`, as in test_deepspeed.py), at every
logged step: loss, grad norm and every metric within 1e-5 (float32), gradient checkpointing on, packing. One
pair per micro-batch, so every step's pair is longer than a rank's half of the row, and the test checks that some
trained sequence straddles the boundary between the halves. Once with 2 processes (sp 2) and once with 4
(sp 2 x dp 2, `--parallelism_config_dp_replicate_size 2`). `tokens/padding_fraction` is the one metric that differs:
on gloo every row is padded to the packing budget (gloo gathers only tensors of one size), so more padding is
computed; it is checked against that budget instead.
"""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from test_deepspeed import run_deepspeed_cpu
from test_distributed import ROOT, FixedGroups, base_args, free_port, logged
from test_fsdp import CHECKPOINTING, METRICS, assert_same_steps, steps

from orpo_plugin import cli
from orpo_plugin import sequence_parallel as sp_mod
from orpo_plugin.collators import PreferenceCollator
from orpo_plugin.vision import VisionPreferenceCollator

sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from conftest import WORDS  # noqa: E402

CONFIG = ROOT / "configs" / "accelerate" / "deepspeed-ulysses.yaml"
BUDGET = 104
RUN = dict(packing=True, packing_max_tokens=BUDGET, per_device_train_batch_size=1, **CHECKPOINTING)


@pytest.fixture(scope="module")
def long_pairs(tiny):
    """12 pairs of 4-18-word responses: at this budget each micro-batch holds one pair."""
    rng = random.Random(3)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = [
        {"prompt": words(2, 8) + ":", "chosen": " " + words(4, 18), "rejected": " " + words(4, 18)} for _ in range(12)
    ]
    (tiny / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "long.jsonl"


def launch(tiny, ds_python, data, out, processes, tmp, *launcher, **extra):
    cmd = [
        str(ds_python),
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--num_processes",
        str(processes),
        *launcher,
        "--main_process_port",
        str(free_port()),
        "-m",
        "orpo_plugin.cli",
        "train",
        *base_args(tiny, data, out, **RUN, **extra),
    ]
    run = run_deepspeed_cpu(cmd, tmp / f"sp-{processes}.log", f"{processes}-process")
    assert "each row is split across 2 ranks (DeepSpeed Ulysses)" in run.stdout + run.stderr
    return out


def one_process(tiny, data, out, world, accumulation, **extra):
    """1 process on the global grouping of `world` ranks, `accumulation` groups per step: the same batches."""
    import orpo_plugin.trainer

    original = orpo_plugin.trainer.ORPOTrainer
    FixedGroups.world = world
    orpo_plugin.trainer.ORPOTrainer = FixedGroups.trainer()
    try:
        argv = base_args(tiny, data, out, **{**RUN, "gradient_accumulation_steps": accumulation, **extra})
        assert cli.main(["train", *argv]) == 0
        return FixedGroups.groups
    finally:
        orpo_plugin.trainer.ORPOTrainer = original
        FixedGroups.world = 2


def trained_rows(tiny, data, groups, count):
    """The collated rows of the first `count` groups, as the trainer builds them (tokenised by its own code)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from orpo_plugin.data import prepare_dataset

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    prepared, _ = prepare_dataset(
        load_dataset("json", data_files=str(tiny / data))["train"], tokenizer=tok, max_length=48
    )
    collate = PreferenceCollator(tok.pad_token_id, "padding_free")
    return [collate([prepared[i] for i in group]) for group in groups[:count]]


def check_split(rows):
    """Every trained row is one pair longer than a rank's half of the row (the row is padded to the budget on gloo);
    some sequence crosses the boundary between the halves."""
    half = BUDGET // 2
    straddles = 0
    for row in rows:
        assert row["num_pairs"] == 1
        assert row["real_tokens"] > half, (row["real_tokens"], half)
        cu = row["cu_seq_lens_host"]
        straddles += sum(a < half < b for a, b in zip(cu[:-1], cu[1:]))
    assert straddles, "no trained sequence crosses the boundary between the ranks' halves"


# evaluation at the last step: under sequence parallelism it runs unsplit (accelerate's sp_disable_in_eval), each
# rank evaluating its share of whole pairs, as under DDP
EVAL = dict(eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=2)


@pytest.mark.integration
def test_sequence_parallel_2_equals_one_process(tiny, long_pairs, ds_python, tmp_path):
    got = launch(tiny, ds_python, long_pairs, tmp_path / "sp2", 2, tmp_path, **EVAL)
    groups = one_process(tiny, long_pairs, tmp_path / "one", world=2, accumulation=1, **EVAL)
    evals = [[r for r in logged(out) if "eval_loss" in r] for out in (tmp_path / "sp2", tmp_path / "one")]
    assert len(evals[0]) == len(evals[1]) == 1, evals
    assert {"eval_loss", "eval_rewards/accuracies", "eval_logps/chosen", "eval_nll_loss"} <= set(evals[1][0])
    for key, value in evals[1][0].items():
        # padding differs: under sequence parallelism the collator pads every row to a multiple of sp_size
        if key.startswith("eval_") and not key.endswith(("_runtime", "per_second", "padding_fraction")):
            assert evals[0][0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    check_split(trained_rows(tiny, long_pairs, groups, 3))
    want, got = steps(tmp_path / "one"), steps(got)
    assert "tokens/padding_fraction" in METRICS
    assert_same_steps(got, want, "sp 2", skip=("tokens/padding_fraction",))
    for step in want:  # one row per step, padded to the budget on gloo
        assert got[step]["tokens/padding_fraction"] == pytest.approx(1 - got[step]["tokens/real"] / BUDGET, abs=1e-6)


@pytest.mark.integration
def test_sequence_parallel_2_by_data_parallel_2_equals_one_process(tiny, long_pairs, ds_python, tmp_path):
    got = launch(
        tiny, ds_python, long_pairs, tmp_path / "sp2dp2", 4, tmp_path, "--parallelism_config_dp_replicate_size", "2"
    )
    groups = one_process(tiny, long_pairs, tmp_path / "one", world=4, accumulation=2)
    check_split(trained_rows(tiny, long_pairs, groups, 6))
    want = steps(tmp_path / "one")
    assert_same_steps(steps(got), want, "sp 2 x dp 2", skip=("tokens/padding_fraction",))


# ---- the row in the adapter's form, and back (no processes) ------------------------------------------------------


def test_a_row_sliced_by_the_adapter_gives_back_every_prediction(tiny, long_pairs):
    """to_sp_batch then DeepSpeed's slicing (shift, then halves) then local_batch: each half's predictions, shifted
    back, are the row's, with their targets, sequences and flags; the boundaries and counts stay the whole row's."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from orpo_plugin.data import prepare_dataset

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    prepared, _ = prepare_dataset(
        load_dataset("json", data_files=str(tiny / long_pairs))["train"], tokenizer=tok, max_length=48
    )
    collate = PreferenceCollator(tok.pad_token_id, "padding_free", pad_to_multiple_of=sp_mod.pad_multiple(None, 2))
    row = collate([prepared[0], prepared[1]])
    padded = sp_mod.pad_row(row, 192, tok.pad_token_id)
    full = sp_mod.to_sp_batch(padded, 2)
    width = full["input_ids"].shape[1]
    assert width == 192 and full["cu_seq_lens_host"][-1] == 192
    shift = torch.nn.functional.pad(full["labels"], (0, 1), value=-100)[:, 1:]  # what the adapter does
    got = {k: [] for k in ("pos", "target", "seq", "nll", "c", "r")}
    for rank in range(2):
        half = slice(rank * width // 2, (rank + 1) * width // 2)
        shard = {k: v[:, half] if isinstance(v, torch.Tensor) else v for k, v in full.items() if k != "labels"}
        shard["shift_labels"] = shift[:, half]
        local = sp_mod.local_batch(shard)
        assert local["cu_seq_lens_q"].tolist() == full["cu_seq_lens_host"]
        assert local["nll_tokens"] == row["nll_tokens"] and local["num_pairs"] == 2
        got["pos"] += (local["pred_pos"] + rank * width // 2).tolist()
        got["target"] += local["pred_target"].tolist()
        got["seq"] += local["pred_seq"].tolist()
        got["nll"] += local["pred_nll"].tolist()
        got["c"] += local["pred_in_logits_chosen"].tolist()
        got["r"] += local["pred_in_logits_rejected"].tolist()
    assert got["pos"] == row["pred_pos"].tolist()
    assert got["target"] == row["pred_target"].tolist()
    assert got["seq"] == row["pred_seq"].tolist()
    assert got["nll"] == row["pred_nll"].tolist()
    assert got["c"] == row["pred_in_logits_chosen"].tolist() and got["r"] == row["pred_in_logits_rejected"].tolist()


def test_a_row_longer_than_the_fixed_length_is_refused_by_name():
    row = {"input_ids": torch.zeros(1, 10, dtype=torch.long)}
    with pytest.raises(ValueError, match="a row of 10 tokens is longer than the fixed row length 8; raise packing"):
        sp_mod.pad_row(row, 8, 0)


# ---- refusals at start (the trainer's attributes, no processes) --------------------------------------------------


def fake_trainer(layout="padding_free", stage=2, heads=4, kv=2, override="orpo_sdpa", world=2, replicate=1, **kw):
    from accelerate import ParallelismConfig

    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, _attn_implementation="sdpa")
    model = SimpleNamespace(config=config)
    pc = ParallelismConfig(sp_size=2, sp_backend="deepspeed", dp_replicate_size=replicate)
    accelerator = SimpleNamespace(
        parallelism_config=pc,
        num_processes=world,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
    )
    fields = dict(
        args=SimpleNamespace(layout=layout, attention_backend="torch_varlen" if override == "orpo_varlen" else "auto"),
        is_deepspeed_enabled=True,
        accelerator=accelerator,
        model=model,
        attention_override=override,
        logits_in_forward=False,
        data_collator=PreferenceCollator(0, layout),
    )
    fields.update(kw)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(layout="padded"), r"the padded layout cannot be split .* Set packing=True"),
        (dict(layout="prefix_sharing"), r"the prefix_sharing layout cannot be split \(one position predicts"),
        (dict(stage=3), r"with ZeRO stage 3: .* Use zero_stage 2"),
        (dict(heads=3, kv=3), r"3 attention heads and 3 key/value heads.*sp_size must divide"),
        (dict(heads=4, kv=3), r"4 attention heads and 3 key/value heads"),
        (dict(override=None), r"the model's own attention \(sdpa\) would take the packed row"),
        (
            dict(override="orpo_varlen"),
            r"attention_backend='torch_varlen' gives orpo_varlen, which is not verified .* Set",
        ),
        (
            dict(world=4),
            r"4 processes, but the parallelism config accounts for 2 .* --parallelism_config_dp_replicate_size 2",
        ),
        (dict(is_deepspeed_enabled=False), r"runs through DeepSpeed"),
        (dict(logits_in_forward=True), r"computes its logits inside its forward"),
        (dict(data_collator=object()), r"needs orpo_plugin's PreferenceCollator, got object"),
        (
            dict(data_collator=VisionPreferenceCollator(None, 0, frozenset(), "padding_free")),
            r"but not its images' vision inputs: pairs with images train without sequence parallelism",
        ),
    ],
)
def test_what_sequence_parallelism_cannot_split_is_refused_at_start(change, message):
    if change.get("layout") == "padded":
        change = {**change, "data_collator": PreferenceCollator(0, "padded")}
    if change.get("layout") == "prefix_sharing":
        change = {**change, "data_collator": PreferenceCollator(0, "prefix_sharing")}
    with pytest.raises(ValueError, match=message):
        sp_mod.check_supported(fake_trainer(**change), 2)


def test_a_supported_setup_passes_the_start_checks():
    sp_mod.check_supported(fake_trainer(), 2)
    sp_mod.check_supported(fake_trainer(world=4, replicate=2), 2)
    sp_mod.check_supported(fake_trainer(heads=4, kv=1), 2)  # one key/value head, replicated by Ulysses
