"""Pairs with images (vision.py) on tiny random-init vision-language models of seven families with their real
processors (tests/helpers/vision.py): loss, metrics and gradients equal a plain padded forward written here, the
vision tower runs once per pair, and bad rows stop with errors naming the row."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from orpo_plugin import ORPOConfig, ORPOTrainer
from tests.helpers.training import cpu_fields
from tests.helpers.vision import FAMILIES, build_vlm, image_message, make_images

ANSWERS = [
    ("It is a small red square.", "A cat on a mat."),
    ("Two birds and a tree.", "The answer is yellow."),
    ("Three circles and one line.", "Four."),
]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def vision_rows(images_per_pair=(1, 2, 0)) -> list[dict]:
    """Pairs in TRL's vision format; by default the second holds two images of another size (Qwen: more image
    tokens) and the third none (a text pair among pairs with images)."""
    rows = []
    for i, (count, (good, bad)) in enumerate(zip(images_per_pair, ANSWERS)):
        size = (48, 32) if count == 2 else (32, 32)
        rows.append(
            {
                "images": make_images(count, seed=i, size=size),
                "prompt": image_message("What is this?" if i % 2 else "Describe the picture.", count),
                "chosen": answer(good),
                "rejected": answer(bad),
            }
        )
    return rows


def plain_padded_loss(model, processor, rows, beta: float):
    """TRL's ORPO loss by a plain padded forward: each conversation rendered by the chat template and given to the
    processor whole (prompt, images and answer), chosen rows then rejected rows; the tower runs on every row."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    render = processor.apply_chat_template
    texts = [render(r["prompt"] + r[k], tokenize=False) for k in ("chosen", "rejected") for r in rows]
    # TRL appends EOS to an answer; a template that ends the turn with a special token (<|im_end|>) has one already
    ends_turn = [any(t.rstrip().endswith(s) for s in tokenizer.all_special_tokens) for t in texts]
    texts = [t if done else t + tokenizer.eos_token for t, done in zip(texts, ends_turn)]
    images = [r["images"] for r in rows] * 2
    enc = processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
    prompts = [render(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    prompt_lens = [
        len(
            processor(text=[p], images=[r["images"]] if r["images"] else None, add_special_tokens=False)["input_ids"][0]
        )
        for p, r in zip(prompts, rows)
    ] * 2
    logits = model(**enc, use_cache=False).logits[:, :-1]
    ids, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    position = torch.arange(ids.shape[1])[None] + 1  # the position of each target
    response = mask & (position >= torch.tensor(prompt_lens)[:, None])
    logps = (token_logps * response).sum(1) / response.sum(1)
    pairs = len(rows)
    image_token = model.config.image_token_id
    nll_mask = mask[:pairs] & (ids[:pairs] != image_token)
    nll = -(token_logps[:pairs] * nll_mask).sum() / nll_mask.sum()
    chosen, rejected = logps[:pairs], logps[pairs:]
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    loss = nll - beta * F.logsigmoid(log_odds).mean()
    return loss, {"logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": nll}


def count_tower_images(model):
    """A list that gets, per call of the vision tower, the number of images (or patches) it was given."""
    seen = []
    inner = model.model
    tower = next(getattr(inner, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(inner, n))
    tower.register_forward_pre_hook(lambda m, args, kwargs: seen.append(_leading(args, kwargs)), with_kwargs=True)
    return seen


def _leading(args, kwargs):
    value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return int(value.shape[0])


SHARED = ("llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # vision.SHARED_LAYOUT_FAMILIES
CASES = [(f, "padded") for f in FAMILIES] + [(f, layout) for f in SHARED for layout in ("packing", "prefix_sharing")]


class CapturingTrainer(ORPOTrainer):
    """One real training step; its loss, metric sums and gradients are kept before the optimizer step."""

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.captured = (loss.detach(), dict(self._metric_sums["train"]), grads, model.is_gradient_checkpointing)
        return loss


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_loss_metrics_and_gradients_equal_a_plain_padded_forward(family, layout, tmp_path):
    """One `trainer.train()` step with the user's defaults (gradient checkpointing on, float32 on a CPU, chunked loss)
    against the plain padded forward of a fresh copy of the model. Every family in the padded layout; the families
    whose images are plain tokens of a causal 1-D sequence also padding-free and packed (one row) and prefix-shared
    (each pair's prompt and images once in the row)."""
    model, processor = build_vlm(family)
    rows = vision_rows()
    fields = {layout: True} if layout != "padded" else {}
    args = ORPOConfig(**cpu_fields(str(tmp_path), max_length=256, **fields))
    trainer = CapturingTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    assert args.gradient_checkpointing and not args.bf16 and trainer.chunk_size is not None  # the defaults on a CPU
    assert args.layout == ("padding_free" if layout == "packing" else layout)
    seen = count_tower_images(trainer.model)
    trainer.train()
    loss, sums, grads, checkpointing = trainer.captured
    assert checkpointing

    reference_model, _ = build_vlm(family)  # the same weights (same seed), no trainer around it
    reference_model.eval()
    tower = count_tower_images(reference_model)
    loss_ref, metrics_ref = plain_padded_loss(reference_model, processor, rows, args.beta)
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in reference_model.named_parameters() if p.grad is not None}

    assert len(seen) == 1 and seen[0] * 2 == tower[0]  # one tower call, on each pair's images once
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
    pairs = float(sums["pairs"])
    assert pairs == len(rows)
    torch.testing.assert_close(sums["chosen_logps"] / pairs, metrics_ref["logps/chosen"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["rejected_logps"] / pairs, metrics_ref["logps/rejected"], rtol=1e-5, atol=1e-5)
    nll = sums["nll_sum"] / float(sums["nll_tokens"])
    torch.testing.assert_close(nll, metrics_ref["nll_loss"], rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    tower_grads = [n for n in grads if any(k in n for k in ("visual", "vision_tower", "vision_model"))]
    assert tower_grads and any(grads[n].abs().sum() > 0 for n in tower_grads)  # the images reach the loss
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def sliding_window(config, processor):
    """Qwen2-VL with a sliding-window layer (4 tokens) before a full one: the prompts run far past the window."""
    text = config.text_config
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, 4, 2
    text.layer_types = ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("layout", ["packing", "prefix_sharing"])
def test_a_sliding_window_model_with_images_equals_the_plain_forward(layout, tmp_path):
    """The packed-row kernels honour a sliding window with images in the row (the plain forward: the model's own
    sdpa and mask), through one real training step with the defaults."""
    model, processor = build_vlm("qwen2_vl", resize=sliding_window)
    assert model.config.text_config.layer_types[0] == "sliding_attention"
    rows = vision_rows()
    args = ORPOConfig(**cpu_fields(str(tmp_path), max_length=256, **{layout: True}))
    trainer = CapturingTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    trainer.train()
    loss, _, grads, checkpointing = trainer.captured
    assert checkpointing
    reference_model, _ = build_vlm("qwen2_vl", resize=sliding_window)
    reference_model.eval()
    loss_ref, _ = plain_padded_loss(reference_model, processor, rows, args.beta)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
    for name, p in reference_model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------- refused at start
def test_a_text_only_model_given_images_is_refused(tiny_model_factory, tiny_tokenizer, tmp_path):
    rows = vision_rows()
    with pytest.raises(ValueError, match=r"dataset has images but LlamaForCausalLM is a text-only model"):
        ORPOTrainer(
            model=tiny_model_factory(),
            args=ORPOConfig(**cpu_fields(str(tmp_path))),
            train_dataset=rows,
            processing_class=tiny_tokenizer,
        )


def test_a_tokenizer_given_instead_of_the_processor_is_refused(tmp_path):
    model, processor = build_vlm("llava")
    with pytest.raises(ValueError, match=r"not a processor with an image processor: pass AutoProcessor"):
        ORPOTrainer(
            model=model,
            args=ORPOConfig(**cpu_fields(str(tmp_path))),
            train_dataset=vision_rows(),
            processing_class=processor.tokenizer,
        )


@pytest.mark.parametrize("layout", ["packing", "padding_free", "prefix_sharing"])
def test_layouts_other_than_padded_are_refused_naming_the_feature(layout, tmp_path):
    """Gemma 3's images attend bidirectionally inside each image; the packed-row kernels are causal."""
    family, feature = "gemma3", "bidirectional attention inside each image"
    model, processor = build_vlm(family)
    args = ORPOConfig(**cpu_fields(str(tmp_path), **{layout: True}))
    with pytest.raises(ValueError, match=rf"pairs with images of .* train in the padded layout only: .*{feature}"):
        ORPOTrainer(model=model, args=args, train_dataset=vision_rows(), processing_class=processor)


# ----------------------------------------------------------------------------------------------- bad rows
def _prepare(rows, processor, root=None, **kwargs):
    from orpo_plugin.vision import prepare_vision_dataset

    return prepare_vision_dataset(rows, processor, name="train", root=root, **kwargs)


def test_bad_image_rows_stop_with_the_row_named(tmp_path):
    _, processor = build_vlm("llava")
    good = vision_rows((1, 1, 1))
    make_images(1)[0].save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    cases = [
        ({"images": ["missing.png"]}, r"row 1 \(0-based\): field 'images\[0\]': no such image file '.*missing.png'"),
        ({"images": ["junk.png"]}, r"row 1 \(0-based\): field 'images\[0\]' is not a readable image"),
        ({"images": []}, r"row 1 \(0-based\): the prompt has 1 image part\(s\) .* but the row has 0 image"),
        ({"images": ["ok.png", "ok.png"]}, r"row 1 \(0-based\): the prompt has 1 image part\(s\) .* has 2 image"),
        ({"images": [42]}, r"row 1 \(0-based\): field 'images\[0\]' must be a PIL image, a file path"),
        ({"chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}, r"row 1 .*images belong in the prompt"),
    ]
    for change, message in cases:
        rows = [good[0], {**good[1], **change}, good[2]]
        with pytest.raises((ValueError, TypeError), match=rf"^train dataset, {message}"):
            _prepare(rows, processor, root=tmp_path)
    # a datasets.Dataset of the rows (its images an Image column, decoded to PIL images) prepares as the list does
    import datasets

    assert _prepare(datasets.Dataset.from_list(good), processor)[1].kept == 3
    # the same file by a relative path, read from `root`, trains
    dataset, stats = _prepare([good[0], {**good[1], "images": ["ok.png"]}], processor, root=tmp_path)
    assert stats.kept == 2 and dataset[1]["images"][0].size == (32, 32)
    # a file is kept as its path, read again when batched (a large dataset's images are not held in memory)
    stored = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))[1]["images"][0]
    assert stored == {"path": str(tmp_path / "ok.png"), "bytes": None}


def test_a_long_prompt_with_images_is_dropped_and_counted_never_cut(caplog):
    """Cutting a prompt would cut its image tokens: a prompt that fills max_length is a counted drop."""
    _, processor = build_vlm("llava")  # 16 tokens per image
    rows = vision_rows((1, 2, 1))
    with caplog.at_level(logging.WARNING, logger="orpo_plugin"):
        dataset, stats = _prepare(rows, processor, max_length=50)  # prompts of 46, 56 (two images) and 46 tokens
    assert stats.dropped == {"prompt with its image tokens fills max_length (an image is never cut)": 1}
    assert stats.first_dropped == {"prompt with its image tokens fills max_length (an image is never cut)": 1}
    assert len(dataset) == 2 and [len(r["prompt_input_ids"]) for r in dataset] == [46, 46]
    assert stats.truncated_responses == 4  # the answers are cut to fit, as in text rows
    assert "1 (prompt with its image tokens fills max_length" in caplog.text


# ----------------------------------------------------------------------------------------------- QLoRA, command line
@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """A tiny LLaVA and its processor saved to a folder, and a JSONL of pairs whose images are PNG files beside it,
    named by paths relative to the JSONL."""
    import json

    root = tmp_path_factory.mktemp("vlm")
    model, processor = build_vlm("llava")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "data" / "img").mkdir(parents=True)
    lines = []
    for i, row in enumerate(vision_rows((1, 1, 2)) * 2):
        paths = []
        for k, image in enumerate(row["images"]):
            image.save(root / "data" / "img" / f"{i}-{k}.png")
            paths.append(f"img/{i}-{k}.png")
        lines.append(json.dumps({**row, "images": paths}))
    (root / "data" / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_qlora_keeps_the_tower_unquantized_and_equals_a_plain_forward(saved_llava, tmp_path):
    """QLoRA as users run it on a vision-language model: the language model in 4-bit with LoRA, the vision tower and
    projector unquantized; the chunked loss still equals the plain padded forward of the same model."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from transformers import AutoProcessor, BitsAndBytesConfig

    processor = AutoProcessor.from_pretrained(saved_llava / "model")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    args = ORPOConfig(
        **cpu_fields(str(tmp_path), max_length=256),
        model_init_kwargs={"quantization_config": quantization, "device_map": {"": "cpu"}, "dtype": torch.float32},
    )
    trainer = ORPOTrainer(
        model=str(saved_llava / "model"),
        args=args,
        train_dataset=vision_rows(),
        processing_class=processor,
        peft_config=LoraConfig(r=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", task_type="CAUSAL_LM"),
    )
    model = trainer.model
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any("language_model" in n for n in quantized)
    assert not [n for n in quantized if "vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n]
    assert trainer.chunk_size is not None  # the chunked loss, as for text
    rows = vision_rows()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train()
    with torch.no_grad():
        reference, _ = plain_padded_loss(model, processor, rows, args.beta)
        loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    assert all(n.count("lora_") for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapter trained


def test_command_line_trains_from_a_jsonl_of_image_paths(saved_llava, tmp_path):
    """`orpo-plugin train` with a JSONL whose image paths are relative to the file: the processor is loaded for the
    images, and QLoRA (4-bit, LoRA) with packing and prefix sharing trains two steps, the metrics logged and the
    adapter saved."""
    import json

    from orpo_plugin import cli

    out = tmp_path / "out"
    argv = [
        "train",
        "--model_name_or_path",
        str(saved_llava / "model"),
        "--dataset_name",
        str(saved_llava / "data" / "pairs.jsonl"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "True",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "True",
        "--load_in_4bit",
        "--use_peft",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--packing",
        "True",
        "--prefix_sharing",
        "True",
    ]
    assert cli.main(argv) == 0
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 2 and all("nll_loss" in s and "log_odds_ratio" in s for s in steps)
    # packed rows without padding; each prompt (images included) computed once for its two answers
    assert all(s["tokens/padding_fraction"] == 0.0 and s["tokens/computed_per_trained"] < 0.8 for s in steps)
    assert (out / "adapter_model.safetensors").exists()


def test_the_vision_example_runs_as_written(saved_llava, tmp_path):
    """examples/vision_quickstart.py with its defaults (the padded layout, LoRA on the language model) on the saved
    tiny LLaVA for 2 steps: it evaluates the held-out pairs before and after and saves the adapter."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "vision_quickstart.py"
    spec = importlib.util.spec_from_file_location("vision_quickstart", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    summary = example.main([str(saved_llava / "model"), "--max_steps", "2", "--output_dir", str(out)])
    assert 0.0 <= summary["held-out accuracy after"] <= 1.0
    assert summary["held-out margin after"] != summary["held-out margin before"]  # it trained
    assert (out / "adapter_model.safetensors").exists()
