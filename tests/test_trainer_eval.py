"""Evaluation as a TRL user sees it: compute_metrics receives TRL's predictions, generations are logged and saved."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers.stubs import StubTokenizer  # tests/helpers

from orpo_plugin import ORPOConfig, ORPOTrainer
from orpo_plugin.toy import build_model, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = " dog cat apple pear plum go away hello there friend one two three fox lazy quick brown".split()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([" ".join(WORDS) + " hi name a fruit:"] * 10, vocab_size=300)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=2,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        max_length=64,
        disable_tqdm=True,
    )
    base.update(kw)
    return base


class Recorder:
    """A compute_metrics that keeps what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, pred):
        self.calls.append((np.asarray(pred.predictions), np.asarray(pred.label_ids)))
        return {
            "n_predictions": float(np.asarray(pred.predictions).size),
            "mean_prediction": float(np.mean(pred.predictions)),
        }


def unpadded_rows(tok):
    """Pairs whose four sequences all have the same length: TRL's mean logit (over pad positions too) equals ours."""
    by_len = {}
    for w in WORDS:
        by_len.setdefault(len(tok("hi " + w)["input_ids"]), []).append(" " + w)
    same = max(by_len.values(), key=len)
    assert len(same) >= 4, by_len
    return [{"prompt": "hi", "chosen": same[i], "rejected": same[i + 1]} for i in range(0, 4, 2)] * 2


def test_compute_metrics_gets_what_trl_gives_it(tok, tmp_path):
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    rows = unpadded_rows(tok)
    model = build_model(len(tok), hidden_size=32, num_layers=2)
    results = {}
    for name, (trainer_cls, config_cls) in {"ours": (ORPOTrainer, ORPOConfig), "trl": (TRLTrainer, TRLConfig)}.items():
        recorder = Recorder()
        t = trainer_cls(
            model=copy.deepcopy(model),
            args=config_cls(**config(tmp_path / name)),
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(rows),
            processing_class=tok,
            compute_metrics=recorder,
        )
        results[name] = (t.evaluate(), recorder.calls)
    (ours, our_calls), (trl, trl_calls) = results["ours"], results["trl"]
    assert len(our_calls) == len(trl_calls) == 1
    (p, labels), (tp, trl_labels) = our_calls[0], trl_calls[0]
    assert p.shape == tp.shape == (4,) and labels.shape == trl_labels.shape == (4,)  # [chosen, rejected] per 2 pairs
    np.testing.assert_allclose(p, tp, atol=1e-5)
    assert (labels == 0).all() and (trl_labels == 0).all()
    for key in ("eval_n_predictions", "eval_mean_prediction", "eval_loss", "eval_logits/chosen"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-5), key


def random_pairs(n, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt_input_ids": [1] + rng.integers(3, vocab, size=int(rng.integers(1, 8))).tolist(),
            "chosen_input_ids": rng.integers(3, vocab, size=int(rng.integers(1, 6))).tolist() + [2],
            "rejected_input_ids": rng.integers(3, vocab, size=int(rng.integers(1, 9))).tolist() + [2],
        }
        for _ in range(n)
    ]


def test_compute_metrics_runs_and_agrees_in_every_layout(tmp_path):
    pairs = random_pairs(9)
    model = build_model(97, hidden_size=32, num_layers=2)
    seen = {}
    for layout in ("padded", "padding_free", "packing", "prefix_sharing"):
        recorder = Recorder()
        kw = {} if layout == "padded" else {layout: True}
        t = ORPOTrainer(
            model=copy.deepcopy(model),
            args=ORPOConfig(**config(tmp_path / layout, per_device_eval_batch_size=3, **kw)),
            train_dataset=pairs,
            eval_dataset=pairs,
            processing_class=StubTokenizer(),
            compute_metrics=recorder,
        )
        metrics = t.evaluate()
        assert len(recorder.calls) == 1, layout
        predictions, labels = recorder.calls[0]
        assert predictions.shape == labels.shape == (6,) and (labels == 0).all()  # 3 batches x [chosen, rejected]
        assert metrics["eval_n_predictions"] == 6.0 and "eval_rewards/accuracies" in metrics
        assert metrics["eval_mean_prediction"] == pytest.approx(float(predictions.mean()))
        seen[layout] = predictions
    for layout, predictions in seen.items():
        np.testing.assert_allclose(predictions, seen["padded"], atol=1e-5, err_msg=layout)


