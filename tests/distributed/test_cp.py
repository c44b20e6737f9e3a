"""Context parallelism (transforms/cp.py) against the unsharded model, in real multi-process runs (torchrun,
gloo on CPU) through examples/train.py: losses of 5 AdamW steps within 1e-4 relative, whole gradients after
the first step within 1e-5 (fp32). Ring attention (the default): RoPE (tiny Llama, GQA) and learned positions
with tied embeddings (tiny GPT), a Hugging Face Llama (position_ids), cp over 2 and 4 ranks, with TP/SP, and
with ZeRO-3 over dp x cp and selective recomputation (test_pp.py: under PP); all-gather attention
(--cp-attention allgather) at cp=2. The ring algorithm itself (ring_forward/ring_backward, both
kernels, sliding windows, bidirectional attention) against whole-sequence SDPA in fp64, its ranks as threads
exchanging through queues."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from test_equivalence import HAS_HF, HF_LLAMA, TINY_GPT, TINY_LLAMA, Runs

from autoshard.transforms import cp as cp_module
from autoshard.transforms.cp import (
    RingAttention,
    RingBlock,
    RingSteps,
    cp_positions,
    ring_blocks,
    split_sequence,
    unsplit_sequence,
)

ALLGATHER = ("--cp-attention", "allgather")
LAYOUTS = [
    (TINY_LLAMA, "cp=2", 2, ()),  # RoPE, GQA (4 heads, 2 kv heads)
    (TINY_GPT, "cp=2", 2, ()),  # learned positions, tied embeddings
    (TINY_LLAMA, "cp=4", 4, ()),
    (TINY_LLAMA, "cp=2,tp=2", 4, ()),  # sequence parallelism inside each cp chunk
    (TINY_LLAMA, "cp=2,dp=2,zero=3,recompute=selective", 4, ()),  # FSDP2 over dp x cp; the backward replays the ring
    (TINY_LLAMA, "cp=2", 2, ALLGATHER),
]
CASES = LAYOUTS + ([(HF_LLAMA, "cp=2", 2, ())] if HAS_HF else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(CASES, tmp_path_factory.mktemp("cp_runs"))


# ------------------------------------------------------------------ the load-balanced split, as pure functions


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_unsplit_is_the_identity_and_balances_causal_work(cp):
    x = torch.arange(3 * 16).view(3, 16)
    parts = [split_sequence(x, r, cp) for r in range(cp)]
    assert all(p.shape == (3, 16 // cp) for p in parts)
    assert torch.equal(unsplit_sequence(parts), x)
    # causal attention work of a query at position p is p + 1 keys: every rank gets the same total
    work = {int((cp_positions(r, cp, 16) + 1).sum()) for r in range(cp)}
    assert len(work) == 1


def test_rank_chunks_are_i_and_2cp_minus_1_minus_i():
    assert cp_positions(0, 2, 8).tolist() == [0, 1, 6, 7]
    assert cp_positions(1, 2, 8).tolist() == [2, 3, 4, 5]


def test_a_sequence_that_does_not_split_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match=r"30 tokens into 2 x cp\(4\) = 8 chunks"):
        cp_positions(0, 4, 30)


# ------------------------------------------------------------------ ring attention, its ranks as threads


def test_causal_ring_steps_skip_what_no_query_sees_and_mask_only_the_diagonal():
    """cp=4, rank 1 holds chunks 1 and 6 of 8 (4 tokens each): its own keys are the causal diagonal; rank 0's
    (chunks 0, 7) are seen by all its queries in their first half; ranks 2 and 3 (chunks 2/5, 3/4) only by
    its second chunk, wholly. Every step does half a block's work but the diagonal."""
    assert ring_blocks(1, 4, 8, causal=True) == [
        RingBlock(rows=slice(0, 8), cols=slice(0, 8), kind="causal"),  # step 0: its own
        RingBlock(rows=slice(0, 8), cols=slice(0, 4), kind="full"),  # rank 0's
        RingBlock(rows=slice(4, 8), cols=slice(0, 8), kind="full"),  # rank 3's
        RingBlock(rows=slice(4, 8), cols=slice(0, 8), kind="full"),  # rank 2's
    ]
    assert ring_blocks(0, 2, 8, causal=False) == [RingBlock(rows=slice(0, 8), cols=slice(0, 8), kind="full")] * 2
    # a window of 3 tokens: rank 3 (positions 12-19) sees nothing of rank 1's (4-7, 24-27) and part of rank 2's
    windowed = ring_blocks(3, 4, 8, causal=True, window=3)
    assert windowed[2] is None and windowed[1].kind == "masked"


