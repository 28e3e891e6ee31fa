"""One-call GPU proof: bf16 parity of every attention backend that runs, QLoRA on an 8B-shaped model, one table.

    python benchmarks/gpu/proof.py OUT_DIR             # CUDA: bf16, Llama-3-8B shapes (run through run.sh)
    python benchmarks/gpu/proof.py OUT_DIR --dry-run   # the same code on CPU at tiny sizes, float32

a. Parity: one real training step (gradient checkpointing on) per layout (padding_free, packing, prefix_sharing)
   and per attention backend, against the padded layout, on a Llama and on a sliding-window Mistral whose sequences
   run past the window. A backend that cannot honour a model's features is reported as refused (that is its
   contract), not run.
b. QLoRA: Llama-3-8B config with random weights (written once as a checkpoint, loaded in nf4 with double
   quantization), LoRA r=16 on every linear layer, checkpointing on, pairs up to 2,048 tokens packed into rows of
   4,096, chunked loss: peak torch.cuda.max_memory_allocated over training (reset after loading) and real tokens/s,
   against our padded layout and TRL's ORPOTrainer on the same pairs and adapter.
c. OUT_DIR/RESULTS.md (the table) and OUT_DIR/results.json.

Every figure is measured by this run on the device it names; a dry run's figures are CPU figures of tiny models.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/common.py

import common  # noqa: E402
import torch  # noqa: E402

# bf16 on the GPU: a loss within 1 % and gradients within 5 % (relative L2 over all parameters) of the padded run;
# the two runs differ in kernels and summation order, each rounding at bf16's 8-bit mantissa. float32 (dry run): 1e-4.
PARITY_BUDGET_S = 200  # on the GPU: cells past this are reported as skipped, so QLoRA keeps its time
TOLERANCE = {"bf16": dict(loss=1e-2, grad=5e-2), "fp32": dict(loss=1e-4, grad=1e-4)}
MEMORY_LIMIT_GIB = 20.0
LAYOUTS = {
    "padding_free": dict(padding_free=True),
    "packing": dict(packing=True),
    "prefix_sharing": dict(prefix_sharing=True),
}


class Sizes:
    def __init__(self, dry: bool):
        self.dry = dry
        self.parity_pairs, self.parity_max_length = (6, 48) if dry else (16, 256)
        self.parity_model = (
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
            )
            if dry
            else dict(
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=32,
            )
        )
        self.window = 8 if dry else 32
        self.qlora_model = (
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=1024,
            )
            if dry
            else dict(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
            )
        )
        self.qlora_max_length = 64 if dry else 2048
        self.qlora_pairs = 4 if dry else 16
        self.padded_batch = 2
        self.vocab = 512 if dry else 4096


def log(msg: str) -> None:
    print(f"[proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


# ---- a. parity -----------------------------------------------------------------------------------------------------


def parity_model(kind: str, sizes: Sizes, vocab: int, cuda: bool):
    import transformers

    common_kw = dict(
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **sizes.parity_model,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**common_kw)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.MistralConfig(sliding_window=sizes.window, **common_kw)
        cls = transformers.MistralForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config).float()
    return model.cuda() if cuda else model


def capture(trainer_cls):
    class Capture(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            self.captured = (
                loss.item(),
                {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None},
            )
            return loss

    return Capture


def parity_step(kind, rows, tok, sizes, cuda, out, **fields):
    from datasets import Dataset

    from orpo_plugin import ORPOConfig, ORPOTrainer

    args = ORPOConfig(
        output_dir=out,
        per_device_train_batch_size=len(rows),
        max_steps=1,
        learning_rate=1e-4,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        max_length=sizes.parity_max_length,
        disable_tqdm=True,
        gradient_checkpointing=True,
        packing_max_tokens=4 * len(rows) * sizes.parity_max_length,
        **fields,
    )
    trainer = capture(ORPOTrainer)(
        model=parity_model(kind, sizes, len(tok), cuda),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    return trainer.captured, trainer.attention_override


def compare(result, reference) -> tuple[float, float]:
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert grads.keys() == ref_grads.keys()
    diff = math.sqrt(sum(float((grads[k] - ref_grads[k]).pow(2).sum()) for k in grads))
    norm = math.sqrt(sum(float(ref_grads[k].pow(2).sum()) for k in grads))
    return abs(loss - ref_loss) / max(abs(ref_loss), 1e-12), diff / max(norm, 1e-30)


def run_parity(sizes, cuda, out) -> list[dict]:
    from orpo_plugin import attention

    tok = common.build_tokenizer(seed=0, vocab_size=sizes.vocab)
    rows = common.make_pairs(sizes.parity_pairs, "mixed", sizes.parity_max_length, seed=0)
    tol = TOLERANCE["bf16" if cuda else "fp32"]
    backends = [b for b, f in attention.backend_features().items() if f is not None] if cuda else ["sdpa"]
    results = []
    start = time.perf_counter()
    for kind in ("llama", "mistral"):
        reference, _ = parity_step(kind, rows, tok, sizes, cuda, out)
        auto = attention.choose_backend(parity_model(kind, sizes, len(tok), False), "auto", cuda)
        log(f"{kind}: auto picks {auto[0]} ({auto[2]})")
        for backend in backends:
            for layout, fields in LAYOUTS.items():
                row = dict(model=kind, backend=backend, layout=layout, auto=backend == auto[0])
                t0 = time.perf_counter()
                if cuda and t0 - start > PARITY_BUDGET_S:
                    row.update(status="skipped", detail=f"parity time budget of {PARITY_BUDGET_S}s spent", seconds=0.0)
                    results.append(row)
                    continue
                try:
                    result, used = parity_step(kind, rows, tok, sizes, cuda, out, attention_backend=backend, **fields)
                except ValueError as err:  # the backend's contract: refused at start, never approximated
                    row.update(status="refused", detail=str(err).splitlines()[0][:160])
                except Exception as err:  # noqa: BLE001 - a failure is a result to report
                    row.update(status="error", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
                    traceback.print_exc()
                else:
                    loss_rel, grad_rel = compare(result, reference)
                    ok = loss_rel <= tol["loss"] and grad_rel <= tol["grad"]
                    row.update(status="pass" if ok else "FAIL", loss_rel=loss_rel, grad_rel=grad_rel, attention=used)
                row["seconds"] = time.perf_counter() - t0
                log(f"parity {row}")
                results.append(row)
    return results


# ---- b. QLoRA on an 8B-shaped model --------------------------------------------------------------------------------


def llama_config(model_sizes: dict, max_positions: int = 8192):
    """A Llama-3-shaped LlamaConfig (rope theta 500k, untied output layer) of `model_sizes` (hidden, layers, ...)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **model_sizes,
    )


