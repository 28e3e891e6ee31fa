"""Run `orpo_plugin.cli train` under accelerate's DeepSpeed plugin (ZeRO stage 2 or 3) on CPU processes, for the tests.

    DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate/deepspeed-zero3.yaml --num_processes 2 \
        tests/distributed/deepspeed_cpu.py RUNS.json INFO.json

Nothing is changed in accelerate, transformers or DeepSpeed: DeepSpeed's CPU accelerator communicates over gloo
(oneCCL is not installed), accelerate's DeepSpeed plugin builds the engine, and under ZeRO-3 transformers partitions
the model at load time (zero.Init, `zero3_init_flag`). This helper runs tests/distributed/cli_runs.py's list of training
runs and, after each, has the main process write <output_dir>/deepspeed.json: what the trained model looked like (a
DeepSpeed engine and its ZeRO stage, whether every parameter was partitioned and whether it already was before the
trainer wrapped it, the output layer's local and whole sizes, the chunked loss on, how many times the loss ran inside
the output layer's forward (forward redirection) and what the weight was outside and inside it, gradient
checkpointing), so a test can check that the run it compares really ran as the config says.
"""

from __future__ import annotations

import sys
from pathlib import Path


def record_partitioning() -> None:
    import json

    import orpo_plugin.sharded_head as sharded_head
    from orpo_plugin.sharded_head import sharded_head_owner, unwrap
    from orpo_plugin.trainer import ORPOTrainer

    redirected = {"calls": 0, "outside": set(), "inside": set()}
    call_in_forward = sharded_head.call_in_forward

    def counting_call_in_forward(module, fn, *args, **kwargs):
        weight = getattr(module, "weight", None)
        if getattr(weight, "ds_id", None) is None:
            return call_in_forward(module, fn, *args, **kwargs)
        redirected["calls"] += 1
        redirected["outside"].add((weight.ds_status.name, weight.numel()))  # a placeholder until the forward

        def inside(*a, **kw):
            redirected["inside"].add((weight.ds_status.name, weight.numel()))  # gathered by ZeRO-3's hooks
            return fn(*a, **kw)

        return call_in_forward(module, inside, *args, **kwargs)

    sharded_head.call_in_forward = counting_call_in_forward

    init = ORPOTrainer.__init__

    def recorded_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._ds_partitioned_at_init = self._partitioned()

    ORPOTrainer.__init__ = recorded_init

    train = ORPOTrainer.train

    def recorded(self, *args, **kwargs):
        redirected.update(calls=0, outside=set(), inside=set())
        out = train(self, *args, **kwargs)
        engine = self.model_wrapped
        params = list(unwrap(self.model).parameters())
        weight = self.head.module.weight
        info = {
            "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
            "all_params_partitioned": all(getattr(p, "ds_id", None) is not None for p in params),
            "partitioned_at_init": self._ds_partitioned_at_init,
            "head_local_numel": weight.ds_tensor.numel() if hasattr(weight, "ds_tensor") else weight.numel(),
            "head_numel": getattr(weight, "ds_numel", weight.numel()),
            "head_owner": type(sharded_head_owner(engine, self.head)).__name__,
            "head_redirected_calls": redirected["calls"],
            "head_outside_forward": sorted(redirected["outside"]),  # (ds_status, numel) seen before each call
            "head_inside_forward": sorted(redirected["inside"]),
            "chunk_size": self.chunk_size,
            "logits_in_forward": self.logits_in_forward,
            "gradient_checkpointing": bool(unwrap(self.model).is_gradient_checkpointing),
            "global_steps": getattr(engine, "global_steps", None),
        }
        if self.accelerator.is_main_process:
            Path(self.args.output_dir, "deepspeed.json").write_text(json.dumps(info))
        return out

    ORPOTrainer.train = recorded


if __name__ == "__main__":
    record_partitioning()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cli_runs

    cli_runs.main_and_exit()
