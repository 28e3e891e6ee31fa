"""Two processes (DDP over gloo, on CPU) train exactly like one process over the same global batch.

How the global batches are made equal, by construction rather than by trusting two shufflers to agree:

- padded / padding_free: the dataset holds exactly one global batch (2 ranks x 2 pairs x 2 accumulated
  micro-batches = 8 pairs), so every optimizer step of the 2-process run covers the whole dataset, whatever order
  the sampler picks and however accelerate shards it. The 1-process run uses 4 pairs per micro-batch and the same
  accumulation, so its every step also covers the whole dataset. The loss of a step is a sum over pairs and NLL
  tokens divided by their totals, so the order inside a step does not matter. If the two ranks did not get
  disjoint halves, or normalised by their own totals instead of the global ones, step 1 would differ; if DDP did
  not average the gradients into the global one, steps 2 and 3 would.
- packing: every rank computes the same global grouping (pack_groups + balance_for_ranks, seeded) and takes
  groups[rank::2], so step s of the 2-process run (1 micro-batch per rank) trains on groups 2s and 2s+1. The
  reference is the same CLI run in one process with 2 accumulated micro-batches, whose sampler is replaced by the
  2-rank global grouping (the only change: a 1-process sampler would not split a group for balance). The data is
  chosen so that first-fit-decreasing gives an odd number of groups: balance_for_ranks must split one, and the
  ranks' micro-batches differ in pairs and tokens ("uneven"). A second packed case has a single pair, which both
  ranks then train on (repeated, as DistributedSampler pads). A hang fails the subprocess timeout.

The per-step `loss` compared is what the CLI writes to <output_dir>/metrics.jsonl on the main process (the mean
over ranks of each rank's summed micro-batch losses; with our normalisation that is the global batch's loss), and
so is `grad_norm` (the norm of the gradient after DDP's average, before clipping): each rank scales its micro-batch
losses by world_size / global totals, so DDP's average is the gradient of the global batch's loss.
Note: `accelerate launch --num_processes 2 --cpu` starts ONE process in accelerate 1.x (its simple launcher; several
CPU processes need mpirun). Two CPU processes come from the multi-GPU launcher (torchrun) with `--use_cpu True` in
the training flags: here through the shipped configs/accelerate/ddp.yaml, and through `--multi_gpu`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_plugin import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds per launch; a rank that hangs fails here


def base_args(tiny, data, out, **kw):
    args = {
        "model_name_or_path": str(tiny / "model"),
        "dataset_name": str(tiny / data),
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 48,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "bf16": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


# evaluation with generations after every step (the eval set is the training file)
GENERATE = dict(
    eval_strategy="steps",
    eval_steps=1,
    generate_during_eval=True,
    per_device_eval_batch_size=1,
    max_completion_length=4,
)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def logged(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl", encoding="utf-8")]


def losses(out):
    return [(r["step"], r["loss"], r["epoch"]) for r in logged(out) if "loss" in r]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_KILLED = re.compile(r"exitcode\s*:\s*-(6|11)\b.*\(SIG(ABRT|SEGV)\)")


def run_two_processes(cmd, env) -> subprocess.CompletedProcess:
    """Run a 2-process launch; once more if a worker was killed by SIGSEGV/SIGABRT.

    gloo on CPU (torch 2.13) now and then kills a worker with a signal outside any of our code (measured on
    tests/distributed/fsdp_head.py under load: 3 of 45 launches, a SIGSEGV mid-run or an abort at exit). Such a launch
    is repeated once, said on stderr; any other failure, and a second signal death, fail the test.
    """
    for attempt in (1, 2):
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as err:  # a hung rank
            pytest.fail(f"2-process run did not finish in {TIMEOUT}s:\n{(err.stderr or b'')[-3000:]}")
        if run.returncode == 0 or attempt == 2 or not _KILLED.search(run.stdout + run.stderr):
            return run
        print(
            f"2-process run: a worker was killed by a signal; launching once more:\n{run.stderr[-1500:]}",
            file=sys.stderr,
        )
    return run


def launch(launcher_args, script, log):
    """`accelerate launch <launcher_args> --num_processes 2 ... <script...>` (the script and its flags come last)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher_args,
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *script,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = run_two_processes(cmd, env)
    Path(log).write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        lines = (run.stdout + run.stderr).splitlines()
        errors = [i for i, line in enumerate(lines) if "Traceback" in line]
        start = errors[0] if errors else max(len(lines) - 60, 0)
        pytest.fail(f"2-process run failed ({run.returncode}):\n" + "\n".join(lines[start : start + 80]))