def write_random_checkpoint(config, path: str, cuda: bool) -> None:
    """Random bf16 weights under the model's own parameter names, in safetensors shards, and its config."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    weight_map, shard, shard_bytes, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        shard[key] = t.contiguous()
        shard_bytes += t.numel() * 2
        if shard_bytes > 2 << 30:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.save_pretrained(path)


def load_qlora_base(path: str, cuda: bool, dtype: torch.dtype | None = None):
    """The checkpoint at `path` in nf4 (double quantization); unquantized weights and compute in `dtype` (default:
    bfloat16 on CUDA, float32 on CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=dtype,
        device_map={"": 0} if cuda else {"": "cpu"},
        attn_implementation="sdpa",
    )


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def timed_train(trainer, cuda: bool) -> float:
    sync(cuda)
    t0 = time.perf_counter()
    trainer.train()
    sync(cuda)
    return time.perf_counter() - t0


def qlora_trainer(method, model, rows, tok, sizes, cuda, out, max_steps=-1):
    from datasets import Dataset

    common_fields = dict(
        output_dir=out,
        learning_rate=1e-4,
        max_length=sizes.qlora_max_length,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        gradient_checkpointing=True,
        seed=0,
        data_seed=0,
        bf16=cuda,
        use_cpu=not cuda,
        num_train_epochs=1,
        max_steps=max_steps,
        beta=0.1,
    )
    if method == "trl":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(per_device_train_batch_size=sizes.padded_batch, **common_fields)
    else:
        from orpo_plugin import ORPOConfig, ORPOTrainer

        layout = dict(packing=True, packing_max_tokens=2 * sizes.qlora_max_length) if method == "packing" else {}
        args = ORPOConfig(per_device_train_batch_size=sizes.padded_batch, chunked_loss=True, **layout, **common_fields)
    return ORPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora()
    )


