"""Training batches for algorithm tests: random tokens with the first four positions unsupervised."""

import torch

from fedexperts.training import IGNORE_INDEX


def batches_for(model, seed, count=2):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=generator)
        labels = ids.clone()
        labels[:, :4] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out
