"""Which kernel runs a padding-free, packed or prefix-shared row (`pick_attention`, `choose_backend`), the
registration of every orpo_* path with transformers (`register`), and running a model under one
(`attention_implementation`)."""

from __future__ import annotations

import contextlib
import weakref

import torch

from . import flex, varlen
from .contract import ATTENTION_NAME, FEATURES, FLASH_NAME, FLEX_NAME, SUPPORTED_BY, VARLEN_NAME
from .flex import ORPO_FLEX_FEATURES, orpo_flex_attention
from .sdpa import ORPO_SDPA_FEATURES, orpo_sdpa_attention
from .varlen import ORPO_FLASH_FEATURES, orpo_flash_attention, orpo_varlen_attention

# ---------------------------------------------------------------------------------------------------------------
# Which kernel runs a padding-free / packed / prefix-shared row.

# `attention_backend` values -> the attention function registered for them; "auto" tries them in this order on CUDA.
BACKENDS = {"flash_attn": FLASH_NAME, "torch_varlen": VARLEN_NAME, "flex": FLEX_NAME, "sdpa": ATTENTION_NAME}
BACKEND_CHOICES = ("auto", *BACKENDS)
# Implementations whose packed-sequence handling transformers provides from position_ids alone.
NATIVE_PACKED = (
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "kernels-community/flash-attn",
)


def backend_features() -> dict:
    """Backend -> the attention features it honours, or None where it cannot run on this machine's GPU."""
    # looked up on the kernel modules, where the tests stand in for kernels this machine lacks
    torch_varlen = varlen.torch_varlen_kernel()
    return {
        "flash_attn": ORPO_FLASH_FEATURES if varlen.flash_attn_available() else None,
        "torch_varlen": torch_varlen.features if torch_varlen is not None else None,
        "flex": ORPO_FLEX_FEATURES if flex.flex_available() else None,
        "sdpa": ORPO_SDPA_FEATURES,
    }


def on_cuda(model, use_cpu: bool) -> bool:
    """Whether `model` trains on a CUDA device (already there, or the trainer will move it there)."""
    if any(p.device.type == "cuda" for p in model.parameters()):
        return True
    return not use_cpu and torch.cuda.is_available()


def model_features(model) -> set:
    """The attention features (keys of FEATURES) the model's attention layers pass, read from the layers.

    Read statically, to skip a backend that cannot honour them; a feature missed here still stops training at
    start, when `check_layout` runs the chosen backend once.
    """
    found = set()
    for m in model.modules():
        if not (hasattr(m, "scaling") and hasattr(m, "is_causal")):
            continue
        config = getattr(m, "config", None)
        window = m.sliding_window if hasattr(m, "sliding_window") else getattr(config, "sliding_window", None)
        if window is not None:
            found.add("sliding_window")
        if hasattr(m, "attn_logit_softcapping"):
            softcap = m.attn_logit_softcapping
        else:
            softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            found.add("softcap")
        if isinstance(getattr(m, "sinks", None), torch.Tensor):
            found.add("s_aux")
        if float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0:
            found.add("dropout")
    return found


def choose_backend(model, forced: str = "auto", cuda: bool = True) -> tuple:
    """(backend, registered attention name, why) for a padding-free/packed/prefix-shared row of `model`.

    On CUDA, "auto" takes the first of flash_attn, torch_varlen, flex, sdpa that runs here and honours every feature
    the model uses; orpo_sdpa honours them all. A forced backend is refused when it cannot run here or cannot honour
    one of the model's features. Off CUDA only sdpa (orpo_sdpa) runs: the others' kernels, or backward, need a GPU.
    """
    if forced not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {BACKEND_CHOICES}, got {forced!r}")
    needs = model_features(model)
    available = (
        backend_features()
        if cuda
        else {"flash_attn": None, "torch_varlen": None, "flex": None, "sdpa": ORPO_SDPA_FEATURES}
    )
    if forced != "auto":
        features = available[forced]
        if features is None:
            why = (
                {
                    "flash_attn": "the flash-attn package does not import",
                    "torch_varlen": "this torch has no usable torch.nn.attention.varlen.varlen_attn",
                    "flex": "this torch has no flex_attention",
                }[forced]
                if cuda
                else "it needs a CUDA model (flex_attention has no backward on CPU)"
            )
            raise ValueError(f"attention_backend={forced!r} cannot run: {why}; use attention_backend='auto' or 'sdpa'")
        missing = sorted(needs - set(features))
        if missing:
            raise ValueError(
                f"attention_backend={forced!r} cannot honour {', '.join(FEATURES[n] for n in missing)} of "
                f"{type(model).__name__}; use attention_backend='auto' (or the padded layout). Supported by: "
                + "; ".join(f"{FEATURES[n]}: {SUPPORTED_BY[n]}" for n in missing)
            )
        return forced, BACKENDS[forced], "forced by attention_backend"
    skipped = []
    for name, features in available.items():
        if features is None:
            skipped.append(f"{name} unavailable")
            continue
        missing = sorted(needs - set(features))
        if missing:
            skipped.append(f"{name} lacks {', '.join(missing)}")
            continue
        why = "first available" + (f" ({'; '.join(skipped)})" if skipped else "")
        return name, BACKENDS[name], why
    raise AssertionError("orpo_sdpa honours every feature")  # pragma: no cover