def run_qlora(sizes, cuda, out) -> dict:
    tok = common.build_tokenizer(seed=1, vocab_size=sizes.vocab)
    # long pairs: word counts that put prompt + response near max_length tokens
    maker, rng = common.TextMaker(1), random.Random(3)
    scale = sizes.qlora_max_length // 4
    rows = [
        {
            "prompt": maker.text(rng, int(scale * (0.3 + 0.4 * rng.random()))) + " ?",
            "chosen": " " + maker.text(rng, int(scale * (0.4 + 0.6 * rng.random()))),
            "rejected": " " + maker.text(rng, int(scale * (0.4 + 0.6 * rng.random()))),
        }
        for _ in range(sizes.qlora_pairs)
    ]
    config = llama_config(sizes.qlora_model)
    result = dict(
        config={k: v for k, v in sizes.qlora_model.items()},
        max_length=sizes.qlora_max_length,
        pairs=len(rows),
        packing_max_tokens=2 * sizes.qlora_max_length,
        padded_batch=sizes.padded_batch,
    )
    with tempfile.TemporaryDirectory(prefix="orpo-8b-") as path:
        t0 = time.perf_counter()
        write_random_checkpoint(config, path, cuda)
        result["write_seconds"] = time.perf_counter() - t0
        log(f"random checkpoint written in {result['write_seconds']:.0f}s")
        t0 = time.perf_counter()
        model = load_qlora_base(path, cuda)
        result["load_seconds"] = time.perf_counter() - t0
        log(f"nf4 model loaded in {result['load_seconds']:.0f}s")
        if cuda:
            result["loaded_gib"] = torch.cuda.memory_allocated() / 2**30
        real_tokens = None
        # each method first trains 2 untimed steps (CUDA context, kernel selection and allocator warm-up for its
        # shapes), on a fresh adapter, then a timed epoch on another fresh adapter
        for method in ("packing-warmup", "packing", "padded-warmup", "padded", "trl-warmup", "trl"):
            entry = {}
            warmup = method.endswith("-warmup")
            try:
                trainer = qlora_trainer(
                    method.removesuffix("-warmup"), model, rows, tok, sizes, cuda, out, max_steps=2 if warmup else -1
                )
                if method == "packing":
                    ds = trainer.train_dataset
                    real_tokens = sum(
                        2 * len(p) + len(c) + len(r)
                        for p, c, r in zip(ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"])
                    )
                    result["real_tokens"] = real_tokens
                    result["attention"] = trainer.attention_override
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                seconds = timed_train(trainer, cuda)
                entry.update(seconds=seconds, steps=trainer.state.global_step)
                if cuda:
                    entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if not warmup and real_tokens:
                    entry["tokens_per_s"] = real_tokens / seconds
                model = trainer.model.unload()  # the base model without this run's adapter, for the next one
                del trainer
            except Exception as err:  # noqa: BLE001 - reported in the table
                entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                traceback.print_exc()
            log(f"qlora {method}: {entry}")
            result[method] = entry
    return result


# ---- c. the table --------------------------------------------------------------------------------------------------


def table(parity, qlora, cuda, meta) -> str:
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run, tiny models, float32: not GPU figures)"
    tol = TOLERANCE["bf16" if cuda else "fp32"]
    lines = [
        f"# GPU proof: {device}",
        "",
        meta,
        "",
        f"## a. Parity vs padded, one training step, gradient checkpointing on ({'bf16' if cuda else 'float32'})",
        "",
        f"Tolerances: relative loss difference <= {tol['loss']:g}, relative L2 gradient difference <= {tol['grad']:g}.",
        "Mistral has a sliding window shorter than its sequences. auto = the backend attention_backend='auto' picks.",
        "",
        "| model | backend | layout | auto | status | loss rel. diff | grad rel. diff | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in parity:
        cells = f"{r['loss_rel']:.2e} | {r['grad_rel']:.2e}" if "loss_rel" in r else f"{r.get('detail', '')} | "
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['layout']} | {'yes' if r['auto'] else ''} | {r['status']} | "
            f"{cells} | {r['seconds']:.1f} |"
        )
    q = qlora
    lines += [
        "",
        "## b. QLoRA, Llama-3-8B shapes" + (" (dry run: tiny shapes)" if not cuda else ""),
        "",
        f"Config {q.get('config')}; random weights, nf4 + double quantization, LoRA r=16 on all linear layers, "
        f"gradient checkpointing on; {q.get('pairs')} pairs of up to {q.get('max_length')} tokens, "
        f"{q.get('real_tokens')} real tokens (the prompt counted with each response); packing budget "
        f"{q.get('packing_max_tokens')} tokens per row (attention: {q.get('attention')}); padded methods: "
        f"{q.get('padded_batch')} pairs per batch; each method timed over one epoch after 2 untimed warm-up steps. "
        f"Peak = torch.cuda.max_memory_allocated over train(), reset "
        f"after loading; limit {MEMORY_LIMIT_GIB:g} GiB.",
        "",
        "| method | steps | seconds | real tokens/s | vs TRL | vs our padded | peak GiB | < 20 GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_trl = q.get("trl", {}).get("tokens_per_s")
    base_pad = q.get("padded", {}).get("tokens_per_s")
    for method, label in (
        ("packing", "orpo_plugin packing"),
        ("padded", "orpo_plugin padded"),
        ("trl", "TRL ORPOTrainer"),
    ):
        e = q.get(method, {})
        if "error" in e:
            lines.append(f"| {label} | error: {e['error']} | | | | | | |")
            continue
        tps = e.get("tokens_per_s")
        peak = e.get("peak_gib")
        lines.append(
            f"| {label} | {e.get('steps', '')} | {e.get('seconds', float('nan')):.1f} | {tps or float('nan'):.0f} | "
            f"{(tps / base_trl) if tps and base_trl else float('nan'):.2f}x | "
            f"{(tps / base_pad) if tps and base_pad else float('nan'):.2f}x | "
            f"{'n/a (CPU)' if peak is None else f'{peak:.2f}'} | "
            f"{'n/a' if peak is None else ('yes' if peak < MEMORY_LIMIT_GIB else 'NO')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes (float32)")
    p.add_argument("--skip", choices=["parity", "qlora"], action="append", default=[])
    opts = p.parse_args(argv)
    cuda = not opts.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU version")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("orpo_plugin").setLevel(logging.INFO)  # the line naming the attention kernel chosen
    os.makedirs(opts.out_dir, exist_ok=True)
    sizes = Sizes(opts.dry_run)
    import transformers

    meta = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, orpo_plugin "
        f"{common.library_revision()}, python {sys.version.split()[0]}"
    )
    log(meta)
    work = tempfile.mkdtemp(prefix="orpo-proof-")
    t0 = time.perf_counter()
    parity = [] if "parity" in opts.skip else run_parity(sizes, cuda, work)
    log(f"parity done in {time.perf_counter() - t0:.0f}s")
    qlora = {} if "qlora" in opts.skip else run_qlora(sizes, cuda, work)
    log(f"all done in {time.perf_counter() - t0:.0f}s")
    text = table(parity, qlora, cuda, meta)
    with open(os.path.join(opts.out_dir, "RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(opts.out_dir, "results.json"), "w") as f:
        json.dump(dict(meta=meta, cuda=cuda, parity=parity, qlora=qlora), f, indent=1, default=str)
    print(text)
    failed = [r for r in parity if r["status"] in ("FAIL", "error")]
    failed += [m for m in ("packing", "padded", "trl") if "error" in qlora.get(m, {})]
    if cuda and qlora.get("packing", {}).get("peak_gib", 0) >= MEMORY_LIMIT_GIB:
        failed.append("memory")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
