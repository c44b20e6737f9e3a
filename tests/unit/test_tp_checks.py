"""TP's checks before any collective (transforms/tp.py check_tp, no process group): a module holding
parameters that sequence parallelism would feed 1/tp of the tokens is refused with its name and class; an
attention pattern TP does not know runs replicated (with a warning); the fused-projection regrouping."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoshard.planner.capture.trace import capture
from autoshard.transforms.tp import check_tp, regroup_index


class Attention(nn.Module):
    def __init__(self, h: int = 16, heads: int = 4, odd: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))
        # a learned per-channel temperature on the keys: a pattern TP has no rule for
        self.temperature = nn.Parameter(torch.ones(h)) if odd else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        k = self.k(x) * self.temperature if self.temperature is not None else self.k(x)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (self.q(x), k, self.v(x)))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1))


class LayerScale(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, h: int = 16, *, scale: bool = False, odd: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.attn = Attention(h, odd=odd)
        self.scale = LayerScale(h) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm(x))
        return x + (self.scale(y) if self.scale is not None else y)


class Model(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(Block(**kw) for _ in range(2))
        self.head = nn.Linear(16, 64, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_a_parameter_module_sequence_parallelism_would_feed_part_of_the_tokens_is_refused():
    model = Model(scale=True)
    graph = capture(model, 1, 8)
    with pytest.raises(ValueError, match=re.escape("layers.0.scale (LayerScale) holds parameters that tensor "
                                                   "parallelism with sequence parallelism does not know")):
        check_tp(model, graph, tp=2, sp=True)
    check_tp(model, graph, tp=2, sp=False)  # the stream stays whole: every rank runs it on every token


def test_an_unknown_parameter_inside_the_attention_makes_it_run_replicated_with_a_warning():
    model = Model(odd=True)
    graph = capture(model, 1, 8)
    assert "layers.0.attn" in graph.blocks[0].attention.replicate
    with pytest.warns(UserWarning, match="layers.0.attn runs replicated on every tp rank"):
        plan = check_tp(model, graph, tp=2, sp=True)
    assert "layers.0.attn.q" not in plan  # not sharded; its input gathered, its output split back


def test_fused_rows_are_regrouped_so_each_rank_holds_its_part_of_q_k_and_v():
    # q: rows 0-3, k: 4-5, v: 6-7 over tp = 2 -> rank 0 [q0 q1 k4 v6], rank 1 [q2 q3 k5 v7]
    assert regroup_index([4, 2, 2], 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert regroup_index([3, 3], 1).tolist() == list(range(6))


def _cut(name: str, in_shape: tuple, out_shapes: list[tuple]):
    from autoshard.planner.capture.structure import Event

    return Event(kind="fn", name=name, stack=(), info={"linear": "qkv", "in_shape": in_shape, "out_shapes": out_shapes})


@pytest.mark.parametrize(("cuts", "want"), [
    # 4 q heads and 2 kv heads of 16 in one projection of 128 (b = 1, s = 8)
    ([("split", [(1, 8, 64), (1, 8, 32), (1, 8, 32)])], ([64, 32, 32], "")),
    ([("view", [(1, 8, 2, 4, 16)])], ([], "")),  # per kv group [q, q, k, v] (GPT-NeoX, Falcon's new decoder)
    ([("view", [(1, 8, 8, 16)]), ("split", [(1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)])], ([64, 32, 32], "")),
    ([("view", [(1, 8, 8, 16)]), ("view", [(1, 8, 2, 4, 16)])], ([], "")),  # transformers 5.25's Falcon
    ([("view", [(1, 8, 8, 16)])], ([], "only viewed as its 8 heads of 16")),  # undecided: replicated
    ([("view", [(1, 8, 3, 40)])], ([], "neither [q | k | v] heads nor kv groups")),
])
def test_a_fused_projection_viewed_into_heads_is_decided_by_the_next_cut(cuts, want):
    """A view into [heads + 2 kv, d] is how both layouts start: only the cut after it tells [q | k | v] from
    one kv group after another; with no cut after it, TP runs the attention replicated and says why."""
    from autoshard.planner.capture.structure import _fused_qkv

    events = [_cut(name, (1, 8, 128), outs) for name, outs in cuts]
    parts, reason = _fused_qkv("qkv", [64, 32, 32], 16, 2, events)
    assert parts == want[0] and want[1] in reason and bool(reason) == bool(want[1])