class FixedGroups:
    """Swaps the packed sampler of a 1-process ORPOTrainer for the global grouping a 2-rank run trains on."""

    world = 2

    @classmethod
    def trainer(cls):
        from torch.utils.data import DataLoader

        from orpo_plugin.collators import pair_cost
        from orpo_plugin.packing import PackedBatchSampler, pack_groups
        from orpo_plugin.trainer import ORPOTrainer

        class FixedGroupsTrainer(ORPOTrainer):
            def get_train_dataloader(self):
                ds = self.train_dataset
                columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
                lengths = [pair_cost(f, self.args.layout) for f in ds.select_columns(columns)]
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                budget, window = self.args.packing_budget(), self.args.packing_window
                sampler = PackedBatchSampler(lengths, budget, seed=seed, window=window, num_replicas=cls.world, rank=0)
                cls.groups = sampler.groups  # epoch 0, the global order: rank r takes groups[r::world]
                cls.single_rank_groups = pack_groups(lengths, budget, seed=seed, epoch=0, window=window)
                loader = DataLoader(ds, batch_sampler=cls.groups, collate_fn=self.data_collator)
                return self.accelerator.prepare(loader)

        return FixedGroupsTrainer


def test_two_processes_equal_one_process_per_step(tiny, tmp_path, monkeypatch):
    two = tmp_path / "two"
    # --- 2 processes. Packed, uneven groups: the shipped DDP config + `python -m orpo_plugin.cli train`.
    packed_kw = dict(packing=True, packing_max_tokens=104, per_device_train_batch_size=1)
    launch(
        ["--config_file", str(ROOT / "configs/accelerate/ddp.yaml")],
        ["-m", "orpo_plugin.cli", "train", *base_args(tiny, "packed.jsonl", two / "packing", **packed_kw)],
        tmp_path / "packing.log",
    )
    # Padded, padding-free and a single packed pair, in one launch (tests/distributed/cli_runs.py calls cli.main).
    dense_kw = dict(gradient_accumulation_steps=2)
    runs = [
        base_args(tiny, "batch8.jsonl", two / "padded", **dense_kw),
        base_args(tiny, "batch8.jsonl", two / "padding_free", padding_free=True, **dense_kw),
        base_args(tiny, "single.jsonl", two / "single", packing=True, max_steps=2, **GENERATE),
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    launch(
        ["--multi_gpu"],
        [str(ROOT / "tests/distributed/cli_runs.py"), str(tmp_path / "runs.json"), str(tmp_path / "info.json")],
        tmp_path / "dense.log",
    )
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"world_size": 2, "backend": "gloo"}

    # --- 1 process, same global batch per step.
    one = tmp_path / "one"
    for layout, extra in (("padded", {}), ("padding_free", {"padding_free": True})):
        assert (
            cli.main(
                [
                    "train",
                    *base_args(
                        tiny,
                        "batch8.jsonl",
                        one / layout,
                        per_device_train_batch_size=4,
                        gradient_accumulation_steps=2,
                        **extra,
                    ),
                ]
            )
            == 0
        )
    import orpo_plugin.trainer

    monkeypatch.setattr(orpo_plugin.trainer, "ORPOTrainer", FixedGroups.trainer())
    assert (
        cli.main(
            [
                "train",
                *base_args(tiny, "packed.jsonl", one / "packing", **{**packed_kw, "gradient_accumulation_steps": 2}),
            ]
        )
        == 0
    )
    packing_groups = FixedGroups.groups
    assert len(FixedGroups.single_rank_groups) % 2 == 1, "test data must give an odd number of groups"
    assert len(packing_groups) >= 2 * 3, "3 steps must stay inside epoch 0"
    sizes = [len(g) for g in packing_groups]
    assert len(set(sizes)) > 1, "the ranks' micro-batches should differ in size"
    assert (
        cli.main(
            [
                "train",
                *base_args(
                    tiny,
                    "single.jsonl",
                    one / "single",
                    packing=True,
                    max_steps=2,
                    gradient_accumulation_steps=2,
                    **GENERATE,
                ),
            ]
        )
        == 0
    )
    assert FixedGroups.groups == [[0], [0]]  # the single pair, once per rank

    for name in ("padded", "padding_free", "packing", "single"):
        got, want = losses(two / name), losses(one / name)
        assert [s for s, _, _ in got] == [s for s, _, _ in want] and len(got) >= 2, name
        for (step, a, _), (_, b, _) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-5), f"{name} step {step}: 2 processes {a} vs 1 process {b}"
        assert len({round(b, 6) for _, b, _ in want}) == len(want), f"{name}: the loss should change every step"
        # the gradient DDP averaged equals the 1-process one (Adam and clipping would hide a constant factor)
        pairs = zip(logged(two / name), logged(one / name))
        for a, b in [(x["grad_norm"], y["grad_norm"]) for x, y in pairs if "loss" in x]:
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"{name}: grad norm {a} vs {b}"
    # generate_during_eval under 2 processes: rank 0 writes what 1 process generates from the same weights
    for step in (1, 2):
        got, want = (read_jsonl(run / "single" / "generations" / f"step-{step}.jsonl") for run in (two, one))
        assert len(got) == 1 and got == want, f"step {step}"
    # One step per epoch proves the 2-process dense runs shared the 8 pairs: 1 process with 2 pairs x 2 would need 2.
    assert [e for _, _, e in losses(two / "padded")] == [1.0, 2.0, 3.0]


