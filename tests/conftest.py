"""Shared test helpers: tiny models of every family and batches with padding."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
