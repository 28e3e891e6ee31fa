"""Images in preference pairs (vision-language models): rows -> tokenized pairs, pairs -> a batch with the
processor's vision inputs, and a forward in which the vision tower runs once per pair.

Layouts: padded for every family; padding-free (packing) and prefix sharing for SHARED_LAYOUT_FAMILIES, whose images
are tokens of a causal sequence (Qwen-VL's 3-D positions computed per sequence: `mrope_position_ids`); the others are
refused at start (`check_trainable`).

Rows are in TRL's vision preference format: `images` (a list of PIL images, file paths or `{"bytes", "path"}`
dicts; `image` for one), a conversational `prompt` whose messages hold a `{"type": "image"}` part where each image
goes, and `chosen`/`rejected` assistant answers (messages or strings); `processing_class` is the model's processor.
The prompt is rendered by the processor's chat template and tokenized by the processor (which expands each image
placeholder into the image's tokens); the answers are tokenized as text rows are (`data.tokenize_pair`).

The tower once per pair: a pair's chosen and rejected rows hold the same images. The collator gives the model the
inputs of a plain padded batch (the chosen rows' vision inputs, then the same again for the rejected rows), and
during the forward the model's `get_image_features` runs on the first half only, its output used for both halves:
the same features and, through the repeat, the same gradient (summed over both uses) as running the tower on
both, at half its cost. TRL's DPO runs the tower on both. With prefix sharing each prompt, images included, is in
the row once, so the tower runs once per pair without the repeat.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .collators import PreferenceCollator
from .data import (
    DROP_IDENTICAL,
    DROP_TOO_LONG,
    PrepareStats,
    _final_checks,
    _row_errors_named,
    end_of_turn_ids,
    fit_pair,
    row_to_text,
    tokenize_pair,
)
from .sharded_head import unwrap

logger = logging.getLogger("orpo_plugin")

IMAGE_COLUMNS = ("images", "image")
# processor outputs with one value per token (extended over the answers and padding); the others are per image
PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
DROP_LONG_IMAGE_PROMPT = "prompt with its image tokens fills max_length (an image is never cut)"
DROP_LONG_IMAGE_PROMPT_LIMIT = "prompt with its image tokens longer than max_prompt_length (an image is never cut)"

# Qwen-VL: 3-D rotary positions (M-RoPE), computed per sequence of a row by `mrope_position_ids`
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Families for which padding_free, packing and prefix_sharing are exact (tests/test_vision.py): images as tokens of a
# causal sequence, with 1-D positions or Qwen-VL's per-sequence 3-D ones
SHARED_LAYOUT_FAMILIES = ("llava", "idefics3", "smolvlm", *MROPE_FAMILIES)
# the others: family (transformers model_type) -> what padding_free, packing and prefix_sharing would have to honour
LAYOUT_REFUSALS = {
    "gemma3": "bidirectional attention inside each image, per sequence of a row (the packed-row kernels are causal)",
}
DEFAULT_LAYOUT_REFUSAL = "its image features and positions checked per sequence of a row (not verified for it)"


# the vision tower and projector of each family: Qwen-VL, LLaVA and Gemma 3, Idefics3 and SmolVLM
TOWER_MODULES = ("visual", "vision_tower", "multi_modal_projector", "vision_model", "connector")


def keep_tower_unquantized(quantization_config) -> None:
    """Leave the vision tower and projector out of a bitsandbytes quantization, as QLoRA users of vision-language
    models do (the tower is small and sensitive to 4-bit weights); the output layer stays unquantized as by default.

    A config whose `llm_int8_skip_modules` is already set is the user's choice and is left as it is.
    """
    if quantization_config is None or getattr(quantization_config, "llm_int8_skip_modules", "") is not None:
        return
    # transformers matches these from the start of a module's name, at a module boundary
    quantization_config.llm_int8_skip_modules = ["lm_head", *(rf"(?:.*\.)?{m}" for m in TOWER_MODULES)]
    logger.info("quantization: the vision tower and projector stay unquantized (%s)", ", ".join(TOWER_MODULES))


def has_images(columns) -> bool:
    return bool(set(columns) & set(IMAGE_COLUMNS))


def is_vision_processor(processing_class) -> bool:
    return getattr(processing_class, "image_processor", None) is not None


def is_vision_model(model) -> bool:
    return callable(getattr(unwrap(model), "get_image_features", None))


def placeholder_ids(model) -> frozenset[int]:
    """The token ids the model replaces by image (or video) features: `config.image_token_id` and the like.

    (Not the processor's `image_token_id`: Gemma 3's is `<start_of_image>`, a text token before the image's tokens.)
    """
    config = unwrap(model).config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return frozenset(v for v in (getattr(config, n, None) for n in names) if isinstance(v, int))


def check_trainable(model, processing_class, layout: str) -> None:
    """Refusals at start for rows with images: a text-only model or tokenizer, a layout the family cannot honour."""
    name = type(unwrap(model)).__name__
    if not is_vision_model(model):
        raise ValueError(
            f"the dataset has images but {name} is a text-only model (it has no vision tower): the images would "
            "never reach it. Load the vision-language model (AutoModelForImageTextToText), or drop the 'images' column"
        )
    if not is_vision_processor(processing_class):
        raise ValueError(
            f"the dataset has images but processing_class is a {type(processing_class).__name__}, not a processor "
            "with an image processor: pass AutoProcessor.from_pretrained(...) of the model"
        )
    model_type = getattr(unwrap(model).config, "model_type", "")
    if layout != "padded" and model_type not in SHARED_LAYOUT_FAMILIES:
        feature = LAYOUT_REFUSALS.get(model_type, DEFAULT_LAYOUT_REFUSAL)
        raise ValueError(
            f"pairs with images of {name} ({model_type}) train in the padded layout only: {layout} would need "
            f"{feature}, which orpo_plugin does not implement (it does for {', '.join(SHARED_LAYOUT_FAMILIES)}). "
            "Set padding_free=False, packing=False and prefix_sharing=False (the vision tower still runs once per pair)"
        )


# ----------------------------------------------------------------------------------------------- rows -> pairs
def _open_image(source: Any, index: int, k: int, root: Path | None):
    """One image of row `index` as a loaded PIL image; a missing or unreadable file names the row."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict) and source.get("bytes") is not None:
        import io

        source = io.BytesIO(source["bytes"])
    elif isinstance(source, dict) and source.get("path"):
        source = source["path"]
    if isinstance(source, str):
        path = Path(source).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise ValueError(f"row {index}: field 'images[{k}]': no such image file {str(path)!r}")
        source = path
    elif not hasattr(source, "read"):
        raise TypeError(
            f"row {index}: field 'images[{k}]' must be a PIL image, a file path or a {{'bytes', 'path'}} dict, "
            f"got {type(source).__name__}"
        )
    try:
        image = Image.open(source)
        image.load()  # a truncated or corrupt file fails here, not in a batch
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds (UnidentifiedImageError, OSError ...)
        raise ValueError(
            f"row {index}: field 'images[{k}]' is not a readable image ({type(err).__name__}: {err})"
        ) from None
    return image


def _sources(row: dict) -> list:
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def row_images(row: dict, index: int, root: Path | None = None) -> list:
    """The images of a row (`images`, or `image` for one), loaded; none is an empty list."""
    return [_open_image(source, index, k, root) for k, source in enumerate(_sources(row))]


def _kept(source: Any, image, root: Path | None):
    """What the prepared dataset keeps of an image: a file's path (read again when batched, not held in memory), or
    the image itself."""
    path = source.get("path") if isinstance(source, dict) and source.get("bytes") is None else source
    if isinstance(path, str):
        path = Path(path).expanduser()
        return str(path if path.is_absolute() or root is None else root / path)
    return image


def _image_parts(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


def vision_pair(
    row: dict,
    index: int,
    processor,
    end_of_turn: frozenset[int],
    root: Path | None = None,
    max_length: int | None = None,
    max_completion_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """One row with images -> prompt ids (image placeholders expanded by the processor), the two answers' ids, the
    rendered prompt text and the images, plus `truncated`/`drop` as `data.fit_pair` gives them.

    The prompt is never cut (it holds the images): a pair whose prompt alone fills `max_length`, or is longer than
    `max_prompt_length`, is dropped (counted); the answers are cut as in text rows.
    """
    images = row_images(row, index, root)
    for field in ("chosen", "rejected"):
        if _image_parts(row.get(field)):
            raise ValueError(f"row {index}: field '{field}' has an image part; images belong in the prompt")
    parts = _image_parts(row.get("prompt"))
    if parts != len(images):
        raise ValueError(
            f"row {index}: the prompt has {parts} image part(s) ({{'type': 'image'}}) but the row has {len(images)} "
            "image(s); give one image per image part, in order"
        )
    prompt, chosen, rejected = row_to_text(row, index, processor, parts=True)
    out = {"prompt_text": prompt, "images": [_kept(src, im, root) for src, im in zip(_sources(row), images)]}
    if chosen == rejected:
        return out | {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], "drop": DROP_IDENTICAL}
    tokenizer = processor.tokenizer
    pair = tokenize_pair(prompt, chosen, rejected, tokenizer, end_of_turn=end_of_turn)
    # The prompt is the processor's tokens of the rendered text, no BOS added (as the processor gives it, and as
    # TRL's DPO tokenizes a vision prompt): tokenize_pair's split must fall where the rendered prompt ends.
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    split = pair["prompt_input_ids"]
    if split[len(split) - len(text_ids) :] != text_ids or len(split) - len(text_ids) not in (0, 1):
        raise ValueError(
            f"row {index}: the rendered prompt's last token merges with the answers' first ones, so the prompt "
            "cannot be tokenized apart from them (with its images); end the prompt's rendering with a special token"
        )
    prompt_ids = processor_inputs(processor, prompt, images, index)["input_ids"][0].tolist()
    if max_length is not None and len(prompt_ids) >= max_length:
        return out | {
            "prompt_input_ids": [],
            "chosen_input_ids": [],
            "rejected_input_ids": [],
            "drop": DROP_LONG_IMAGE_PROMPT,
        }
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        return out | {
            "prompt_input_ids": [],
            "chosen_input_ids": [],
            "rejected_input_ids": [],
            "drop": DROP_LONG_IMAGE_PROMPT_LIMIT,
        }
    responses = [pair["chosen_input_ids"], pair["rejected_input_ids"]]
    fitted = fit_pair(prompt_ids, responses, max_length, max_completion_length, None, "keep_end")
    return out | _final_checks(fitted)


def processor_inputs(processor, prompt: str, images: list, index: int | str) -> dict:
    """The processor's tensors for one rendered prompt and its images (no special tokens added: the template
    rendered them); a processor error names the row."""
    try:
        return processor(text=[prompt], images=images or None, add_special_tokens=False, return_tensors="pt")
    except Exception as err:  # noqa: BLE001 - processors raise ValueError, IndexError ... on a placeholder mismatch
        raise ValueError(
            f"row {index}: the processor refused the prompt with its {len(images)} image(s) "
            f"({type(err).__name__}: {err})"
        ) from err


def prepare_vision_dataset(
    dataset,
    processor,
    name: str = "train",
    max_length: int | None = None,
    max_completion_length: int | None = None,
    max_prompt_length: int | None = None,
    drop_long_pairs: bool = False,
    root: str | Path | None = None,
):
    """Rows with images -> a Dataset of pairs (`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`,
    `prompt_text`, `images`) and its PrepareStats; unusable pairs are dropped and counted as for text rows.

    Relative image paths are read from `root` (default: the working directory). A bad row raises a
    ValueError/TypeError naming the dataset and the row (0-based).
    """
    from datasets import Dataset, Features, Image, Sequence, Value

    root = None if root is None else Path(root)
    ends = end_of_turn_ids(processor.tokenizer, processor)
    stats = PrepareStats(rows=len(dataset))
    kept: list[dict] = []
    with _row_errors_named(name):
        for index in range(len(dataset)):
            row = dict(dataset[index])
            out = vision_pair(row, index, processor, ends, root, max_length, max_completion_length, max_prompt_length)
            if drop_long_pairs and out.get("truncated") and not out["drop"]:
                out["drop"] = DROP_TOO_LONG
            if out["drop"]:
                stats.dropped[out["drop"]] += 1
                stats.first_dropped.setdefault(out["drop"], index)
                continue
            stats.truncated_responses += out.get("truncated", 0)
            stats.mostly_cut += out.get("mostly_cut", 0)
            kept.append({k: out[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")})
            kept[-1] |= {"prompt_text": out["prompt_text"], "images": out["images"]}
    stats.kept = len(kept)
    stats.dropped = Counter(stats.dropped)
    if stats.dropped or stats.truncated_responses:
        logger.warning("%s dataset: %s", name, stats.summary())
    if not kept:
        raise ValueError(f"{name} dataset: no usable pairs left ({stats.summary()})")
    features = Features(
        {
            "prompt_input_ids": Sequence(Value("int64")),
            "chosen_input_ids": Sequence(Value("int64")),
            "rejected_input_ids": Sequence(Value("int64")),
            "prompt_text": Value("string"),
            "images": Sequence(Image()),
        }
    )
    return Dataset.from_list(kept, features=features), stats


# ----------------------------------------------------------------------------------------------- pairs -> batch
def _cat_images(values: list[torch.Tensor]) -> torch.Tensor:
    """Per-pair vision tensors joined along dim 0; tensors that batch per row (Idefics3's [1, images, ...]) are
    padded with zeros to the most images of a pair (those models skip all-zero images)."""
    if values[0].dim() >= 4 and all(v.shape[0] == 1 for v in values):
        most = max(v.shape[1] for v in values)
        values = [torch.cat([v, v.new_zeros(1, most - v.shape[1], *v.shape[2:])], 1) for v in values]
    return torch.cat(values, 0)


class VisionPreferenceCollator(PreferenceCollator):
    """Pairs with images -> the batch of `PreferenceCollator` plus every vision input the processor gives.

    Layouts: padded for every family; padding_free (packing) and prefix_sharing for the SHARED_LAYOUT_FAMILIES.
    Per-image inputs (`pixel_values`, `image_grid_thw`, `image_sizes`, `pixel_attention_mask` ...) are the pairs'
    ones, joined in pair order, given twice (chosen rows, then rejected rows: `[2 * images, ...]`), as a plain padded
    batch has them, and `tower_once` runs the tower on the first half (`vision_twice`); with prefix sharing each
    pair's prompt, images included, is in the row once, and so are its vision inputs. Per-token inputs (`token_type_ids`,
    `mm_token_type_ids`) are the prompt's values where each prompt starts, 0 over the answers and padding. Image placeholder
    targets are left out of the NLL (they are not text the model could learn to write).
    """

    def __init__(
        self,
        processor,
        pad_token_id: int,
        placeholders: frozenset[int],
        layout: str = "padded",
        nll_on_prompt: bool = True,
        pad_to_multiple_of: int | None = None,
    ):
        """`placeholders`: the model's image token ids (`placeholder_ids(model)`), left out of the NLL."""
        super().__init__(pad_token_id, layout, nll_on_prompt, pad_to_multiple_of)
        self.processor = processor
        self.no_nll_targets = placeholders

    def _add_sequence(self, preds, positions, ids, prompt_len, seq, chosen, **kwargs):
        start = len(preds.nll)
        super()._add_sequence(preds, positions, ids, prompt_len, seq, chosen, **kwargs)
        for j in range(start, len(preds.nll)):
            if preds.target[j] in self.no_nll_targets:
                preds.nll[j] = False

    def _prompt_starts(self, batch: dict, i: int, pairs: int) -> list[tuple[int, int]]:
        """(row, position) where pair i's prompt starts in the batch: in its chosen and its rejected sequence, or once
        (prefix sharing)."""
        if self.layout == "padded":
            return [(i, 0), (pairs + i, 0)]
        if self.layout == "padding_free":
            cu = batch["cu_seq_lens_host"]
            return [(0, cu[i]), (0, cu[pairs + i])]
        return [(0, batch["prefix_segments_host"][i][0])]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(features)
        rows, width = batch["input_ids"].shape
        per_image: dict[str, list[torch.Tensor]] = {}
        per_token: dict[str, torch.Tensor] = {}
        pairs = len(features)
        for i, f in enumerate(features):
            images = list(f.get("images") or [])
            enc = processor_inputs(self.processor, f["prompt_text"], images, f"pair {i} of the batch, its")
            ids = enc["input_ids"][0]
            if list(f["prompt_input_ids"]) != ids.tolist():
                raise ValueError(
                    f"pair {i} of the batch: the processor's tokens of the prompt differ from the prepared ones "
                    "(was the dataset prepared with another processor?)"
                )
            for key, value in enc.items():
                if key in ("input_ids", "attention_mask"):
                    continue
                if key in PER_TOKEN_KEYS:
                    table = per_token.setdefault(key, torch.zeros((rows, width), dtype=value.dtype))
                    for row, start in self._prompt_starts(batch, i, pairs):
                        table[row, start : start + ids.numel()] = value[0]
                elif isinstance(value, torch.Tensor):
                    per_image.setdefault(key, []).append(value)
        # padded and padding-free: the prompt (with its images) in the chosen and in the rejected sequence, all chosen
        # sequences first; prefix sharing: each pair's prompt once
        twice = self.layout != "prefix_sharing"
        for key, values in per_image.items():
            joined = _cat_images(values)
            batch[key] = torch.cat([joined, joined], 0) if twice else joined
        batch.update(per_token)
        if per_image:
            batch["vision_keys"] = sorted(per_image) + sorted(per_token)
            batch["vision_twice"] = twice
        return batch


# ----------------------------------------------------------------------------------------------- the forward
_inner_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inner_with_features(model):
    """The module whose forward calls `self.get_image_features` (the innermost that has it); found once per model,
    not by a walk over its modules at every forward."""
    base = unwrap(model)
    found = _inner_cache.get(base)
    if found is None:
        for module in base.modules():
            if callable(getattr(type(module), "get_image_features", None)):
                found = module
        if found is None:
            raise ValueError(f"{type(base).__name__} has no get_image_features (not a vision-language model)")
        _inner_cache[base] = found
    return found


def _first_half(value: torch.Tensor) -> torch.Tensor:
    if value.shape[0] % 2:
        raise ValueError(f"tower_once: a vision input of {value.shape[0]} rows is not chosen + rejected")
    return value[: value.shape[0] // 2]


def _twice(value):
    """Features of the chosen rows' images, repeated for the rejected rows': a tensor [images or tokens, ...] along
    dim 0, a tuple or list of per-image tensors as a longer sequence."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value], 0)
    if isinstance(value, (tuple, list)):
        return type(value)(list(value) * 2)
    return value


# the outputs of get_image_features a model's forward reads (a field left out fails the model's own count check)
TWICE_FIELDS = ("pooler_output", "last_hidden_state")


def _output_twice(output):
    if isinstance(output, (torch.Tensor, tuple, list)):
        return _twice(output)
    for key in TWICE_FIELDS:
        if output.get(key) is not None:
            output[key] = _twice(output[key])
    if output.get("deepstack_features") is not None:  # Qwen3-VL: per layer, per-image features
        output["deepstack_features"] = [_twice(layer) for layer in output["deepstack_features"]]
    return output


def mrope_position_ids(model, batch: dict) -> torch.Tensor | None:
    """Qwen-VL's 3-D rotary positions for a padding-free or prefix-shared row with images: each sequence's as the
    model computes them for that sequence alone (its `get_rope_index`); a prefix-shared rejected answer continues from
    the end of the prompt, as text after an image does. Returns `[4, 1, N]`: the per-sequence text positions, then the
    three M-RoPE rows (the form Qwen-VL takes for a packed row); None where the batch needs none.
    """
    if batch.get("mm_token_type_ids") is None or batch["input_ids"].shape[0] != 1:
        return None
    inner = _inner_with_features(model)
    ids, types, text = batch["input_ids"][0], batch["mm_token_type_ids"][0], batch["position_ids"][0]
    if "prefix_segments_host" in batch:  # each pair's [prompt][chosen]; rejected: after the prompt
        segments = batch["prefix_segments_host"]
        spans = [(start, start + prompt + chosen) for start, prompt, chosen, _ in segments]
    else:
        cu = batch["cu_seq_lens_host"]
        spans = list(zip(cu[:-1], cu[1:]))
    width = max(end - start for start, end in spans)
    seq_ids = ids.new_zeros(len(spans), width)
    seq_types = types.new_zeros(len(spans), width)
    mask = ids.new_zeros(len(spans), width)
    for k, (start, end) in enumerate(spans):
        seq_ids[k, : end - start], seq_types[k, : end - start] = ids[start:end], types[start:end]
        mask[k, : end - start] = 1
    # the vision inputs are in the row's order: each sequence's images in turn (padding-free: chosen sequences, then
    # rejected; prefix sharing: each pair's prompt once)
    grid = batch.get("image_grid_thw")
    positions, _ = inner.get_rope_index(
        input_ids=seq_ids, mm_token_type_ids=seq_types, image_grid_thw=grid, attention_mask=mask
    )  # [3, sequences, width]
    out = torch.zeros((3, ids.shape[0]), dtype=positions.dtype, device=positions.device)
    for k, (start, end) in enumerate(spans):
        out[:, start:end] = positions[:, k, : end - start]
    if "prefix_segments_host" in batch:
        for k, (start, prompt, chosen, rejected) in enumerate(batch["prefix_segments_host"]):
            after = positions[:, k, :prompt].max() + 1 if prompt else 0
            first = start + prompt + chosen
            steps = torch.arange(rejected, device=out.device, dtype=out.dtype)
            out[:, first : first + rejected] = after + steps
    return torch.cat([text[None].to(out.dtype), out], 0)[:, None, :]


@contextmanager
def tower_once(model, batch: dict):
    """During the forward of a batch from VisionPreferenceCollator, the model's `get_image_features` runs on the
    chosen rows' images only and its output stands for the rejected rows' too (see the module docstring)."""
    if not batch.get("vision_twice") or "pixel_values" not in batch:
        yield
        return
    inner = _inner_with_features(model)
    original = type(inner).get_image_features.__get__(inner)
    # the collator's doubled per-image inputs, as the model hands them on (other keywords, such as a packed row's
    # `cu_seq_lens_q`, may reach get_image_features too and pass unchanged)
    keys = [k for k in batch["vision_keys"] if k not in PER_TOKEN_KEYS]
    doubled = {id(batch[k]) for k in keys}

    def halve(name, value):
        if isinstance(value, torch.Tensor) and (id(value) in doubled or name in keys):
            halved.append(name)
            return _first_half(value)
        return value

    def once(*args, **kwargs):
        halved.clear()
        args = [halve(None, a) for a in args]
        kwargs = {k: halve(k, v) for k, v in kwargs.items()}
        if not halved:
            raise ValueError("tower_once: get_image_features was not given the batch's pixel_values")
        return _output_twice(original(*args, **kwargs))

    halved: list = []

    inner.get_image_features = once
    try:
        yield
    finally:
        del inner.get_image_features