# ------------------------------------------------------------------------------------------ generate_during_eval
def greedy(model, prompt, max_new, eos):
    """Reference: one prompt at a time, no padding, greedy, cut after the first EOS."""
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("layout", ["padded", "padding_free", "prefix_sharing"])
def test_generations_are_written_at_each_evaluation(tok, tmp_path, layout):
    rows = [{"prompt": "name a fruit:", "chosen": w, "rejected": v} for w, v in zip(WORDS[:6], WORDS[6:12])]
    kw = {} if layout == "padded" else {layout: True}
    args = ORPOConfig(
        **config(
            tmp_path,
            generate_during_eval=True,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            logging_steps=2,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=3,
            max_completion_length=5,
            learning_rate=1e-2,
            **kw,
        )
    )
    t = ORPOTrainer(
        model=build_model(len(tok), hidden_size=32),
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tok,
    )
    t.train()
    first, last = (read_jsonl(tmp_path / "generations" / f"step-{n}.jsonl") for n in (2, 4))
    assert len(first) == len(last) == 3
    assert [r["prompt"] for r in first] == [r["prompt"] for r in last]  # a fixed sample
    assert {r["step"] for r in last} == {4}
    by_prompt = {(r["chosen"], r["rejected"]): r for r in last}
    model = t.accelerator.unwrap_model(t.model)
    checked = 0
    for pair in t.eval_dataset:
        key = (tok.decode(pair["chosen_input_ids"]), tok.decode(pair["rejected_input_ids"]))
        if key in by_prompt:  # the final model's greedy completion, computed alone and unpadded
            want = greedy(model, pair["prompt_input_ids"], 5, tok.eos_token_id)
            assert 1 <= len(want) <= 5
            assert by_prompt[key]["generated"] == tok.decode(want)
            assert by_prompt[key]["prompt"] == tok.decode(pair["prompt_input_ids"])
            checked += 1
    assert checked == 3


def test_generations_with_lora(tok, tmp_path):
    from peft import LoraConfig

    rows = [{"prompt": "hi", "chosen": w, "rejected": v} for w, v in zip(WORDS[:4], WORDS[4:8])]
    args = ORPOConfig(
        **config(tmp_path, generate_during_eval=True, per_device_eval_batch_size=2, max_completion_length=3)
    )
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    t = ORPOTrainer(
        model=build_model(len(tok), hidden_size=32),
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tok,
        peft_config=lora,
    )
    t.evaluate()
    written = read_jsonl(tmp_path / "generations" / "step-0.jsonl")
    assert len(written) == 2
    pair = next(p for p in t.eval_dataset if tok.decode(p["chosen_input_ids"]) == written[0]["chosen"])
    assert written[0]["generated"] == tok.decode(greedy(t.model, pair["prompt_input_ids"], 3, tok.eos_token_id))


def test_generations_go_to_table_reporters_when_installed(tok, tmp_path, monkeypatch):
    import sys
    import types

    logged = {}

    class Table:
        def __init__(self, dataframe):
            self.dataframe = dataframe

    fake = types.SimpleNamespace(run=object(), Table=Table, log=lambda d: logged.update(d))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setitem(
        sys.modules, "trackio", types.SimpleNamespace(Table=Table, log=lambda d: logged.update({"trackio": d}))
    )
    rows = [{"prompt": "hi", "chosen": w, "rejected": v} for w, v in zip(WORDS[:4], WORDS[4:8])]
    args = ORPOConfig(**config(tmp_path, generate_during_eval=True, max_completion_length=2))
    t = ORPOTrainer(
        model=build_model(len(tok), hidden_size=32),
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tok,
    )
    t.args.report_to = ["wandb", "trackio"]  # set after init: the reporters' own callbacks are not under test
    written = t.log_generations(t.eval_dataset)
    table = logged["game_log"].dataframe
    assert list(table.columns) == ["step", "prompt", "chosen", "rejected", "generated"]
    assert table.to_dict("records") == written
    assert logged["trackio"]["game_log"].dataframe.to_dict("records") == written
