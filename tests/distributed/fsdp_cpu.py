"""Run `orpo_plugin.cli train` under accelerate's FSDP2 plugin on CPU processes (gloo), for the tests.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/fsdp_cpu.py RUNS.json INFO.json

accelerate 1.15 turns FSDP on only for GPU-type distributed setups: on CPU processes (MULTI_CPU) it ignores the
`fsdp_plugin` transformers hands it and trains with plain DDP. This helper changes exactly that decision, in the
test process only: when a plugin is given and the processes are CPU ones, the state becomes FSDP with that plugin.
Everything after it is accelerate's and transformers' own code: `fsdp2_prepare_model` (`fully_shard` per decoder
layer and on the root), the sharded optimizer, gradient clipping on DTensors, torch.distributed.checkpoint saves.
Then it runs tests/distributed/cli_runs.py's list of training runs. After each run the main process writes
<output_dir>/sharding.json: what the trained model looked like (FSDP2 root, output layer sharded, chunked loss on,
gradient checkpointing on, PEFT), so a test can check that the run it compares was really sharded.
"""

from __future__ import annotations

import sys
from pathlib import Path


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_orpo_fsdp_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._orpo_fsdp_cpu = True
    AcceleratorState.__init__ = __init__


def record_sharding() -> None:
    """Write <output_dir>/sharding.json after every ORPOTrainer.train() (main process)."""
    import json

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from orpo_plugin.sharded_head import sharded_head_owner, unwrap
    from orpo_plugin.trainer import ORPOTrainer

    train = ORPOTrainer.train

    def recorded(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        weight = self.head.module.weight
        info = {
            "fsdp2_root": isinstance(self.model_wrapped, FSDPModule),
            "sharded_layers": sum(isinstance(m, FSDPModule) for m in self.model_wrapped.modules()),
            "head_weight_sharded": isinstance(weight, DTensor),
            "head_local_rows": weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0],
            "vocab_size": self.head.vocab_size,
            "head_owner": type(sharded_head_owner(self.model_wrapped, self.head)).__name__,
            "chunk_size": self.chunk_size,
            "logits_in_forward": self.logits_in_forward,
            "gradient_checkpointing": bool(unwrap(self.model).is_gradient_checkpointing),
            "peft": hasattr(self.model, "peft_config"),
        }
        if self.accelerator.is_main_process:
            Path(self.args.output_dir, "sharding.json").write_text(json.dumps(info))
        return out

    ORPOTrainer.train = recorded


if __name__ == "__main__":
    enable_fsdp_on_cpu()
    record_sharding()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cli_runs

    cli_runs.main_and_exit()
