"""The model's output layer (`OutputHead`), and running it where its weight is whole.

Under FSDP2 and DeepSpeed ZeRO-3 the output layer's weight is whole only inside the forward of the module that
shards it (FSDP2: the `fully_shard`ed module holding it, usually the root; ZeRO-3: the output layer itself). The
chunked computation then runs inside that forward ("forward redirection": the module's `forward` is swapped for
ours during one call), so the engine's own hooks gather the weight, and reduce-scatter its gradient in backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ._compat import dtensor_class, fsdp_module_class


def unwrap(model):
    """The innermost `PreTrainedModel` (through DDP/accelerate wrappers and PEFT)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is model:
                return model
            model = base
        else:
            return model


@dataclass
class OutputHead:
    """What the model's output layer computes: logits = transform(h @ W^T + b)."""

    module: torch.nn.Module
    scale: float | None = None
    softcap: float | None = None
    chunkable: bool = True
    reason: str = ""
    vocab_size: int = 0  # from the config: a sharded (ZeRO-3) weight may be an empty placeholder

    @classmethod
    def of(cls, model) -> OutputHead:
        base = unwrap(model)
        module = base.get_output_embeddings()
        if module is None:
            raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head); ORPO needs a causal LM")
        config = base.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        softcap = getattr(text_config, "final_logit_softcapping", None)
        scale = getattr(text_config, "logit_scale", None)
        if scale is not None and not isinstance(scale, (int, float)):
            scale = None
        weight = getattr(module, "weight", None)
        vocab = weight.shape[0] if weight is not None and weight.numel() > 0 else getattr(text_config, "vocab_size", 1)
        head = cls(module, scale=float(scale) if scale is not None else None, softcap=softcap, vocab_size=int(vocab))
        if type(module) is not torch.nn.Linear:
            head.chunkable = False
            head.reason = f"the output layer is a {type(module).__name__} (adapter or quantized), not a plain Linear"
        return head

    def logits(self, hidden: torch.Tensor, forward=None) -> torch.Tensor:
        """The model's logits for `hidden`; `forward`: the output layer's own forward, when its call is redirected."""
        logits = (forward or self.module)(hidden).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def logits_by(self, owner: torch.nn.Module | None):
        """`logits` as a function of the hidden states, usable inside a redirected call of `owner`."""
        if owner is not self.module:
            return self.logits
        original = self.module.forward  # taken before the redirection replaces it
        return lambda hidden: self.logits(hidden, original)


@contextlib.contextmanager
def capture_hidden_states(model):
    """Collect the decoder's final hidden states (after its last norm) during a forward."""
    decoder = unwrap(model).get_decoder()
    store = {}

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        store["hidden"] = hidden

    handle = decoder.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def sharded_head_owner(model, head: OutputHead) -> torch.nn.Module | None:
    """The module inside whose forward the output layer's weight is whole, when a sharding engine manages it.

    FSDP2: the nearest `fully_shard`ed module holding the output layer (itself or an ancestor; usually the root).
    DeepSpeed ZeRO-3: the output layer itself (ZeRO-3 gathers each module's own parameters around its forward).
    None when the weight is an ordinary tensor (one process, DDP, ZeRO-1/2).
    """
    module = head.module
    if getattr(getattr(module, "weight", None), "ds_id", None) is not None:
        return module
    FSDPModule = fsdp_module_class()
    if FSDPModule is None:  # pragma: no cover - torch without FSDP2
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        return None
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        candidate = model.get_submodule(".".join(parts[:depth]))
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


def call_in_forward(module: torch.nn.Module, fn, *args, **kwargs):
    """Call `module` with its forward replaced by `fn`, so its forward hooks (FSDP2's all-gather and gradient
    reduce-scatter registration, ZeRO-3's parameter gathering) run around `fn` ("forward redirection")."""
    had_own = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args, **kwargs)
    finally:
        if had_own:
            module.forward = saved
        else:
            del module.forward


def _is_fsdp2_root(model) -> bool:
    FSDPModule = fsdp_module_class()
    return FSDPModule is not None and isinstance(model, FSDPModule)


def _sharded_now(weight) -> bool:
    """Whether `weight` is a shard right now (outside the forward that gathers it)."""
    if getattr(weight, "ds_id", None) is not None:
        return True
    DTensor = dtensor_class()
    return DTensor is not None and isinstance(weight, DTensor)


def hidden_then_head(model, kwargs: dict, select, apply, owner: torch.nn.Module | None, head_module=None):
    """Run `model(**kwargs)`, take its decoder's final hidden states through `select`, and return
    (`apply(selected hidden)`, the model's output), with `apply` running where the weight of the output layer
    (`head_module`) is whole.

    Under FSDP2 (`model` is the `fully_shard`ed root) the whole computation runs inside one call of the root, whose
    forward is redirected: our outputs are the root's outputs, so its backward hooks (and the final gradient
    reduce-scatter they schedule) see the loss. Inside it, `apply` uses the output layer's weight directly when it
    is whole there (the root's own group, or a group that stays gathered after its forward), and otherwise runs
    inside a redirected call of `owner` (the output layer's own group; ZeRO-3's output layer).
    """

    def head_part(hidden):
        if owner is None or owner is model or not _sharded_now(head_module.weight):  # read now, not before the forward
            return apply(hidden)
        return call_in_forward(owner, apply, hidden)

    if owner is not None and _is_fsdp2_root(model):
        original = model.forward

        def whole(**kw):
            with capture_hidden_states(model) as store:
                output = original(**kw)
            return head_part(select(store["hidden"])), output

        return call_in_forward(model, whole, **kwargs)
    with capture_hidden_states(model) as store:
        output = model(**kwargs)
    return head_part(select(store["hidden"])), output
