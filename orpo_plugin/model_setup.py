"""Loading a model, and making it ready before training: `load_causal_lm` (the one loader, used by the trainer for
a name or path with `model_init_kwargs`, by `orpo-plugin eval` and by the demo), a PEFT adapter put on (after k-bit
preparation for a 4-/8-bit model), dropout turned off."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from .config import ORPOConfig


def load_causal_lm(
    name: str, dtype="auto", device=None, adapter: str | None = None, what: str = "dtype", vision=False, **kwargs
):
    """`AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)` (with `vision`:
    `AutoModelForImageTextToText`, the vision-language model with its vision tower), moved to `device` when given,
    with the PEFT adapter saved in the folder `adapter` applied when given.

    `dtype`: "auto" (as saved), a torch dtype or its name ("bfloat16"); another name is a ValueError naming `what`.
    """
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"{what}: unknown dtype {dtype!r}")
        dtype = getattr(torch, dtype)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(name, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if device is not None:
            model = model.to(device)
    return model


def load_tokenizer(name: str, **kwargs):
    """`AutoTokenizer.from_pretrained(name, **kwargs)`, its EOS made the pad token when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, args: ORPOConfig, vision: bool = False):
    """The trainer's model from a name or path, with `args.model_init_kwargs` (`torch_dtype` read as `dtype`); with
    `vision` (a dataset with images) the vision-language model."""
    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", "auto"))
    kwargs.pop("dtype", None)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if vision:
        from .vision import keep_tower_unquantized

        keep_tower_unquantized(kwargs.get("quantization_config"))
    return load_causal_lm(name, dtype, what="model_init_kwargs.dtype", vision=vision, **kwargs)


def apply_peft(model, peft_config, args: ORPOConfig):
    from peft import PeftConfig, get_peft_model, prepare_model_for_kbit_training

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig, got {type(peft_config).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError("the model already has a PEFT adapter; pass the base model with peft_config")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        dtypes = [m.weight.dtype for m in embeddings]
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
        if args.bf16 or args.fp16:
            # PEFT upcasts every non-quantized weight to float32, the frozen input and output embeddings too
            # (2 GiB more at a 128k x 4096 vocabulary). Under mixed precision they are only read in half
            # precision, so their loaded dtype is restored exactly; norms stay float32 (as in TRL).
            for module, dtype in zip(embeddings, dtypes):
                if module.weight.dtype != dtype and not module.weight.requires_grad:
                    module.to(dtype)
    elif args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
