"""Synthetic token batches that a model can learn, for examples/train.py and the tests.

Uniformly random tokens would leave nothing to learn (the loss stays at ln(vocab)), so each sequence follows
a fixed bigram rule with noise: token i+1 is (MULTIPLIER * token_i + 1) mod vocab with probability
1 - NOISE, else uniform. A model that learns the rule reaches a loss near the noise entropy, far below
ln(vocab). Batches depend only on (seed, step), never on the layout, so every layout sees the same data.
"""

from __future__ import annotations

import torch
from torch import Tensor

MULTIPLIER = 5
NOISE = 0.1


def synthetic_batch(*, seed: int, step: int, batch: int, seq_len: int, vocab: int) -> Tensor:
    """Token ids [batch, seq_len + 1] (inputs and their next-token targets) for optimizer step `step`."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    follow = torch.rand(batch, seq_len, generator=g) >= NOISE
    for i in range(seq_len):
        rule = (MULTIPLIER * tokens[:, i] + 1) % vocab
        tokens[:, i + 1] = torch.where(follow[:, i], rule, tokens[:, i + 1])
    return tokens
