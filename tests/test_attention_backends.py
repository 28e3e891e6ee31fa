"""CUDA attention backends on CPU: layout -> varlen arguments against the varlen contract, and backend selection.

The CUDA kernels (flash-attn, torch's varlen_attn, flex_attention) cannot run here; their calling conventions are
stood in for by `varlen_reference` (the flash-attn varlen contract) and by fakes with torch's varlen_attn
signatures, and their availability is monkeypatched.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.models import build
from test_attention import CU, SEGMENTS, block_diagonal, dense_reference, qkv

from orpo_plugin import attention
from orpo_plugin.attention import (
    orpo_flash_attention,
    orpo_varlen_attention,
    prefix_sharing_mask,
    torch_varlen_kernel,
    varlen_arguments,
    varlen_reference,
)

CALLS: list = []


def varlen_attn_2_13(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch 2.13's varlen_attn contract on CPU: (-1, -1) full, (-1, 0) causal, (W, 0) causal with W keys to the left."""
    CALLS.append(
        dict(
            cu_seq_q=cu_seq_q.tolist(),
            cu_seq_k=cu_seq_k.tolist(),
            max_q=max_q,
            max_k=max_k,
            window_size=window_size,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    )
    left, right = window_size
    assert right in (-1, 0) and (right == 0 or left == -1)
    assert enable_gqa or key.shape[1] == query.shape[1]
    return varlen_reference(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        softmax_scale=scale,
        causal=right == 0,
        window_size=(left, -1),
    )


def varlen_attn_legacy(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The first releases' varlen_attn: no scale, no window, no GQA."""
    assert key.shape[1] == query.shape[1]
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def reference(layout, q, k, v, kw):
    mask = (
        prefix_sharing_mask(SEGMENTS, q.shape[2], window=kw.get("sliding_window"))
        if layout == "prefix"
        else block_diagonal(CU, q.shape[2], kw.get("sliding_window"))
    )
    return dense_reference(q, k, v, mask, kw.get("scaling"), kw.get("softcap"))


def layout_kwargs(layout):
    return {"prefix_segments": SEGMENTS} if layout == "prefix" else {"cu_seq_lens_q": CU}


# ---- layout -> varlen arguments ----------------------------------------------------------------------------------


def test_varlen_arguments_of_a_padding_free_row():
    index, cu_q, cu_k, max_q, max_k = varlen_arguments({"cu_seq_lens_q": CU}, "cpu")
    assert index is None  # queries are the keys
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == cu_k.tolist() == CU.tolist()
    assert (max_q, max_k) == (14, 14)


def test_varlen_arguments_of_a_prefix_shared_row():
    segments = torch.tensor([[0, 3, 2, 4], [9, 2, 1, 0]])  # the second pair has no rejected tokens
    index, cu_q, cu_k, max_q, max_k = varlen_arguments({"prefix_segments": segments}, "cpu")
    # chosen branch = [prompt][chosen] in place; rejected queries = [rejected], its keys = [prompt][rejected]
    assert cu_q.tolist() == [0, 5, 9, 12]
    assert cu_k.tolist() == [0, 5, 12, 15]
    assert index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    assert (max_q, max_k) == (5, 7)


@pytest.mark.parametrize("case", ["plain", "window", "softcap"])
@pytest.mark.parametrize("layout", ["varlen", "prefix"])
def test_flash_varlen_path_equals_dense_reference(layout, case):
    kw = {"plain": {}, "window": dict(sliding_window=3), "softcap": dict(softcap=2.0, scaling=0.7)}[case]
    q, k, v = qkv(46 if layout == "prefix" else 40, seed=11)
    ours, _ = orpo_flash_attention(None, q, k, v, None, kernel=varlen_reference, **layout_kwargs(layout), **kw)
    torch.testing.assert_close(ours, reference(layout, q, k, v, kw), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("layout", ["varlen", "prefix"])
def test_torch_varlen_path_passes_the_varlen_contract(layout, window):
    """cu_seq_q/cu_seq_k, max lengths, causal window (W - 1, 0), scale and GQA as torch's varlen_attn takes them."""
    kernel = torch_varlen_kernel(varlen_attn_2_13)
    assert kernel.features == ("sliding_window",)
    kw = dict(scaling=0.6) if window is None else dict(sliding_window=window)
    q, k, v = qkv(46 if layout == "prefix" else 40, seed=12)
    CALLS.clear()
    ours, _ = orpo_varlen_attention(None, q, k, v, None, kernel=kernel, **layout_kwargs(layout), **kw)
    torch.testing.assert_close(ours, reference(layout, q, k, v, kw), atol=1e-12, rtol=1e-12)
    (call,) = CALLS
    _, cu_q, cu_k, max_q, max_k = varlen_arguments(layout_kwargs(layout), "cpu")
    assert (call["cu_seq_q"], call["cu_seq_k"], call["max_q"], call["max_k"]) == (
        cu_q.tolist(),
        cu_k.tolist(),
        max_q,
        max_k,
    )
    assert call["window_size"] == ((-1, 0) if window is None else (window - 1, 0))
    assert call["scale"] == kw.get("scaling") and call["enable_gqa"]


def test_legacy_torch_varlen_scales_queries_repeats_heads_and_refuses_windows():
    kernel = torch_varlen_kernel(varlen_attn_legacy)
    assert kernel.features == ()
    q, k, v = qkv(46, seed=13)
    ours, _ = orpo_varlen_attention(None, q, k, v, None, kernel=kernel, prefix_segments=SEGMENTS, scaling=0.6)
    torch.testing.assert_close(ours, reference("prefix", q, k, v, dict(scaling=0.6)), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"a sliding attention window.*orpo_varlen cannot honour"):
        orpo_varlen_attention(None, q, k, v, None, kernel=kernel, prefix_segments=SEGMENTS, sliding_window=3)
    assert torch_varlen_kernel(lambda q, k, v: q) is None  # a signature with neither window_size nor is_causal


@pytest.mark.parametrize(
    "kwargs,feature",
    [(dict(softcap=2.0), "soft-capping"), (dict(s_aux=torch.zeros(4)), "sinks"), (dict(dropout=0.1), "dropout")],
)
def test_torch_varlen_refuses_what_its_kernel_lacks(kwargs, feature):
    q, k, v = qkv(40, seed=14)
    with pytest.raises(ValueError, match=rf"{feature}.*orpo_varlen cannot honour"):
        orpo_varlen_attention(
            None, q, k, v, None, kernel=torch_varlen_kernel(varlen_attn_2_13), cu_seq_lens_q=CU, **kwargs
        )


def test_this_torchs_varlen_attn_is_found_and_is_cuda_only():
    kernel = torch_varlen_kernel()
    assert kernel is not None and kernel.features == ("sliding_window",)
    q, k, v = (t.float() for t in qkv(40, seed=15))
    with pytest.raises(NotImplementedError):
        orpo_varlen_attention(None, q, k, v, None, cu_seq_lens_q=CU)


def test_flex_packed_block_mask_honours_window():
    """Forward only: flex_attention has no backward on CPU in this torch."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (t.float() for t in qkv(40, heads=2, kv_heads=2, seed=16))
    block = attention.packed_block_mask(CU, 40, "cpu", window=3)
    ours = flex_attention(q, k, v, block_mask=block).transpose(1, 2)
    torch.testing.assert_close(ours, dense_reference(q, k, v, block_diagonal(CU, 40, 3)), atol=1e-5, rtol=1e-5)


# ---- backend selection -------------------------------------------------------------------------------------------


@pytest.fixture
def kernels(monkeypatch):
    """`set(flash=..., varlen=None | "2.13" | "legacy", flex=...)`: which CUDA kernels this machine appears to have."""

    def set_(flash=True, varlen="2.13", flex=True):
        fakes = {None: None, "2.13": varlen_attn_2_13, "legacy": varlen_attn_legacy}
        monkeypatch.setattr(attention.varlen, "flash_attn_available", lambda: flash)
        monkeypatch.setattr(attention.flex, "flex_available", lambda: flex)
        real = torch_varlen_kernel
        monkeypatch.setattr(
            attention.varlen,
            "torch_varlen_kernel",
            lambda fn=None: None if fakes[varlen] is None else real(fn or fakes[varlen]),
        )

    return set_


@pytest.mark.parametrize(
    "model,present,expected",
    [
        ("llama", {}, "flash_attn"),
        ("llama", dict(flash=False), "torch_varlen"),
        ("mistral", dict(flash=False), "torch_varlen"),  # window_size carries the sliding window
        ("mistral", dict(flash=False, varlen="legacy"), "flex"),  # no window_size: skipped for a windowed model
        ("llama", dict(flash=False, varlen="legacy"), "torch_varlen"),
        ("gemma2", {}, "flash_attn"),  # flash-attn has soft-capping
        ("gemma2", dict(flash=False), "flex"),
        ("gpt_oss", {}, "flex"),  # sinks: only flex and orpo_sdpa
        ("gpt_oss", dict(flex=False), "sdpa"),
        ("llama", dict(flash=False, varlen=None, flex=False), "sdpa"),
    ],
)
def test_auto_takes_the_first_backend_that_runs_and_honours_the_model(kernels, model, present, expected):
    kernels(**present)
    backend, name, why = attention.choose_backend(build(model, 50), "auto", cuda=True)
    assert (backend, name) == (expected, attention.BACKENDS[expected]), why


def test_forced_backend_is_used_or_refused(kernels):
    kernels(flash=False)
    assert attention.choose_backend(build("llama", 50), "flex", cuda=True)[:2] == ("flex", attention.FLEX_NAME)
    with pytest.raises(ValueError, match="flash_attn.*flash-attn package does not import"):
        attention.choose_backend(build("llama", 50), "flash_attn", cuda=True)
    with pytest.raises(ValueError, match="torch_varlen.*cannot honour attention-logit soft-capping of Gemma2"):
        attention.choose_backend(build("gemma2", 50), "torch_varlen", cuda=True)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        attention.choose_backend(build("llama", 50), "torch_varlen", cuda=False)


def _args(**kw):
    from orpo_plugin import ORPOConfig

    return ORPOConfig(output_dir="/tmp/orpo-backends", use_cpu=True, bf16=False, report_to=[], **kw)


def test_trainer_choice_on_cuda_logs_the_kernel_and_cpu_is_unchanged(kernels, monkeypatch, caplog):
    from orpo_plugin import ORPOTrainer

    kernels(flash=False)
    model = build("mistral", 50)
    caplog.set_level(logging.INFO, logger="orpo_plugin")
    assert ORPOTrainer._choose_attention(model, _args(packing=True)) == attention.ATTENTION_NAME  # CPU: orpo_sdpa
    monkeypatch.setattr(attention.backends, "on_cuda", lambda model, use_cpu: True)
    assert ORPOTrainer._choose_attention(model, _args(prefix_sharing=True)) == attention.VARLEN_NAME
    assert ORPOTrainer._choose_attention(model, _args(padding_free=True, attention_backend="sdpa")) == "orpo_sdpa"
    assert ORPOTrainer._choose_attention(model, _args(attention_backend="flex")) is None  # padded: the model's own
    lines = [r.getMessage() for r in caplog.records if r.message.startswith("attention for")]
    assert len(lines) == 3
    assert "padding_free layout: orpo_sdpa (sdpa model)" in lines[0]
    assert "prefix_sharing layout: orpo_varlen (attention_backend=torch_varlen: first available" in lines[1]
    assert "flash_attn unavailable" in lines[1]
    assert "forced by attention_backend" in lines[2]


def test_attention_backend_is_validated():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        _args(attention_backend="flash")


def test_check_layout_refuses_a_window_the_chosen_kernel_cannot_honour(kernels):
    """Start-time refusal: the tiny forward runs the chosen kernel, which refuses the model's window."""
    from orpo_plugin.startup_checks import check_layout

    model = build("mistral", 50)
    attention.register()
    kernels(varlen="legacy")
    with pytest.raises(
        ValueError,
        match=r"MistralForCausalLM cannot train in the padding_free layout.*orpo_varlen.*"
        r"sliding attention window",
    ):
        check_layout(model, "padding_free", attention.VARLEN_NAME, 0)
    kernels(varlen="2.13")
    check_layout(model, "prefix_sharing", attention.VARLEN_NAME, 0)


def _step_on_cuda_path(monkeypatch, model, layout, checkpointing, reference_checkpointing):
    """(our step through the kernel the trainer picks on "CUDA", the padded step, the attention names chosen)."""
    import test_model_matrix as mm

    from orpo_plugin import ORPOTrainer
    from orpo_plugin.toy import build_tokenizer

    monkeypatch.setattr(attention.backends, "on_cuda", lambda model, use_cpu: True)
    chosen = []
    real = ORPOTrainer._choose_attention
    monkeypatch.setattr(
        ORPOTrainer, "_choose_attention", staticmethod(lambda m, a: chosen.append(real(m, a)) or chosen[-1])
    )
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in mm.ROWS] * 5, vocab_size=300)
    ours = mm.train_step(model, tok, gradient_checkpointing=checkpointing, **mm.LAYOUTS[layout])
    padded = mm.train_step(model, tok, gradient_checkpointing=reference_checkpointing)
    return ours, padded, chosen


@pytest.mark.parametrize("layout", ["packing", "prefix_sharing"])
def test_training_through_the_torch_varlen_path_equals_padded(kernels, monkeypatch, layout):
    """One real training step of a windowed model through orpo_varlen (its kernel stood in for) vs padded."""
    import test_model_matrix as mm

    kernels(flash=False)
    ours, padded, chosen = _step_on_cuda_path(monkeypatch, "mistral", layout, True, True)
    assert chosen == [attention.VARLEN_NAME, None]
    mm.assert_close(ours, padded)


@pytest.mark.parametrize("layout", ["packing", "prefix_sharing"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
def test_training_through_the_flash_varlen_path_equals_padded(kernels, monkeypatch, layout, checkpointing):
    """One real training step of Gemma 2 (sliding window + soft-capping) through orpo_flash, flash-attn's kernel
    stood in for by the CPU reference of its varlen contract, vs padded; with and without checkpointing."""
    import test_model_matrix as mm

    kernels(flash=True)
    monkeypatch.setattr(attention.varlen, "_flash_kernel", lambda: attention.varlen_reference)
    ours, padded, chosen = _step_on_cuda_path(monkeypatch, "gemma2", layout, checkpointing, False)
    assert chosen == [attention.FLASH_NAME, None]
    mm.assert_close(ours, padded)
