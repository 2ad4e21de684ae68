"""A small ExpertBench tokenizer (with and without a chat template), built once per session."""

import pytest

from fedexperts.data.expertbench import ExpertBench
from fedexperts.models.builtin import RECIPES, build_tokenizer


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"])


@pytest.fixture(scope="session")
def plain_tokenizer():
    tokenizer = build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"])
    tokenizer.chat_template = None
    return tokenizer