def test_module_entry_point_is_the_console_script():
    """`python -m orpo_plugin.cli` and `orpo-plugin` run the same main()."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "orpo-plugin"]
    assert ep.value == "orpo_plugin.cli:main"


def test_shipped_accelerate_configs_load_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    folder = ROOT / "configs/accelerate"
    expected = {
        "ddp.yaml": (DistributedType.MULTI_GPU, None),
        "fsdp.yaml": (DistributedType.FSDP, None),
        "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 2),
        "deepspeed-zero3.yaml": (DistributedType.DEEPSPEED, 3),
        "deepspeed-ulysses.yaml": (DistributedType.DEEPSPEED, 2),
    }
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(expected)
    launch_options = {a.dest for a in launch_command_parser()._actions}
    for name, (kind, zero_stage) in expected.items():
        path = folder / name
        config = load_config_from_file(str(path))
        assert isinstance(config, ClusterConfig) and config.distributed_type == kind, name
        assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu, name
        assert config.mixed_precision == "no", f"{name}: precision must come from the training config"
        # nested keys are not checked by the loader: each must be a `accelerate launch` option
        for key in [*config.fsdp_config, *config.deepspeed_config, *(config.parallelism_config or {})]:
            assert key in launch_options, f"{name}: unknown key {key}"
        if zero_stage is not None:
            assert config.deepspeed_config.get("zero_stage") == zero_stage, name
        header = path.read_text().splitlines()[0]
        if kind != DistributedType.MULTI_GPU:
            assert header.startswith("# GPU-only"), name
        text = path.read_text()
        if name in ("fsdp.yaml", "deepspeed-zero3.yaml"):  # say how the output layer is reached
            assert "inside the forward" in text, name
        if name != "ddp.yaml":  # say what was tested, and where
            assert "CPU only" in text or "UNTESTED" in text, name
    fsdp = load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ulysses = load_config_from_file(str(folder / "deepspeed-ulysses.yaml")).parallelism_config
    assert ulysses == {"parallelism_config_sp_size": 2, "parallelism_config_sp_backend": "deepspeed"}
    for name, stage in (("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3), ("deepspeed-ulysses.yaml", 2)):
        ds = load_config_from_file(str(folder / name)).deepspeed_config
        assert ds["zero_stage"] == stage
        assert "gradient_accumulation_steps" not in ds, "left to the training config ('auto')"