def pick_attention(
    base, layout: str, attention_backend: str = "auto", use_cpu: bool = False, varlen_attention: bool = True
) -> tuple[str | None, str]:
    """(attention implementation registered for `layout` on the unwrapped model `base`, None for the model's own;
    why), or a clear refusal. On CUDA, or when `attention_backend` is forced, the kernel comes from `choose_backend`."""
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    if not getattr(base, "_supports_attention_backend", False) and not str(impl).startswith("flash"):
        raise ValueError(
            f"{type(base).__name__} does not use transformers' attention interface, so it cannot take the "
            f"{layout} layout; use the padded layout (padding_free=False, packing=False, prefix_sharing=False)"
        )
    forced = attention_backend != "auto"
    cuda = on_cuda(base, use_cpu)
    picks_kernel = impl in ("sdpa", "eager", ATTENTION_NAME) and (layout == "prefix_sharing" or varlen_attention)
    if forced or (cuda and picks_kernel):
        backend, name, why = choose_backend(base, attention_backend, cuda)
        return register(name), f"attention_backend={backend}: {why}"
    if layout == "prefix_sharing":
        if impl in ("sdpa", "eager", ATTENTION_NAME):
            return register(), f"{impl} model"
        if impl in ("flex_attention", FLEX_NAME):
            return register(FLEX_NAME), f"{impl} model"
        if impl in ("flash_attention_2", FLASH_NAME):
            varlen._flash_kernel()  # fail now, with a clear message, if flash-attn is missing
            return register(FLASH_NAME), f"{impl} model"
        raise ValueError(
            f"prefix_sharing runs on sdpa, eager (through orpo_plugin's '{ATTENTION_NAME}'), "
            f"flex_attention (a prefix-sharing BlockMask) or flash_attention_2 (varlen, different cu_seqlens "
            f"for queries and keys) models; this model uses attn_implementation={impl!r}"
        )
    if impl in ("sdpa", "eager") and varlen_attention:
        return register(), f"{impl} model"
    if impl in NATIVE_PACKED or impl == ATTENTION_NAME:
        return None, f"{impl} model, packed sequences from position_ids"
    raise ValueError(f"padding_free/packing needs attn_implementation in {NATIVE_PACKED}; this model uses {impl!r}")


# ---------------------------------------------------------------------------------------------------------------
# Registration with transformers, and running a model under a registered path.


def _no_mask(*args, **kwargs):
    return None


_registered = False


def register(name: str = ATTENTION_NAME) -> str:
    """Register orpo_sdpa, orpo_flex, orpo_flash, orpo_varlen (and no-op mask builders) with transformers; return `name`."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, orpo_sdpa_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
        AttentionInterface.register(FLEX_NAME, orpo_flex_attention)
        AttentionMaskInterface.register(FLEX_NAME, _no_mask)
        AttentionInterface.register(FLASH_NAME, orpo_flash_attention)
        AttentionMaskInterface.register(FLASH_NAME, _no_mask)
        AttentionInterface.register(VARLEN_NAME, orpo_varlen_attention)
        AttentionMaskInterface.register(VARLEN_NAME, _no_mask)
        _registered = True
    return name


_configs_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _configs_of(model) -> dict:
    """The distinct configs carrying an attention implementation in `model` (walked once per model), except a
    vision-language model's vision tower's: its attention is over each image's patches, not the layout's rows."""
    configs = _configs_cache.get(model)
    if configs is None:
        towers = {id(getattr(m.config, "vision_config", None)) for m in model.modules() if hasattr(m, "config")}
        configs = {
            id(m.config): m.config
            for m in model.modules()
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation") and id(m.config) not in towers
        }
        _configs_cache[model] = configs
    return configs


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Temporarily run `model` with another attention implementation (its saved config never sees it)."""
    if name is None:
        yield
        return
    configs = _configs_of(model)
    previous = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            _set_own(c, name)
        yield
    finally:
        for k, c in configs.items():
            _set_own(c, previous[k])


def _set_own(config, name: str | None) -> None:
    """Set a config's attention implementation, not its sub-configs' (transformers' setter recurses into them, and
    a vision tower's config is left out on purpose, see `_configs_of`)."""
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = name
    else:
        config._attn_implementation = name
