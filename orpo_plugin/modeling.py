"""One ORPO forward: model -> final hidden states -> log-probs of the predicted tokens -> loss and metric sums.

The model is called as a whole (so DDP/FSDP/DeepSpeed wrappers and PEFT hooks run) with `logits_to_keep=1`;
the final hidden states are taken from its decoder by a forward hook, and only the positions the loss needs
go through the output layer: in chunks (`chunked.py`) or as one logits tensor.

Under FSDP2 and DeepSpeed ZeRO-3 the output layer's weight is whole only inside the forward of the module that
shards it (FSDP2: the `fully_shard`ed module holding it, usually the root; ZeRO-3: the output layer itself). The
chunked computation then runs inside that forward ("forward redirection": the module's `forward` is swapped for
ours during one call), so the engine's own hooks gather the weight, and reduce-scatter its gradient in backward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from dataclasses import dataclass

import torch

from .chunked import chunked_target_logps, full_target_logps
from .losses import ORPOOutput, orpo_loss, sequence_logps

logger = logging.getLogger("orpo_plugin")

MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "prefix_segments",
)


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
    def of(cls, model) -> "OutputHead":
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


def cpu_4bit_layers(model) -> list:
    """bitsandbytes 4-bit layers that may switch to an inference-only CPU weight layout (see below)."""
    return [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


@contextlib.contextmanager
def training_weight_layout(layers: list):
    """Evaluate 4-bit layers without letting bitsandbytes repack their weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first eval-mode forward without grad;
    a later training step then backpropagates through a kernel that has no autograd (the gradient reaching the
    layers below is wrong, with only a warning). Inside training, evaluation keeps the training layout.
    """
    saved = [m.support_avx512bf16_for_cpu for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.support_avx512bf16_for_cpu = flag


def repacked_layers(layers: list) -> int:
    """How many of the 4-bit `layers` bitsandbytes has repacked for CPU inference."""
    return sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)) for m in layers)


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


def _accepts(model, name: str) -> bool:
    return _forward_accepts(type(unwrap(model)), name)


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def sharded_head_owner(model, head: OutputHead) -> torch.nn.Module | None:
    """The module inside whose forward the output layer's weight is whole, when a sharding engine manages it.

    FSDP2: the nearest `fully_shard`ed module holding the output layer (itself or an ancestor; usually the root).
    DeepSpeed ZeRO-3: the output layer itself (ZeRO-3 gathers each module's own parameters around its forward).
    None when the weight is an ordinary tensor (one process, DDP, ZeRO-1/2).
    """
    module = head.module
    if getattr(getattr(module, "weight", None), "ds_id", None) is not None:
        return module
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
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
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _sharded_now(weight) -> bool:
    """Whether `weight` is a shard right now (outside the forward that gathers it)."""
    if getattr(weight, "ds_id", None) is not None:
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(weight, DTensor)


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


@contextlib.contextmanager
def _no_grad_checkpoint_notice():
    """Silence torch's "None of the inputs have requires_grad=True" for a start-up forward without grad.

    These checks run in training mode (see below), so reentrant gradient checkpointing wraps each layer and warns
    that no gradient will flow, which is true and intended there; the notice would read as a training fault.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
        yield


def verify_head(model, head: OutputHead, vocab_size: int | None = None, owner: torch.nn.Module | None = None) -> float:
    """Check that hidden states + `head` reproduce the model's own logits on a short input; return the max error.

    A model whose forward transforms logits in a way we do not know would otherwise train on wrong log-probs.
    `owner`: see `sharded_head_owner` (then `model` is the sharded module that training calls).
    """
    base = unwrap(model) if owner is None else model
    device = next(unwrap(model).parameters()).device
    vocab = vocab_size or head.vocab_size or head.module.weight.shape[0]
    ids = torch.arange(1, 9, device=device).remainder(vocab)[None]
    # One forward in training mode: the hidden states and the logits come from the same pass (same
    # dropout draw), and eval() is avoided (bitsandbytes repacks 4-bit weights for inference on some CPUs).
    was_training = base.training
    base.train()
    try:
        with torch.no_grad(), _no_grad_checkpoint_notice():
            ours, output = hidden_then_head(
                base, {"input_ids": ids, "use_cache": False}, lambda h: h, head.logits_by(owner), owner, head.module
            )
            logits = output.logits.float()
    finally:
        base.train(was_training)
    err = (logits - ours).abs().max().item()
    tol = 1e-3 * max(1.0, logits.abs().max().item())
    if err > tol:
        raise ValueError(
            f"{type(base).__name__}: logits computed from the final hidden states and the output layer differ from "
            f"the model's own by {err:.3g}; this model transforms its logits in a way orpo_plugin does not know"
        )
    return err


def check_layout(model, layout: str, attention_override: str | None, pad_token_id: int) -> None:
    """Run one tiny forward in `layout` at start, so a model feature its attention cannot honour stops training now.

    Every attention path refuses what it cannot compute exactly (a sliding window, soft-capping, sinks, dropout, an
    unknown keyword) when it is called; this makes that happen before the first step instead of during it.
    """
    from .attention import attention_implementation
    from .collators import PreferenceCollator

    base = unwrap(model)
    device = next(base.parameters()).device
    vocab = max(int(getattr(base.get_output_embeddings(), "out_features", 0) or 0), 16)
    pairs = [([3, 4, 5], [6, 7], [8, 9, 10]), ([5, 4], [7, 8, 9], [10])]
    features = [
        {"prompt_input_ids": [t % vocab for t in p], "chosen_input_ids": [t % vocab for t in c],
         "rejected_input_ids": [t % vocab for t in r]}
        for p, c, r in pairs
    ]
    batch = PreferenceCollator(pad_token_id, layout)(features)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model_inputs(batch).items()}
    if _accepts(base, "logits_to_keep"):
        inputs["logits_to_keep"] = 1
    impl = getattr(base.config, "_attn_implementation", None)
    # training mode: dropout is what training runs with (and bitsandbytes keeps its training weight layout)
    was_training = base.training
    base.train()
    try:
        with torch.no_grad(), _no_grad_checkpoint_notice(), attention_implementation(base, attention_override):
            base(**inputs, use_cache=False)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(
            f"{type(base).__name__} cannot train in the {layout} layout with attn_implementation={impl!r}"
            f"{f' (through {attention_override})' if attention_override else ''}: {err}"
        ) from err
    finally:
        base.train(was_training)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def _logps_from_model_logits(model, batch: dict, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model computes the logits of the needed positions inside its own forward (`logits_to_keep`).

    For sharded engines (FSDP, ZeRO-3), whose output-layer weight only exists whole inside the forward, and
    for models whose logits are not plain `lm_head(hidden)`.
    """
    positions = batch["pred_pos"]
    rows, width = batch["input_ids"].shape
    unique, inverse = torch.unique(positions, return_inverse=True)  # sorted flat positions
    if rows == 1:
        logits = model(**kwargs, logits_to_keep=unique, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[inverse]  # [N, V]
    else:  # padded rows: all positions (a 2D logits_to_keep needs a newer transformers than we support)
        logits = model(**kwargs, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    return full_target_logps(logits, batch["pred_target"])


def encoder_decoder_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder-decoder forward (T5, BART): prompts into the encoder, shifted responses into the decoder.

    The model's own logits are used (T5 rescales the hidden states and BART adds a bias before its output layer).
    """
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        use_cache=False,
    ).logits  # [2P, T_dec, V]
    logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["pred_pos"])
    return full_target_logps(logits, batch["pred_target"])