class ThreadRing:
    """The `Ring` exchange between threads of one process (one mailbox per rank and tag); records the
    number of elements each rank sends."""

    def __init__(self, boxes: dict, rank: int, size: int, sent: list[int]) -> None:
        self.boxes, self.rank, self.size, self.sent = boxes, rank, size, sent

    def shift(self, x: torch.Tensor, tag: int = 0) -> Callable[[], torch.Tensor]:
        self.sent.append(x.numel())
        self.boxes[(self.rank + 1) % self.size, tag].put(x.clone())
        return lambda: self.boxes[self.rank, tag].get(timeout=30)


def _ring_attention(q, k, v, g, cp: int, *, causal: bool, window: int | None) -> tuple[list, list[int]]:
    """Each cp rank's RingAttention forward and backward in its own thread: (output, dq, dk, dv) over the
    whole sequence, and the sizes of the messages rank 0 sent."""
    boxes = {(r, tag): queue.Queue() for r in range(cp) for tag in (0, 1)}
    sent: list[list[int]] = [[] for _ in range(cp)]
    results: dict[int, tuple] = {}

    def rank(r: int) -> None:
        idx = cp_positions(r, cp, q.shape[2])
        qr, kr, vr = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
        steps = RingSteps(ring=ThreadRing(boxes, r, cp, sent[r]), window=window, scale=q.shape[-1] ** -0.5,
                          blocks=ring_blocks(r, cp, len(idx), causal=causal, window=window))
        out = RingAttention.apply(qr, kr, vr, steps)
        out.backward(g[:, :, idx])
        results[r] = (out.detach(), qr.grad, kr.grad, vr.grad)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(cp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [unsplit_sequence([results[r][i] for r in range(cp)], dim=2) for i in range(4)], sent[0]


@pytest.mark.parametrize("kernel", ["flash", "math"])
@pytest.mark.parametrize(("causal", "window"), [(True, None), (True, 3), (True, 12), (False, None)],
                         ids=["causal", "window3", "window12", "bidirectional"])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_equals_whole_sequence_attention(cp, causal, window, kernel, monkeypatch):
    """Outputs and q/k/v gradients equal SDPA's over the whole sequence (fp64, to rounding), with grouped
    heads (4 query heads, 2 kv heads): only the kv heads travel, cp-1 messages of keys/values forward, cp-1
    of them and cp of their gradients backward. `flash`: torch's CPU flash kernel per block; `math`: the
    written-out kernel other devices run."""
    if kernel == "math":
        monkeypatch.setattr(cp_module, "FLASH_DEVICES", ())
    torch.manual_seed(0)
    b, s, d = 2, 32, 8
    q = torch.randn(b, 4, s, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, 2, s, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if causal:
        dist = torch.arange(s)[:, None] - torch.arange(s)[None, :]
        mask = (dist >= 0) & (dist < (window or s))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    g = torch.randn_like(want)
    want.backward(g)
    got, sent = _ring_attention(q.detach(), k.detach(), v.detach(), g, cp, causal=causal, window=window)
    for x, y in zip(got, [want.detach(), q.grad, k.grad, v.grad], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert sent == [2 * b * 2 * (s // cp) * d] * (3 * cp - 2)  # k and v, kv heads only


# ------------------------------------------------------------------ against the unsharded model


@pytest.mark.parametrize(("model", "layout", "nproc", "extra"), LAYOUTS,
                         ids=["llama-cp2", "gpt-cp2", "llama-cp4", "llama-cp2-tp2", "llama-cp2-dp2-zero3-selective",
                              "llama-cp2-allgather"])
def test_context_parallel_matches_the_unsharded_model(model, layout, nproc, extra, runs):
    runs.check(model, layout, nproc, *extra)


def test_hugging_face_llama_gets_its_position_ids(runs):
    pytest.importorskip("transformers")
    runs.check(HF_LLAMA, "cp=2", 2)
