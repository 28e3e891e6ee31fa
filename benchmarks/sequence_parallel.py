"""Per-rank memory of a training step on one long pair: Ulysses sequence parallelism over 2 ranks against 1 process.

    python benchmarks/sequence_parallel.py                 # one pair of 16,384 tokens (benchmarks/RESULTS.md 3c)
    python benchmarks/sequence_parallel.py --tokens 8192 --hidden 1024 --layers 4 --vocab 128256 --lora 0 \
        --loss-chunk-size 0                                # full fine-tune, 128k vocabulary, the default loss chunk

The model (defaults): a random-init Llama, hidden 512, 8 layers, 8 heads, vocabulary 32,000, LoRA r=16 on every
linear layer (as users train), gradient checkpointing on, float32, chunked loss in chunks of 512 tokens, packing
(the pair in one row). The pair: prompt 1/8 of the tokens, chosen and rejected 3/8 each (2 x prompt + chosen +
rejected = --tokens), of plain words.

What sequence parallelism divides is what grows with the row: the layers' activations. The chunked loss holds one
chunk of logits whatever the length, and a full fine-tune's weight gradients do not depend on it either; where
those dominate a step (a tiny model with a 128k vocabulary and the default 512 MiB loss chunk, or a full fine-tune)
the per-rank peak does not fall (the second command above: RESULTS.md 3c says by how much).

- `one process`: `orpo_plugin.ORPOTrainer` in one process.
- `sp 2`: the same trainer under `accelerate launch --config_file configs/accelerate/deepspeed-ulysses.yaml
  --num_processes 2` (DeepSpeed ZeRO-2, Ulysses sp_size 2; DS_ACCELERATOR=cpu, gloo), with DeepSpeed from the
  tests' venv (tests/distributed/deepspeed_env.py). Each rank holds half of the row's activations and computes the
  attention of half of the heads over the whole row.

Measured as benchmarks/memory.py does on CPU: each process's RSS growth during its second optimizer step (the high-
water mark reset before it, malloc returning freed blocks >= 128 KiB), the larger of the two ranks for sp 2; the
process peak too. The first step's loss is printed for both: they must agree (the runs train the same step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
CONFIG = ROOT / "configs" / "accelerate" / "deepspeed-ulysses.yaml"


def build(folder: Path, tokens: int, hidden: int, layers: int, vocab: int) -> None:
    """The model, tokenizer and one-pair dataset of the run, written to `folder`."""
    from orpo_plugin.toy import build_model, build_tokenizer

    words = "apple banana dog cat red blue green saw drill hammer pear plum one two three four five six".split()
    tok = build_tokenizer([" ".join(words)] * 4, vocab_size=300)
    model = build_model(
        vocab, hidden_size=hidden, num_layers=layers, num_heads=8, max_position_embeddings=max(2048, tokens)
    )
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)

    def text(n_tokens: int) -> str:  # plain words, cut to at most n_tokens tokens of this tokenizer
        sample = " ".join(rng.choice(words) for _ in range(400))
        per_word = len(tok(" " + sample)["input_ids"]) / 400
        chosen = [rng.choice(words) for _ in range(int(n_tokens / per_word) + 8)]
        while len(tok(" " + " ".join(chosen))["input_ids"]) > n_tokens:
            chosen = chosen[: -1 - len(chosen) // 200]
        return " " + " ".join(chosen)

    q = tokens // 8
    row = {"prompt": text(q - 2) + ":", "chosen": text(3 * q), "rejected": text(3 * q)}
    (folder / "pair.jsonl").write_text(json.dumps(row) + "\n")


def child(folder: Path, tokens: int, result: Path, opts) -> None:
    """One process (or rank) trains 2 steps on the pair and writes its second step's peak and its first loss."""
    import resource

    import common
    import torch
    from datasets import load_dataset
    from memory import MemoryProbe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo_plugin import ORPOConfig, ORPOTrainer

    common.quiet_logs()
    torch.manual_seed(0)
    probe = MemoryProbe(step=1, cuda=False)
    losses = []
    args = ORPOConfig(
        output_dir=str(folder / "out"),
        max_steps=2,
        per_device_train_batch_size=1,
        max_length=tokens,
        packing=True,
        packing_max_tokens=tokens + 64,  # a multiple of 2 (the gloo row length) above the pair
        gradient_checkpointing=True,
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        loss_chunk_size=opts.loss_chunk_size or None,
    )
    peft = None
    if opts.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = ORPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder / "model", attn_implementation="sdpa"),
        args=args,
        train_dataset=load_dataset("json", data_files=str(folder / "pair.jsonl"))["train"],
        processing_class=AutoTokenizer.from_pretrained(folder / "model"),
        callbacks=[probe.callback()],
        peft_config=peft,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rank = int(os.environ.get("RANK", "0"))
    real = [h["tokens/real"] for h in trainer.state.log_history if "tokens/real" in h]
    out = dict(probe.result, rank=rank, first_loss=losses[0], sp_size=trainer.sp_size, real_tokens=real[0])
    out["process_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(f"{result}.rank{rank}").write_text(json.dumps(out))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd[:6])} ...\n{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the pair (2 x prompt + chosen + rejected)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (8 heads)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--lora", type=int, default=1, help="1: LoRA r=16 on every linear layer (as users train); 0: full")
    p.add_argument(
        "--loss-chunk-size", type=int, default=512, help="tokens per chunk of the chunked loss (0: the default size)"
    )
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "RESULT"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        child(Path(opts.child[0]), opts.tokens, Path(opts.child[1]), opts)
        return 0
    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    import common
    from deepspeed_env import deepspeed_python

    folder = Path(tempfile.mkdtemp(prefix="orpo-sp-bench-"))
    build(folder, opts.tokens, opts.hidden, opts.layers, opts.vocab)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_TRIM_THRESHOLD_": "131072",
    }
    results = {}
    one = folder / "one.json"
    settings = ["--tokens", str(opts.tokens), "--lora", str(opts.lora), "--loss-chunk-size", str(opts.loss_chunk_size)]
    run([sys.executable, __file__, *settings, "--child", str(folder), str(one)], env)
    results["one process"] = [json.loads(Path(f"{one}.rank0").read_text())]
    two = folder / "sp2.json"
    launch = [str(deepspeed_python()), "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    launch += ["--num_processes", "2", "--main_process_port", str(free_port())]
    run([*launch, __file__, *settings, "--child", str(folder), str(two)], env)
    results["sp 2"] = [json.loads(Path(f"{two}.rank{r}").read_text()) for r in range(2)]
    base = results["one process"][0]
    rows = []
    for name, ranks in results.items():
        worst = max(ranks, key=lambda r: r["step_peak_mib"])
        rows.append(
            [
                name,
                worst["sp_size"],
                f"{worst['step_peak_mib']:,.0f}",
                f"{worst['step_peak_mib'] / base['step_peak_mib']:.3f}x",
                f"{max(r['process_peak_mib'] for r in ranks):,.0f}",
                f"{worst['first_loss']:.6f}",
            ]
        )
    print(
        f"One pair of {base['real_tokens']:,.0f} tokens (--tokens {opts.tokens}), vocab {opts.vocab:,}, hidden "
        f"{opts.hidden}, {opts.layers} layers, 8 heads, {'LoRA r=16 all-linear' if opts.lora else 'full fine-tune'}, "
        f"loss chunks of {opts.loss_chunk_size or 'the default'} tokens, checkpointing on, float32, "
        "CPU (gloo). Step peak = RSS growth in the second optimizer step, the larger rank's.\n"
    )
    print(
        common.table(
            ["run", "sp_size", "step peak MiB per rank", "vs one process", "process peak MiB", "first loss"], rows
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