def predicted_logps(
    model, batch: dict, head: OutputHead, chunk_size: int | None, logits_in_forward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), sum of logits) for every prediction of the batch; chunked when `chunk_size` is set.

    Under FSDP2/ZeRO-3 the output layer runs inside the forward of the module that shards it (`hidden_then_head`).
    """
    if "decoder_input_ids" in batch:
        return encoder_decoder_logps(model, batch)
    kwargs = model_inputs(batch)
    if logits_in_forward:
        return _logps_from_model_logits(model, batch, kwargs)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    kwargs["use_cache"] = False
    targets = batch["pred_target"]

    def select(hidden):
        # index_select, not fancy indexing: on CPU its backward (index_add) is much cheaper than index_put
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["pred_pos"])  # [N, H]

    def apply(hidden):
        if chunk_size:
            module = head.module
            return chunked_target_logps(
                hidden, module.weight, targets, module.bias, chunk_size, scale=head.scale, softcap=head.softcap
            )
        return full_target_logps(logits(hidden), targets)

    owner = sharded_head_owner(model, head)
    logits = head.logits_by(owner)
    result, _ = hidden_then_head(model, kwargs, select, apply, owner, head.module)
    return result


def _host_count(batch: dict, key: str, mask: torch.Tensor | None) -> int:
    """A count the collator computed on the host (`PreferenceCollator` gives Python ints); a collator that gives a
    tensor, or only the `mask` to count, costs a device read (a synchronisation) here."""
    value = batch.get(key)
    if value is None:
        if mask is None:
            raise ValueError(f"the batch lacks '{key}' (orpo_plugin.PreferenceCollator gives it)")
        return int(mask.sum())
    return int(value)


@dataclass
class ForwardResult:
    output: ORPOOutput
    sums: dict  # metric numerators/denominators of this micro-batch: detached device tensors or host floats


def orpo_forward(
    model,
    batch: dict,
    head: OutputHead,
    beta: float,
    chunk_size: int | None = None,
    total_pairs: float | None = None,
    total_nll_tokens: float | None = None,
    logits_in_forward: bool = False,
) -> ForwardResult:
    """Loss of one micro-batch (normalised by the given totals) and the sums its metrics are made of."""
    token_logps, logit_sums = predicted_logps(model, batch, head, chunk_size, logits_in_forward)
    # No value is read back from the device here (see `_host_count`): masks select by `where`, not by indexing.
    pairs = _host_count(batch, "num_pairs", None)
    seq = batch["pred_seq"]
    # prompt predictions (sequence -1) go to an extra last slot, dropped
    slots = torch.where(seq >= 0, seq, torch.full_like(seq, 2 * pairs))
    logps = sequence_logps(token_logps, slots, 2 * pairs + 1)[: 2 * pairs]
    chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]
    nll_mask = batch["pred_nll"]
    nll_tokens = _host_count(batch, "nll_tokens", nll_mask)
    nll_sum = -torch.where(nll_mask, token_logps, torch.zeros_like(token_logps)).sum()
    out = orpo_loss(chosen_logps, rejected_logps, nll_sum, nll_tokens, beta, total_pairs, total_nll_tokens)
    vocab = head.vocab_size
    lc, lr = batch["pred_logit_c"], batch["pred_logit_r"]
    with torch.no_grad():
        c, r = chosen_logps.detach().float(), rejected_logps.detach().float()
        zero = torch.zeros_like(logit_sums)
        # device tensors stay on the device (summed there over the steps, read once per log); counts are host floats
        sums = {
            "pairs": float(pairs),
            "chosen_logps": c.sum(),
            "rejected_logps": r.sum(),
            "accuracies": (c > r).float().sum(),
            "log_odds_ratio": out.log_sigmoid.detach().float().sum(),
            "log_odds_chosen": out.log_odds.detach().float().sum(),
            "nll_sum": nll_sum.detach().float(),
            "nll_tokens": float(nll_tokens),
            "logits_chosen_sum": torch.where(lc, logit_sums, zero).sum(),
            "logits_chosen_count": float(_host_count(batch, "logit_c_count", lc)) * vocab,
            "logits_rejected_sum": torch.where(lr, logit_sums, zero).sum(),
            "logits_rejected_count": float(_host_count(batch, "logit_r_count", lr)) * vocab,
            "real_tokens": float(batch["real_tokens"]),
            "total_tokens": float(batch["total_tokens"]),
        }
        if "unshared_tokens" in batch:
            sums["unshared_tokens"] = float(batch["unshared_tokens"])
    return ForwardResult(out, sums)


def metrics_from_sums(sums: dict, beta: float, prefix: str = "") -> dict[str, float]:
    """TRL's ORPO metric names from accumulated sums (pair metrics averaged over pairs, NLL over tokens)."""
    p = max(float(sums["pairs"]), 1.0)
    c, r = float(sums["chosen_logps"]) / p, float(sums["rejected_logps"]) / p
    m = {
        "rewards/chosen": beta * c,
        "rewards/rejected": beta * r,
        "rewards/accuracies": float(sums["accuracies"]) / p,
        "rewards/margins": beta * (c - r),
        "logps/chosen": c,
        "logps/rejected": r,
        "logits/chosen": float(sums["logits_chosen_sum"]) / max(float(sums["logits_chosen_count"]), 1.0),
        "logits/rejected": float(sums["logits_rejected_sum"]) / max(float(sums["logits_rejected_count"]), 1.0),
        "nll_loss": float(sums["nll_sum"]) / max(float(sums["nll_tokens"]), 1.0),
        "log_odds_ratio": float(sums["log_odds_ratio"]) / p,
        "log_odds_chosen": float(sums["log_odds_chosen"]) / p,
        "tokens/real": float(sums["real_tokens"]),
        "tokens/padding_fraction": 1.0 - float(sums["real_tokens"]) / max(float(sums["total_tokens"]), 1.0),
    }
    if "unshared_tokens" in sums:
        m["tokens/computed_per_trained"] = float(sums["real_tokens"]) / max(float(sums["unshared_tokens"]), 1.0)
    return {prefix + k: v for k, v in m.items()}
