"""Pairs with images: the vision tower once per pair, packing and prefix sharing, against a plain padded forward that
runs the tower on both rows.

    python benchmarks/vision.py                          # Qwen2-VL-style (benchmarks/RESULTS.md section 3d, CPU)
    python benchmarks/vision.py --images 2               # two images per prompt
    python benchmarks/vision.py --family llava           # LLaVA-style (a CLIP tower)

The model: a random-init model of the tests' tiny families (tests/helpers/vision.py) made larger: the language model
hidden 256, 4 layers, the vision tower hidden 256, 4 layers, float32, gradient checkpointing on (the default); the
images 112 x 112 pixels (Qwen2-VL: 196 patches of 8 x 8 merged into 49 image tokens; LLaVA: 196 image tokens); the
answers a sentence or two. Full fine-tune (the tower trains too).

- `plain padded (tower on both rows)`: the padded layout with the tower-once step turned off: the model runs its
  vision tower on the chosen rows' images and again on the rejected rows' (what TRL's DPO does with images; TRL's
  ORPO does not take images).
- `orpo_plugin padded (tower once per pair)`: `get_image_features` runs on each pair's images once and both rows use
  its output (orpo_plugin/vision.py).
- `orpo_plugin packing`: the pairs in one padding-free row, the tower once per pair.
- `orpo_plugin packing + prefix sharing`: each pair's prompt, images included, once in the row.

Measured: forward + backward of one micro-batch, the methods alternating, each its own trainer on the same weights,
median over --steps; the loss of each (they must agree). What the ratio means for a real model is the tower's (and,
with prefix sharing, the prompt's) share of a step: see benchmarks/RESULTS.md section 3d.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

ANSWERS = [
    "A small red square sits on a blue field next to the sun.",
    "Two birds and a tree over the sea.",
    "The image shows a cat sitting on a green mat.",
    "There are three circles and one line in this drawing.",
]


def resize(family: str, hidden: int, layers: int, vision_layers: int, pixels: int):
    """A `build_vlm` resize: both towers at `hidden` width, images of `pixels` x `pixels`."""

    def apply(config, processor):
        heads = max(hidden // 32, 1)
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 2 * hidden, layers
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, max(heads // 2, 1), 32
        if getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[0]] * layers
        vision = config.vision_config
        if family == "qwen2_vl":
            text.rope_parameters["mrope_section"] = [8, 4, 4]  # sums to head_dim / 2
            vision.embed_dim, vision.hidden_size, vision.depth, vision.num_heads = hidden, hidden, vision_layers, heads
            size = processor.image_processor.size
            size["longest_edge"] = max(size["longest_edge"], pixels * pixels)
        else:  # llava: a CLIP tower over the whole image, (pixels / 8)^2 image tokens
            vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = hidden, 2 * hidden, vision_layers
            vision.num_attention_heads, vision.image_size, vision.projection_dim = heads, pixels, hidden
            config.image_seq_length = (pixels // 8) ** 2
            processor.image_processor.size = {"shortest_edge": pixels}
            processor.image_processor.crop_size = {"height": pixels, "width": pixels}

    return apply


def build(args):
    from tests.helpers.vision import build_vlm, image_message, make_images

    sizes = resize(args.family, args.hidden, args.layers, args.vision_layers, args.pixels)
    model, processor = build_vlm(args.family, resize=sizes)
    rows = []
    for i in range(args.pairs):
        rows.append(
            {
                "images": make_images(args.images, seed=i, size=(args.pixels, args.pixels)),
                "prompt": image_message("Describe the picture in one short sentence, please.", args.images),
                "chosen": [{"role": "assistant", "content": ANSWERS[i % 4]}],
                "rejected": [{"role": "assistant", "content": ANSWERS[(i + 1) % 4]}],
            }
        )
    return model, processor, rows


@contextlib.contextmanager
def tower_on_both_rows():
    """The baseline: orpo_plugin's forward without its tower-once step (the model runs the tower on every row)."""
    import orpo_plugin.modeling as modeling

    original = modeling.tower_once
    modeling.tower_once = lambda model, batch: contextlib.nullcontext()
    try:
        yield
    finally:
        modeling.tower_once = original


