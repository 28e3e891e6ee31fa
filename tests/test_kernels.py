"""use_liger_kernel and activation_offloading: refused at start where they cannot run, wired exactly where they can."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from helpers.stubs import StubTokenizer  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer, kernels
from orpo_plugin.toy import build_model

PAIRS = [
    {"prompt_input_ids": [3, 4, 5, 6], "chosen_input_ids": [7, 8, 9], "rejected_input_ids": [10, 11]},
    {"prompt_input_ids": [5, 6], "chosen_input_ids": [12, 13, 14, 15], "rejected_input_ids": [16, 17, 18]},
    {"prompt_input_ids": [8], "chosen_input_ids": [19, 20], "rejected_input_ids": [21, 22, 23, 24, 25]},
]


def args(**kw):
    base = dict(
        output_dir="/tmp/orpo-kernels",
        per_device_train_batch_size=3,
        max_steps=2,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return ORPOConfig(**base)


def trainer(model=None, **kw):
    model = model or build_model(32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    return ORPOTrainer(
        model=model, args=args(**kw), train_dataset=Dataset.from_list(PAIRS), processing_class=StubTokenizer()
    )


@pytest.mark.parametrize("use_cpu", [True, False])
def test_liger_is_refused_without_a_gpu(use_cpu):
    if torch.cuda.is_available() and not use_cpu:
        pytest.skip("this case is about a machine without a GPU")
    with pytest.raises(ValueError, match="use_liger_kernel=True needs a CUDA GPU"):
        trainer(use_liger_kernel=True, use_cpu=use_cpu)


def test_liger_config_keeps_our_loss(monkeypatch):
    """On a GPU: liger-kernel must be installed, and its loss kernels stay off (our chunked loss stays)."""
    monkeypatch.setattr(kernels, "_accelerator", lambda a: "cuda")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the liger-kernel package"):
        kernels.liger_kernel_config(args(use_liger_kernel=True))
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())
    assert kernels.liger_kernel_config(args()) is None  # not asked for
    config = kernels.liger_kernel_config(args(use_liger_kernel=True, liger_kernel_config={"rms_norm": False}))
    assert config == {"rms_norm": False, "fused_linear_cross_entropy": False, "cross_entropy": False}
    with pytest.raises(ValueError, match="remove fused_linear_cross_entropy from liger_kernel_config"):
        kernels.liger_kernel_config(
            args(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
        )


def test_activation_offloading_is_refused_without_an_accelerator():
    """TRL's manager reads torch.accelerator.current_accelerator().type, None on a CPU-only machine: refused at start."""
    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("this case is about a machine without an accelerator")
    with pytest.raises(ValueError, match="activation_offloading=True moves activations"):
        trainer(activation_offloading=True)
    with pytest.raises(ValueError, match="activation_offloading=True"):
        trainer(activation_offloading=True, use_cpu=True)


@pytest.mark.parametrize("option", ["use_liger_kernel", "activation_offloading"])
def test_a_refused_kernel_option_leaves_the_model_without_an_adapter(option):
    """Refused before the adapter is injected: the caller's model can train with the next config as it was."""
    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("this case is about a machine without an accelerator")
    from peft import LoraConfig

    model = build_model(32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    names = sorted(n for n, _ in model.named_modules())
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=option):
        ORPOTrainer(
            model=model,
            args=args(**{option: True}),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=StubTokenizer(),
            peft_config=lora,
        )
    assert sorted(n for n, _ in model.named_modules()) == names  # no lora_A/lora_B injected


def test_activation_offloading_modes_other_than_on_off_are_refused():
    """Axolotl's modes (legacy, disk, hidden_states) reach the same field under the plugin: refused, not run as True."""
    args_ = args()
    args_.activation_offloading = "disk"
    with pytest.raises(ValueError, match="activation_offloading='disk'"):
        kernels.check_activation_offloading(args_)


class _CopyingOffload(torch.autograd.graph.saved_tensors_hooks):
    """A stand-in for TRL's manager on a CPU: every saved activation is stored as a copy in other memory and a new
    tensor comes back in backward, as an offload to host and a reload do."""

    def __init__(self):
        self.packed = 0

        def pack(t):
            self.packed += 1
            return t.detach().clone()

        super().__init__(pack, lambda t: t.clone())


@pytest.mark.parametrize(
    "layout", [{}, {"packing": True}, {"prefix_sharing": True}], ids=["padded", "packing", "prefix"]
)
def test_activation_offloading_wraps_each_training_step_exactly(monkeypatch, layout):
    """With the option on, the trainer trains inside the manager (TRL's, here a copying stand-in since TRL's cannot
    run on a CPU) and the parameters after two steps equal those of a run without it, bit for bit."""
    import trl.models

    managers = []

    def fake(model):
        managers.append(_CopyingOffload())
        return managers[-1]

    monkeypatch.setattr(kernels, "_accelerator", lambda a: "cuda")
    monkeypatch.setattr(trl.models, "get_act_offloading_ctx_manager", fake)
    model = build_model(32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    runs = {}
    for on in (False, True):
        t = trainer(copy.deepcopy(model), activation_offloading=on, **layout)
        assert t.args.gradient_checkpointing  # the default, on in both runs
        t.train()
        runs[on] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert len(managers) == 1 and managers[0].packed > 0
    assert runs[True].keys() == runs[False].keys()
    changed = False
    for name, value in runs[True].items():
        assert torch.equal(value, runs[False][name]), name
        changed |= not torch.equal(value, model.state_dict()[name])
    assert changed  # the two steps trained
