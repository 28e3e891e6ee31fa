"""Tiny random-init vision-language models with their real processors, built on the spot (nothing is downloaded).

`build_vlm(family)` gives a float32 model of the family's transformers class and the family's own Processor class
around (a) its `*ImageProcessorPil` image processor at tiny sizes and (b) a byte-level BPE tokenizer trained here on a
small corpus, with the family's special tokens and a chat template in the family's style. The text model has hidden 32,
2 layers, 4 heads / 2 kv heads (head_dim 8) and weights drawn with initializer_range 0.2, as in models.py, so logits
have spread; the vision tower has 1-2 layers of hidden 32 and 8-pixel patches. A 32x32 image becomes 4 placeholder
tokens (16 for LLaVA). Gemma 3, LLaVA, Idefics3 and SmolVLM resize every image to 32x32; Qwen rounds each side to a
multiple of 16 pixels and keeps the area between 32x32 and 64x64 (4 to 16 tokens).

For a batch, pass the images nested per sample (`[[img], [img]]`): Gemma 3 and SmolVLM read a flat list as the images
of one sample. Processors save with `save_pretrained`; without torchvision `AutoProcessor` cannot load Qwen's or
SmolVLM's back (see `_without_video`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from unittest import mock

import torch

if TYPE_CHECKING:
    from PIL import Image
    from transformers import ProcessorMixin

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "idefics3", "smolvlm")

PATCH = 8  # vision patch side (pixels), every family
IMAGE = 32  # image side (pixels) of the families that resize to a fixed size

_CORPUS = [
    "What is this? It is a small red square on a blue field.",
    "Describe the picture in one short sentence, please.",
    "The image shows a cat sitting on a green mat next to a dog.",
    "A photo of two birds, a tree and the sun over the sea.",
    "Which color is the largest shape? The answer is yellow.",
    "There are three circles and one line in this drawing.",
    "Yes, the answer is correct; no, that one is wrong.",
    "How many objects can you count in the image? Four.",
]

# fields every family's text config takes
_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)
# fields of the SigLIP/CLIP-like towers (Gemma 3, LLaVA, Idefics3, SmolVLM)
_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, patch_size=PATCH, image_size=IMAGE)
# Qwen's multimodal RoPE: the (temporal, height, width) sections sum to head_dim / 2
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}


def _chat_template(header: str, image: str, end: str, generation: str, prefix: str = "") -> str:
    """A Jinja chat template: `prefix`, then per message `header` (a Jinja expression), its content and `end`.

    String content renders as is; of typed parts, `{"type": "image"}` renders as `image` and text parts as their text.
    """
    return (
        prefix + "{% for message in messages %}{{ " + header + " }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ " + repr(image) + " }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ " + repr(end) + " }}{% endfor %}"
        "{% if add_generation_prompt %}{{ " + repr(generation) + " }}{% endif %}"
    )


_QWEN3_TEMPLATE = _chat_template(
    "'<|im_start|>' + message['role'] + '\\n'",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_end|>\n",
    "<|im_start|>assistant\n",
)
# Qwen2-VL and Qwen2.5-VL open with a default system turn when the conversation has none
_QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + _QWEN3_TEMPLATE
)
_GEMMA3_TEMPLATE = _chat_template(
    "'<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'",
    "<start_of_image>",
    "<end_of_turn>\n",
    "<start_of_turn>model\n",
    prefix="{{ bos_token }}",
)
_LLAVA_TEMPLATE = _chat_template("message['role'].upper() + ': '", "<image>\n", " ", "ASSISTANT:")
# Idefics3 and SmolVLM: "User:<image>..." when the content opens with an image, "User: ..." otherwise
_IDEFICS3_HEADER = (
    "message['role'].capitalize() + (':' if message['content'] is not string and "
    "message['content'][0]['type'] == 'image' else ': ')"
)


def _tokenizer(specials: str, pad: str, bos: str, eos: str, **named: str):
    """A byte-level BPE trained on `_CORPUS`, its space-separated `specials` first (ids 0, 1, ...).

    `named` tokens become attributes, e.g. image_token="<image>" gives `tokenizer.image_token(_id)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320 + len(specials.split()),
        special_tokens=specials.split(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, extra_special_tokens=named or None
    )


def _text_ids(tokenizer) -> dict:
    """The text config's vocab size and pad/bos/eos ids, read off `tokenizer`."""
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _without_video(processor_cls):
    """`processor_cls` built without its video processor.

    ProcessorMixin checks a video processor against `VideoProcessorMixin`, which transformers only exports with
    torchvision installed (AttributeError on `VIDEO_PROCESSOR_MAPPING._extra_content` otherwise). The subclass's
    signature has no `video_processor`, so ProcessorMixin neither expects nor checks one. Every other method is the
    family's own but `apply_chat_template`: SmolVLM's reads its video processor's frame defaults, so the subclass
    takes ProcessorMixin's (which Qwen's processors use anyway). Videos are not supported.
    """
    from transformers import ProcessorMixin

    class Processor(processor_cls):
        def __init__(self, image_processor, tokenizer, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        apply_chat_template = ProcessorMixin.apply_chat_template

    Processor.__name__ = Processor.__qualname__ = processor_cls.__name__
    return Processor


def _qwen(family: str):
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL: model class, config and processor."""
    import transformers as tf

    tokenizer = _tokenizer(
        "<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>",
        pad="<|endoftext|>",
        bos="<|endoftext|>",
        eos="<|im_end|>",
    )
    # images resized to multiples of 2x2 patches (one placeholder token each) between 32x32 and 64x64 pixels
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (4 * PATCH) ** 2, "longest_edge": (8 * PATCH) ** 2},
    )
    text = dict(_TEXT, **_text_ids(tokenizer), rope_parameters=dict(_MROPE))
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        config_cls, model_cls, processor_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        vision.update(embed_dim=32, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        config_cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        processor_cls = tf.Qwen2_5_VLProcessor
        # the first block attends within windows of 2x2 placeholder tokens, the second over the whole image
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=4 * PATCH, fullatt_block_indexes=[1])
    else:
        config_cls, model_cls, processor_cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
        text["head_dim"] = 8
        # 4x4 learned position embeddings (interpolated to the grid); the first block's features go to text layer 0
        vision.update(intermediate_size=64, out_hidden_size=32, num_position_embeddings=16)
        vision["deepstack_visual_indexes"] = [0]
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    template = _QWEN3_TEMPLATE if family == "qwen3_vl" else _QWEN2_TEMPLATE
    return model_cls, config, _without_video(processor_cls)(image_processor, tokenizer, chat_template=template)


def _gemma3(family: str):
    """Gemma 3: model class, config and processor."""
    import transformers as tf

    tokenizer = _tokenizer(
        "<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn> <start_of_image> <end_of_image> <image_soft_token>",
        pad="<pad>",
        bos="<bos>",
        eos="<eos>",
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
        eot_token="<end_of_turn>",  # special, as in Gemma's tokenizer: the template's end of an assistant turn
    )
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    # 4x4 patches pooled to 2x2: 4 soft tokens between <start_of_image> and <end_of_image>
    processor = tf.Gemma3Processor(image_processor, tokenizer, chat_template=_GEMMA3_TEMPLATE, image_seq_length=4)
    config = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(
            **_TEXT,
            **_text_ids(tokenizer),
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=tf.SiglipVisionConfig(**_VISION, num_hidden_layers=1),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    return tf.Gemma3ForConditionalGeneration, config, processor


def _llava(family: str):
    """LLaVA (1.5 style, CLIP tower): model class, config and processor."""
    import transformers as tf

    tokenizer = _tokenizer("<unk> <s> </s> <pad> <image>", pad="<pad>", bos="<s>", eos="</s>")
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size=IMAGE)
    # CLIP's 4x4 patches without its CLS token: 16 <image> tokens
    processor = tf.LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    config = tf.LlavaConfig(
        text_config=tf.LlamaConfig(**_TEXT, **_text_ids(tokenizer), head_dim=8),
        vision_config=tf.CLIPVisionConfig(**_VISION, num_hidden_layers=2, projection_dim=32),
        image_token_index=processor.image_token_id,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return tf.LlavaForConditionalGeneration, config, processor


def _idefics3(family: str):
    """Idefics3 or SmolVLM: model class, config and processor."""
    import transformers as tf

    smol = family == "smolvlm"
    bos = "<|im_start|>" if smol else "<|begin_of_text|>"
    grid = " ".join(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
    tokenizer = _tokenizer(
        f"<pad> {bos} <end_of_utterance> <fake_token_around_image> <image> <global-img> {grid}",
        pad="<pad>",
        bos=bos,
        eos="<end_of_utterance>",
    )
    # no tiling: one 32x32 view per image, its 4x4 patches shuffled 2x2 into 4 <image> tokens (the <row_i_col_j>
    # tokens are there for a test that turns splitting on)
    sizes = dict(size={"longest_edge": IMAGE}, max_image_size={"longest_edge": IMAGE}, do_image_splitting=False)
    template = _chat_template(_IDEFICS3_HEADER, "<image>", "<end_of_utterance>\n", "Assistant:", prefix=bos)
    text = tf.LlamaConfig(**_TEXT, **_text_ids(tokenizer), head_dim=8)
    if smol:
        from transformers.models.smolvlm import processing_smolvlm

        # SmolVLMProcessor refuses to build without num2words, which only its video prompts use
        with mock.patch.object(processing_smolvlm, "num2words", processing_smolvlm.num2words or str):
            processor = _without_video(tf.SmolVLMProcessor)(
                tf.SmolVLMImageProcessorPil(**sizes), tokenizer, image_seq_len=4, chat_template=template
            )
        config_cls, vision_cls, model_cls = tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tf.SmolVLMForConditionalGeneration
    else:
        processor = tf.Idefics3Processor(
            tf.Idefics3ImageProcessorPil(**sizes), tokenizer, image_seq_len=4, chat_template=template
        )
        config_cls, vision_cls = tf.Idefics3Config, tf.Idefics3VisionConfig
        model_cls = tf.Idefics3ForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=vision_cls(**_VISION, num_hidden_layers=1),
        scale_factor=2,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model_cls, config, processor


_BUILDERS = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "gemma3": _gemma3,
    "llava": _llava,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
}


def build_vlm(family: str, seed: int = 0, resize=None) -> tuple[torch.nn.Module, ProcessorMixin]:
    """A float32 random-init model of `family` (one of FAMILIES), deterministic for `seed`, and its processor.

    `resize(config, processor)`, when given, changes the config and processor before the model is built (the
    benchmarks' larger sizes).
    """
    model_cls, config, processor = _BUILDERS[family](family)
    if resize is not None:
        resize(config, processor)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
        if family == "gemma3":
            # Gemma 3 zero-inits its image projection, which would keep the images from reaching the logits
            model.model.multi_modal_projector.mm_input_projection_weight.data.normal_(0, _TEXT["initializer_range"])
    return model.float(), processor


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (IMAGE, IMAGE)) -> list[Image.Image]:
    """`n` random RGB images of `size` (width, height), deterministic for `seed`."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    return [Image.fromarray(p, "RGB") for p in pixels]


def image_message(text: str, images: int = 1) -> list[dict]:
    """A user turn in TRL's vision format: `images` image parts, then `text`."""
    return [{"role": "user", "content": [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]}]
