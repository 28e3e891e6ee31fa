"""The output layer under FSDP2, driven directly with `fully_shard` (no trainer): 2 gloo processes.

    torchrun --nproc_per_node 2 tests/distributed/fsdp_head.py RESULT.json

For each case (tied or untied embeddings; the output layer in the root's group, in its own group resharded after
forward, or in a [final norm, output layer] group kept gathered, as accelerate groups it; loss chunked over several
chunks, in one chunk, or full logits; output layer trainable or frozen, as under LoRA), the decoder layers and the
root are sharded, `predicted_logps` runs forward and backward with gradient checkpointing on, and the log-probs and
every parameter's gradient (gathered with `full_tensor`) are compared with the same model unsharded in one process.
The main process writes the largest differences to RESULT.json.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from orpo_plugin.collators import PreferenceCollator
from orpo_plugin.modeling import predicted_logps
from orpo_plugin.sharded_head import OutputHead, sharded_head_owner
from orpo_plugin.toy import build_model

VOCAB = 97


def batch(seed):
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    feats = [
        {"prompt_input_ids": ids(2, 6), "chosen_input_ids": ids(2, 7), "rejected_input_ids": ids(2, 7)}
        for _ in range(4)
    ]
    return PreferenceCollator(0, "padded")(feats)


def shard(model, placement):
    for layer in model.model.layers:
        fully_shard(layer)
    if placement == "own_group":
        fully_shard(model.lm_head)  # resharded after its forward: gathered again by our redirected call
    elif placement == "tail_group":
        tail = [model.model.norm, model.lm_head]
        if model.config.tie_word_embeddings:
            tail.insert(1, model.model.embed_tokens)
        fully_shard(tail, reshard_after_forward=False)
    fully_shard(model)


def run_case(tied, placement, chunk, frozen, data):
    model = build_model(VOCAB, hidden_size=32, num_layers=2, tie_word_embeddings=tied, seed=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if frozen:
        model.lm_head.weight.requires_grad_(False)
    ref = copy.deepcopy(model)
    want, _ = predicted_logps(ref, data, OutputHead.of(ref), chunk)
    (want * torch.linspace(-1, 1, want.numel())).sum().backward()
    head = OutputHead.of(model)
    shard(model, placement)
    assert isinstance(model.lm_head.weight, DTensor)
    owner = sharded_head_owner(model, head)
    got, _ = predicted_logps(model, data, head, chunk)
    (got * torch.linspace(-1, 1, got.numel())).sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ours = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(ours), (sorted(grads), sorted(ours))
    return {
        "owner": "root" if owner is model else type(owner).__name__,
        "logps": (got - want).abs().max().item(),
        "grad": max((ours[n] - g).abs().max().item() for n, g in grads.items()),
        "head_grad": "lm_head.weight" in grads or (tied and "model.embed_tokens.weight" in grads),
    }


def main() -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    data = batch(3)
    results = {}
    for tied in (False, True):
        for placement in ("root", "own_group", "tail_group"):
            if tied and placement == "own_group":
                continue  # a tied weight cannot sit in two groups
            for chunk, frozen in ((8, False), (4096, False), (None, False), (8, True)):
                key = f"tied={tied} placement={placement} chunk={chunk} frozen={frozen}"
                results[key] = run_case(tied, placement, chunk, frozen, data)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalization: with torch 2.13's gloo, a finished worker sometimes aborts there ("terminate
    # called without an active exception") after all its work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
