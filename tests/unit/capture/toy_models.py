"""Small models with costs that can be computed by hand, and models that defeat one trace method or another."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.up = nn.Linear(h, 4 * h)
        self.down = nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class MLPStack(nn.Module):
    """Embedding, `layers` of MLP blocks, head: every FLOP and saved byte is countable by hand."""

    def __init__(self, vocab: int = 100, h: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(MLPBlock(h) for _ in range(layers))
        self.head = nn.Linear(h, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ExplicitAttention(nn.Module):
    """Single-head attention written as matmul -> softmax -> matmul (no SDPA)."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unsqueeze(1) for p in (self.q, self.k, self.v))  # (b, 1 head, s, h)
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.o((probs @ v).squeeze(1))


class AttnBlock(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.attn = ExplicitAttention(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


class AttnStack(nn.Module):
    def __init__(self, vocab: int = 64, h: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList(AttnBlock(h) for _ in range(layers))
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class SkipStack(MLPStack):
    """Block 0's output is also read by the head: no pipeline cut after block 0 is valid."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = first = self.layers[0](self.emb(tokens))
        for layer in self.layers[1:]:
            x = layer(x)
        return self.head(x + first)


class ShapeBranchStack(MLPStack):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > 10_000:
            tokens = tokens[:, :10_000]
        return super().forward(tokens)


class Output:
    """A plain Python object, not a registered pytree: torch.export rejects it as an output."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class OpaqueOutputStack(ShapeBranchStack):
    """Neither fx (shape branch) nor export (non-pytree output) can trace it; forward hooks can."""

    def forward(self, tokens: torch.Tensor) -> Output:  # type: ignore[override]
        return Output(super().forward(tokens))


class ValueBranchStack(MLPStack):
    """Reads a tensor value in Python: nothing can run it without real data."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        if x.sum().item() > 0:
            x = x * 2
        return self.head(x)