PLAIN = "plain padded (tower on both rows)"


def methods(family: str) -> dict:
    """name -> (ORPOConfig fields, whether the tower runs on both rows)."""
    out = {PLAIN: ({}, True), "orpo_plugin padded (tower once per pair)": ({}, False)}
    if family in ("llava", "qwen2_vl"):  # both train packed and prefix-shared (docs/vision.md)
        out["orpo_plugin packing"] = ({"packing": True}, False)
        out["orpo_plugin packing + prefix sharing"] = ({"packing": True, "prefix_sharing": True}, False)
    return out


def measure(args) -> dict:
    from orpo_plugin import ORPOConfig, ORPOTrainer, attention

    runs = {}
    for name, (fields, both_rows) in methods(args.family).items():
        model, processor, rows = build(args)  # the same weights for every method (the same seed)
        config = ORPOConfig(
            output_dir=tempfile.mkdtemp(),
            use_cpu=True,
            bf16=False,
            report_to=[],
            max_length=1024,
            per_device_train_batch_size=args.pairs,
            **fields,
        )
        trainer = ORPOTrainer(model=model, args=config, train_dataset=rows, processing_class=processor)
        # as Trainer.train() does: gradient checkpointing (on by default) is switched on when training starts
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
        trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        runs[name] = (trainer, batch, both_rows)
    times = {name: [] for name in runs}
    losses, tower, tokens = {}, {}, {}
    for step in range(args.steps + 1):
        for name, (trainer, batch, both_rows) in runs.items():
            model = trainer.model
            model.zero_grad(set_to_none=True)
            with tower_on_both_rows() if both_rows else contextlib.nullcontext():
                with attention.attention_implementation(model, trainer.attention_override):
                    start = time.perf_counter()
                    loss = trainer.compute_loss(model, batch)
                    loss.backward()
                    elapsed = time.perf_counter() - start
            if step:  # the first round warms up
                times[name].append(elapsed)
            losses[name] = float(loss)
            images = int(batch["pixel_values"].shape[0])  # images (or Qwen's patches) given to the model
            tower[name] = images // (2 if batch.get("vision_twice") and not both_rows else 1)
            tokens[name] = int(batch["input_ids"].numel())
    return {"times": times, "losses": losses, "tower": tower, "tokens": tokens}


def report(args, result: dict) -> str:
    base = common.median(result["times"][PLAIN])
    rows = []
    for name, times in result["times"].items():
        t = common.median(times)
        loss = f"{result['losses'][name]:.6f}"
        rows.append([name, result["tower"][name], result["tokens"][name], f"{t:.3f}", f"{base / t:.2f}x", loss])
    unit = "patches" if args.family == "qwen2_vl" else "images"
    headers = ["method", f"{unit} through the tower", "positions computed", "step s (median)", "speed", "loss"]
    lines = [
        f"{args.family} random-init model: language model hidden {args.hidden}, {args.layers} layers; vision tower "
        f"hidden {args.hidden}, {args.vision_layers} layers; {args.pairs} pairs of {args.images} image(s) of "
        f"{args.pixels}x{args.pixels} pixels; gradient checkpointing on; forward + backward, median of {args.steps}; "
        f"CPU ({common.versions()})",
        "",
        common.table(headers, rows),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("qwen2_vl", "llava"), default="qwen2_vl")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1, help="images per prompt")
    parser.add_argument("--pixels", type=int, default=112, help="image side (a multiple of 16)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="language model layers")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    common.quiet_logs()
    result = measure(args)
    losses = list(result["losses"].values())
    if max(losses) - min(losses) > 1e-5 * max(1.0, abs(losses[0])):
        raise SystemExit(f"the methods' losses differ: {result['losses']}")
    print(report(args, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
