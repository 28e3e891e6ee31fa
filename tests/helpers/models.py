"""Tiny random-init configs of the architectures the fast layouts are checked on (nothing is downloaded).

Windowed models get a window of WINDOW tokens so that test sequences run past it; models with per-layer attention
types mix sliding and full layers. Every model is float32, 2-4 layers, hidden 32. Weights are drawn with
initializer_range 0.2 (not the configs' 0.02), so attention is peaked (mean top probability ~0.4) and logits have a
spread of ~1: with near-uniform attention a path that mishandled scaling, soft-capping or sinks would still pass.
Gemma 2's soft-caps (1.0) sit at those sizes and GPT-OSS's sinks are drawn from N(0, 1) for the same reason.
"""

from __future__ import annotations

import torch

WINDOW = 4


def _common(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )


def _spec(vocab: int) -> dict:
    """name -> (config class name, model class name, config overrides, attention implementation)."""
    mixed = ["sliding_attention", "full_attention"]
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
        "qwen2": (
            "Qwen2Config",
            "Qwen2ForCausalLM",
            dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=mixed, max_window_layers=1),
            "sdpa",
        ),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "sdpa"),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            dict(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
            "sdpa",
        ),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW), "sdpa"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, "sdpa"),
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            dict(
                sliding_window=WINDOW,
                layer_types=mixed,
                attn_logit_softcapping=1.0,
                final_logit_softcapping=1.0,
                query_pre_attn_scalar=16,
            ),
            "eager",
        ),
        "gemma3": (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            dict(
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                num_hidden_layers=3,
                query_pre_attn_scalar=16,
            ),
            "sdpa",
        ),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW), "sdpa"),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "sdpa"),
        "gpt_oss": (
            "GptOssConfig",
            "GptOssForCausalLM",
            dict(sliding_window=WINDOW, layer_types=mixed, num_local_experts=4, num_experts_per_tok=2),
            "eager",
        ),
        "cohere2": (
            "Cohere2Config",
            "Cohere2ForCausalLM",
            dict(sliding_window=WINDOW, layer_types=mixed, logit_scale=0.5),
            "sdpa",
        ),
    }


MODEL_NAMES = tuple(_spec(10))


def build(name: str, vocab: int, attn_implementation: str | None = None, seed: int = 0, **overrides):
    """A float32 random-init model of architecture `name`, deterministic for `seed`."""
    import transformers

    config_cls, model_cls, extra, impl = _spec(vocab)[name]
    kwargs = {**_common(vocab), **extra, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn_implementation or impl
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config)
        # random, non-zero sinks/biases so that a path that ignores them shows it
        for n, p in model.named_parameters():
            if n.endswith("sinks"):
                p.data.normal_(0, 1.0)
    return model.float()
