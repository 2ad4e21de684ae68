"""Shared test helpers: tiny models of every family and batches with padding."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip a test parametrized on a tiny family this transformers does not define (families newer than 5.17)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from fedexperts.models.tiny import TINY_FAMILIES

    missing = {model_type for model_type in TINY_FAMILIES if model_type not in CONFIG_MAPPING}
    for item in items:
        callspec = getattr(item, "callspec", None)
        for value in callspec.params.values() if callspec is not None else ():
            if isinstance(value, str) and value in missing:
                reason = f"transformers {transformers.__version__} has no model type {value!r}"
                item.add_marker(pytest.mark.skip(reason=reason))


def make_batch(model: torch.nn.Module, *, seed: int = 0, batch: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on some rows, as model keyword arguments."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, int(model.config.vocab_size), (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    arguments = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.config.is_encoder_decoder:
        arguments["decoder_input_ids"] = input_ids.clone()
        arguments["decoder_attention_mask"] = attention_mask.clone()
    return arguments


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture(scope="session")
def micro_model_path(tmp_path_factory):
    """The ``micro`` built-in model (a trained 2-layer OLMoE with its tokenizer), built once per session."""
    from fedexperts.models.builtin import RECIPES, pretrain

    folder = tmp_path_factory.mktemp("micro-model") / "micro"
    pretrain(RECIPES["micro"], folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def switch_model_path(micro_model_path, tmp_path_factory):
    """A random-weight tiny Switch Transformers checkpoint (2 encoder and 2 decoder blocks, each stack with
    one sparse block of 4 experts) with the micro model's tokenizer, saved once per session."""
    import transformers

    from fedexperts.models import tiny_model

    folder = tmp_path_factory.mktemp("switch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(micro_model_path)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = tiny_model(
        "switch_transformers",
        vocab_size=len(tokenizer),
        num_experts=4,
        decoder_start_token_id=tokenizer.pad_token_id,
        **ids,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MICRO_RUN = (
    "algorithm.name=fedavg",
    "train.learning_rate=0.01",
    "data.items=120",
    "data.max_length=64",
    "federation.clients=3",
    "federation.rounds=2",
    "train.steps_per_round=2",
    "train.batch_size=4",
    "eval.max_examples=3",
    "eval.union_examples=4",
    "eval.probes=4",
    "eval.max_new_tokens=4",
)


@pytest.fixture
def micro_config(micro_model_path, tmp_path):
    """A two-round, three-client experiment on the micro model; keyword overrides as dotted strings."""
    from fedexperts.config import load_config

    def make(*overrides: str):
        return load_config(
            None, [f'model.name="{micro_model_path}"', f'output_dir="{tmp_path / "runs"}"', *MICRO_RUN, *overrides]
        )

    return make
