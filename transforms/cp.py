"""Context parallelism: the sequence split over the cp ranks, attention over the whole sequence.

Causal load balancing (Megatron-LM's, Llama 3 Sec. 3.3.2): the sequence is cut into 2 x cp chunks and cp
rank i holds chunks i and 2cp-1-i, so every rank has the same share of the causal attention work (an early
chunk with few keys to attend to, paired with a late one with many).

Attention: inside each attention module the capture found (graph.blocks[i].attention), calls to
`F.scaled_dot_product_attention` are intercepted (a `TorchFunctionMode` entered around the module's
forward) and replaced by attention over the whole sequence, run one of two ways (`cp_attention`):

- "ring" (the default; Liu et al., Ring Attention, arXiv:2310.01889; the zigzag causal split of Megatron's
  and Transformer Engine's p2p CP): the keys and values travel round the cp ranks, each rank sending the block
  it holds to the next while it attends to it, cp steps in all. Each step runs one attention kernel that
  returns its log-sum-exp, and the partial outputs are merged by online softmax (`merge_partial`). With the
  load-balanced split a step is the diagonal (this rank's own keys: one causal kernel), half of this rank's
  queries against all the keys of a later rank, or all the queries against half the keys of an earlier rank
  (no mask): nothing is computed that no query sees, so causal attention costs half the s x s work, and
  only the diagonal is masked (the kernel's is_causal; `ring_blocks`). The
  backward is a ring too: the keys and values go round again, with the gradients of each block travelling
  with it back to its owner; every step recomputes its block's attention from the saved output and
  log-sum-exp (`ring_backward`). Kept for the backward: this rank's q, k, v, the output and the log-sum-exp.
- "allgather" (Llama 3, arXiv:2407.21783, Sec. 3.3.2): the keys and values of every cp rank are all-gathered
  (one collective for both; its backward is a reduce-scatter of their gradients), and this rank's queries
  attend to all of them in one SDPA call under a causal mask built from the global positions of the queries
  and of the gathered keys (the keys stay in rank order: softmax does not care). Not overlapped; keeps the
  gathered keys and values for the backward, and the explicit mask skips no causal work.

With grouped-query attention both send only the kv heads: a model that repeated its kv heads before SDPA
(Llama's `repeat_kv`, autoshard's reference model) has them taken apart again (after checking that the
repeated heads are copies) and the attention runs with grouped heads.
The attention's own mask, if any, is taken to be the causal one and replaced (padding masks are not
supported under CP); without a mask and `is_causal=False` the attention is bidirectional over all keys.
A sliding window (`sliding_window`) masks the ring blocks it cuts explicitly and skips those wholly outside it.

Positions follow the tokens: `split_batch` (the `BatchSplit` of transforms/apply.py) keeps this rank's two
chunks of the inputs and targets and passes their global positions to the model (`positions=` for
autoshard's reference model, `position_ids=` for Hugging Face models), which index the RoPE tables or the
learned position embedding. Every cp rank holds as many tokens, so the loss averaged over the dp x cp ranks
is the mean over the full sequence, and the gradients averaged over dp x cp (transforms/dp.py on the
"dp_cp" axis) are the full-sequence ones.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from autoshard.planner.capture.model_graph import AttentionInfo, ModelGraph

from .init import find_submodule

POSITION_KWARGS = ("positions", "position_ids")
"""Keyword arguments through which a model's forward takes the global positions of its tokens."""


def cp_positions(rank: int, cp: int, seq_len: int) -> Tensor:
    """The global positions [seq_len / cp] held by cp rank `rank`: chunks `rank` and `2cp-1-rank` of 2cp."""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallelism splits the {seq_len} tokens into 2 x cp({cp}) = {2 * cp} chunks: "
                         f"{seq_len} is not divisible by {2 * cp}")
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * chunk, (i + 1) * chunk) for i in (rank, 2 * cp - 1 - rank)])


def split_sequence(x: Tensor, rank: int, cp: int, dim: int = 1) -> Tensor:
    """This cp rank's load-balanced part of `x` along `dim`."""
    return x.index_select(dim, cp_positions(rank, cp, x.shape[dim]).to(x.device))


def unsplit_sequence(parts: list[Tensor], dim: int = 1) -> Tensor:
    """The whole sequence from every cp rank's part, in rank order (the inverse of `split_sequence`)."""
    cp = len(parts)
    held = torch.cat([cp_positions(r, cp, parts[0].shape[dim] * cp) for r in range(cp)])
    return torch.cat(parts, dim).index_select(dim, torch.argsort(held).to(parts[0].device))


@dataclass(kw_only=True, slots=True)
class LoadBalancedSplit:
    """A `BatchSplit`: keeps this rank's chunks of inputs and targets, passes their global positions."""

    rank: int
    cp: int
    keyword: str
    """The model's keyword for the positions: `positions` ([s]) or `position_ids` ([1, s], Hugging Face).
    Both are the same for every sequence, so a pipeline stage can hold them for all its micro-batches."""

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[tuple, dict, Tensor]:
        positions = cp_positions(self.rank, self.cp, inputs.shape[1]).to(inputs.device)
        given = positions[None] if self.keyword == "position_ids" else positions  # HF broadcasts [1, s]
        return (inputs.index_select(1, positions),), {self.keyword: given}, targets.index_select(1, positions)


# ------------------------------------------------------------------ ring attention

CP_ATTENTION = ("ring", "allgather")
"""How context-parallel attention runs (`cp_attention` of apply_plan / apply_layout; see the module docstring)."""


@dataclass(frozen=True, slots=True)
class RingBlock:
    """What this rank computes in one ring step, against the keys/values of one cp rank: its query rows and
    the key columns (local indices) that see each other at all, and how the rows see the columns."""

    rows: slice
    cols: slice
    kind: str
    """"full": every row sees every column (no mask); "causal": a square block whose rows see the columns up
    to their own (the kernel's is_causal); "masked": an explicit mask from the global positions (a sliding
    window cuts the block)."""


def _chunk_pair(a: int, b: int, chunk: int, *, causal: bool, window: int | None) -> str:
    """How the queries of sequence chunk `a` see the keys of chunk `b` (chunks of `chunk` tokens): none, full,
    causal (a == b) or masked. Query minus key position ranges over [(a-b-1)c + 1, (a-b+1)c - 1]; a key is
    seen when that distance d satisfies 0 <= d (causal) and d < window."""
    if not causal:
        return "full"
    least, greatest = (a - b - 1) * chunk + 1, (a - b + 1) * chunk - 1
    if greatest < 0 or (window is not None and least >= window):
        return "none"
    if window is not None and greatest >= window:
        return "masked"
    return "causal" if a == b else "full"


def ring_block(rank: int, source: int, cp: int, chunk: int, *, causal: bool,
               window: int | None = None) -> RingBlock | None:
    """The work of cp rank `rank` against the keys of cp rank `source` (each holds chunks i and 2cp-1-i of
    `chunk` tokens); None when no query sees any key (the step is skipped).

    Causal, no window: source == rank is the diagonal ("causal" over all 2c x 2c: the local positions
    increase); source < rank: all queries against the source's first chunk ("full"); source > rank: the
    second query chunk against all the source's keys ("full")."""
    mine, theirs = (rank, 2 * cp - 1 - rank), (source, 2 * cp - 1 - source)
    kinds = [[_chunk_pair(a, b, chunk, causal=causal, window=window) for b in theirs] for a in mine]
    rows = [i for i in (0, 1) if any(k != "none" for k in kinds[i])]
    cols = [j for j in (0, 1) if any(kinds[i][j] != "none" for i in (0, 1))]
    if not rows:
        return None
    seen = {kinds[i][j] for i in rows for j in cols}
    if seen == {"full"}:
        kind = "full"
    elif kinds == [["causal", "none"], ["full", "causal"]]:
        kind = "causal"
    else:
        kind = "masked"
    return RingBlock(rows=slice(rows[0] * chunk, (rows[-1] + 1) * chunk),
                     cols=slice(cols[0] * chunk, (cols[-1] + 1) * chunk), kind=kind)


def ring_blocks(rank: int, cp: int, local: int, *, causal: bool,
                window: int | None = None) -> list[RingBlock | None]:
    """The blocks of the cp ring steps of `rank` (`local` tokens per rank): step j holds the keys of rank
    (rank - j) mod cp, step 0 its own."""
    return [ring_block(rank, (rank - j) % cp, cp, local // 2, causal=causal, window=window) for j in range(cp)]


def _block_mask(block: RingBlock, rank: int, source: int, cp: int, local: int, window: int | None) -> Tensor:
    """Which keys each query of a "masked" block sees (bool [rows, cols]), from the global positions."""
    q = cp_positions(rank, cp, local * cp)[block.rows]
    k = cp_positions(source, cp, local * cp)[block.cols]
    d = q[:, None] - k[None, :]
    return (d >= 0) & (d < window) if window is not None else d >= 0


@dataclass(frozen=True, slots=True)
class Ring:
    """Point-to-point exchange round the cp ranks of `group`: each sends to the next and receives from the
    previous (asynchronous: the transfer runs while the caller computes; NCCL kernels on their own stream,
    gloo on its own threads)."""

    group: dist.ProcessGroup
    rank: int
    size: int

    def shift(self, x: Tensor, tag: int = 0) -> Callable[[], Tensor]:
        """Start sending `x` (contiguous, left untouched until the wait) to the next rank and receiving the
        previous rank's tensor of the same shape; returns the wait, which gives the received tensor."""
        received = torch.empty_like(x)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, x, group=self.group, group_peer=(self.rank + 1) % self.size, tag=tag),
            dist.P2POp(dist.irecv, received, group=self.group, group_peer=(self.rank - 1) % self.size, tag=tag)])

        def wait() -> Tensor:
            for work in works:
                work.wait()
            return received
        return wait


FLASH_DEVICES = ("cpu",)
"""Devices whose torch flash kernel `block_forward` calls (it must return the log-sum-exp); elsewhere the math."""

_KV, _GRADS = 0, 1
"""Ring tags: the keys/values and, in the backward, their gradients (two exchanges in flight at once)."""


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial outputs, log-sum-exps and gradients accumulate in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _pack(*tensors: Tensor) -> Tensor:
    """One contiguous buffer holding `tensors` (one message per ring step)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes, strict=True)]


def merge_partial(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold one block's attention into the running attention over the blocks before it, in place (online
    softmax; Milakov & Gimelshein, arXiv:1805.02867). For each query, with o, l the running output and
    log-sum-exp of the scores, o_b, l_b the block's:
        l' = log(e^l + e^l_b)
        o' = e^(l - l') o + e^(l_b - l') o_b
    which is the softmax-weighted mean over the union of the keys. l starts at -inf (o at 0): the first
    block's (step 0, the diagonal, where every query sees at least itself) makes every l finite."""
    merged = torch.logaddexp(lse, block_lse)
    out.mul_((lse - merged).exp().unsqueeze(-1)).add_(block_out * (block_lse - merged).exp().unsqueeze(-1))
    lse.copy_(merged)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True: seen) as the additive one the flash kernel takes."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def block_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Attention of q [b, h, n, d] on k, v [b, h_kv, m, d] (h a multiple of h_kv: grouped heads) -> (output,
    log-sum-exp of the scaled scores [b, h, n]; -inf for a row that sees no key), both in the accumulation
    dtype. On CPU torch's flash kernel (it returns the log-sum-exp and groups the heads itself); elsewhere the
    same math written out (scores materialised per block)."""
    acc = _acc(q.dtype)
    if q.device.type in FLASH_DEVICES:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
        if mask is not None:  # the kernel gives 0, not -inf, for a row that sees nothing
            lse = lse.masked_fill(~mask.any(-1), float("-inf"))
        return out.to(acc), lse.to(acc)
    scores = _scores(q, k, causal=causal, mask=mask, scale=scale)
    lse = scores.logsumexp(-1)
    probs = (scores - lse.unsqueeze(-1)).exp().nan_to_num(0.0)
    return probs @ _grouped(v, q.shape[1]).to(acc), lse


def block_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, causal: bool,
                   mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block's q, k, v (accumulation dtype) given the gradient of the *whole* attention
    output `out` and its log-sum-exp `lse` over all keys (FlashAttention-2's backward, Dao, arXiv:2307.08691,
    Alg. 2):
        P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
        dQ = scale dS K,  dK = scale dS^T Q
    so the blocks' dQ sum to the whole dQ, and each block's dK, dV are its keys' whole gradients from
    these queries. Grouped heads: dK, dV summed over the query heads of each kv head."""
    acc = _acc(q.dtype)
    if q.device.type in FLASH_DEVICES:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
        return grads[0].to(acc), grads[1].to(acc), grads[2].to(acc)
    probs = (_scores(q, k, causal=causal, mask=mask, scale=scale) - lse.unsqueeze(-1)).exp()
    do = grad_out.to(acc)
    dp = do @ _grouped(v, q.shape[1]).to(acc).transpose(-2, -1)
    ds = probs * (dp - (do * out.to(acc)).sum(-1, keepdim=True))
    dq = scale * ds @ _grouped(k, q.shape[1]).to(acc)
    dk, dv = scale * ds.transpose(-2, -1) @ q.to(acc), probs.transpose(-2, -1) @ do
    n_rep = q.shape[1] // k.shape[1]
    return dq, dk.unflatten(1, (-1, n_rep)).sum(2), dv.unflatten(1, (-1, n_rep)).sum(2)


def _grouped(kv: Tensor, heads: int) -> Tensor:
    """kv heads repeated for the query heads they serve (query head i uses kv head i // n_rep)."""
    return kv.repeat_interleave(heads // kv.shape[1], 1)


def _scores(q: Tensor, k: Tensor, *, causal: bool, mask: Tensor | None, scale: float) -> Tensor:
    """Scaled scores [b, h, n, m] in the accumulation dtype, -inf where not seen (causal: above the square
    block's diagonal)."""
    acc = _acc(q.dtype)
    scores = scale * q.to(acc) @ _grouped(k, q.shape[1]).to(acc).transpose(-2, -1)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


@dataclass(frozen=True, slots=True)
class RingSteps:
    """One attention call's ring: the exchange, this rank's blocks (`ring_blocks`) and where they are."""

    ring: Ring
    blocks: list[RingBlock | None]
    window: int | None
    scale: float

    def mask(self, j: int, local: int) -> Tensor | None:
        """The explicit mask of step j's block, if it is "masked"."""
        block, ring = self.blocks[j], self.ring
        if block is None or block.kind != "masked":
            return None
        return _block_mask(block, ring.rank, (ring.rank - j) % ring.size, ring.size, local, self.window)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, steps: RingSteps) -> tuple[Tensor, Tensor]:
    """(attention output of this rank's queries over the whole sequence, in q's dtype; its log-sum-exp in
    the accumulation dtype). Step j sends the keys/values held to the next rank while attending to them,
    then takes the previous rank's: after cp steps every block has been seen once."""
    out = torch.zeros(q.shape, dtype=_acc(q.dtype), device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=_acc(q.dtype), device=q.device)
    shapes, kv = [k.shape, v.shape], _pack(k, v)
    for j, block in enumerate(steps.blocks):
        incoming = steps.ring.shift(kv, _KV) if j + 1 < len(steps.blocks) else None
        if block is not None:
            kb, vb = (t[:, :, block.cols] for t in _unpack(kv, shapes))
            partial = block_forward(q[:, :, block.rows], kb, vb, causal=block.kind == "causal",
                                    mask=steps.mask(j, q.shape[2]), scale=steps.scale)
            merge_partial(out[:, :, block.rows], lse[:, :, block.rows], *partial)
        if incoming is not None:
            kv = incoming()
    return out.to(q.dtype), lse


def ring_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  steps: RingSteps) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v. The keys/values go round as in the forward (cp-1 messages); the gradient of
    each block travels with it in the keys' dtype (as Transformer Engine's p2p CP sends it), each rank adding
    what its queries contribute (`block_backward`), and one more step brings it home: after step cp-1 rank r
    holds block r+1's, which it sends on to rank r+1 (cp messages)."""
    dq = torch.zeros(q.shape, dtype=_acc(q.dtype), device=q.device)
    shapes, kv = [k.shape, v.shape], _pack(k, v)
    grads_in: Callable[[], Tensor] | None = None
    for j, block in enumerate(steps.blocks):
        incoming = steps.ring.shift(kv, _KV) if j + 1 < len(steps.blocks) else None
        if block is not None:
            kb, vb = (t[:, :, block.cols] for t in _unpack(kv, shapes))
            rows = block.rows
            dq_b, dk_b, dv_b = block_backward(grad_out[:, :, rows], q[:, :, rows], kb, vb, out[:, :, rows],
                                              lse[:, :, rows], causal=block.kind == "causal",
                                              mask=steps.mask(j, q.shape[2]), scale=steps.scale)
            dq[:, :, rows] += dq_b
        grads = grads_in() if grads_in is not None else torch.zeros_like(kv)  # this block's, from the ranks before
        if block is not None:
            dk, dv = _unpack(grads, shapes)
            dk[:, :, block.cols] += dk_b
            dv[:, :, block.cols] += dv_b
        grads_in = steps.ring.shift(grads, _GRADS)
        if incoming is not None:
            kv = incoming()
    assert grads_in is not None  # cp >= 1 steps
    dk, dv = _unpack(grads_in(), shapes)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Ring attention as one autograd node: saves q, k, v, the output and its log-sum-exp (O(s) per head), no
    keys or values of other ranks. Torch dispatch modes are set aside inside it: selective recomputation
    (transforms/ac.py) then replays the whole ring, exchanges included, instead of caching each received
    block."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, steps: RingSteps) -> Tensor:
        with _disable_current_modes():
            out, lse = ring_forward(q, k, v, steps)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.steps = steps
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        with _disable_current_modes():
            dq, dk, dv = ring_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.steps)
        return dq, dk, dv, None


# ------------------------------------------------------------------ the attention modules


class ContextParallelAttention(TorchFunctionMode):
    """Replaces `F.scaled_dot_product_attention` on this rank's queries by attention over the whole
    sequence: ring attention or all-gathered keys and values (`method`; see the module docstring)."""

    def __init__(self, *, mesh: DeviceMesh, n_rep: int, window: int | None = None, method: str = "ring") -> None:
        super().__init__()
        if method not in CP_ATTENTION:
            raise ValueError(f"cp_attention must be one of {', '.join(CP_ATTENTION)}, got {method!r}")
        self.group, self.cp, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.n_rep, self.window, self.method = n_rep, window, method

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self.attention(*args, **kwargs)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        """q, k, v: [b, heads, s/cp, head_dim] (this rank's tokens) -> [b, heads, s/cp, head_dim]."""
        # this rank's heads under TP: fewer q heads than a kv group when kv heads are fewer than tp ranks
        n_rep = math.gcd(self.n_rep, q.shape[1])
        if n_rep > 1 and k.shape[1] == q.shape[1] and self._repeated(k, v, n_rep):
            k, v, enable_gqa = k[:, ::n_rep], v[:, ::n_rep], True
        causal = is_causal or attn_mask is not None
        if self.method == "allgather":
            return self._allgather(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
        if dropout_p:
            raise ValueError("ring context parallelism runs no attention dropout; use cp_attention=allgather")
        blocks = ring_blocks(self.rank, self.cp, q.shape[2], causal=causal, window=self.window)
        steps = RingSteps(ring=Ring(group=self.group, rank=self.rank, size=self.cp), blocks=blocks,
                          window=self.window, scale=q.shape[-1] ** -0.5 if scale is None else scale)
        return RingAttention.apply(q, k, v, steps)

    def _allgather(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, dropout_p: float, scale: float | None,
                   enable_gqa: bool) -> Tensor:
        local = q.shape[2]
        if k.shape == v.shape:  # one collective for both
            k, v = self._gather(torch.stack((k, v)))
        else:  # e.g. a value head_dim other than the key's
            k, v = self._gather(k[None])[0], self._gather(v[None])[0]
        mask = None
        if causal:
            seq = local * self.cp
            q_pos = cp_positions(self.rank, self.cp, seq).to(q.device)
            k_pos = torch.cat([cp_positions(r, self.cp, seq) for r in range(self.cp)]).to(q.device)
            mask = q_pos[:, None] >= k_pos[None, :]
            if self.window is not None:  # sliding-window attention: key within the last `window` positions
                mask &= q_pos[:, None] - k_pos[None, :] < self.window
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=enable_gqa)

    def _gather(self, x: Tensor) -> Tensor:
        """[n, b, h, s/cp, d] from each cp rank -> [n, b, h, s, d], the sequence in rank order (autograd: the
        backward reduce-scatters the gradients)."""
        out = funcol.all_gather_single(x.contiguous(), 0, self.group)  # [cp * n, b, h, s/cp, d]
        return out.unflatten(0, (self.cp, x.shape[0])).movedim(0, 3).flatten(3, 4)

    @torch.no_grad()
    def _repeated(self, k: Tensor, v: Tensor, n_rep: int) -> bool:
        """Whether each group of n_rep consecutive heads of k and v holds copies of one kv head (repeat_kv).
        Checked on every call, not cached: recomputation (transforms/ac.py) must replay the same ops. Compared
        bit for bit, so that copies of NaNs (a pipeline stage infers its shapes on uninitialised inputs) count as
        copies: every cp rank must take the same branch, or their all-gathers would differ in size."""
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return all(torch.equal(g, g[:, :, :1].expand_as(g))
                   for t in (k, v) for g in (t.view(bits[t.element_size()]).unflatten(1, (-1, n_rep)),))


def sliding_window(module: nn.Module) -> int | None:
    """The attention's sliding window, which the model passes to its attention function next to the mask
    CP replaces: the module's `sliding_window` attribute (None on full-attention layers: Qwen2, Gemma 2);
    else, from its config, the window of a layer whose `layer_types` entry is "sliding_attention" (Qwen2-MoE
    sets no attribute on its full layers and a window of 0 in its config), or the config's window unless
    `use_sliding_window` is off (Mistral, Starcoder2). None: full causal attention."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    types, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is not None and index is not None:
        return window if types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window if isinstance(window, int) and window > 0 else None


def _attend_over_cp(module: nn.Module, info: AttentionInfo, mesh: DeviceMesh, method: str) -> None:
    mode = ContextParallelAttention(mesh=mesh, n_rep=info.heads // info.kv_heads, window=sliding_window(module),
                                    method=method)

    def enter(_, args):
        mode.__enter__()

    def leave(_, args, out):
        mode.__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def position_keyword(model: nn.Module) -> str:
    """The keyword through which `model.forward` takes its tokens' positions (POSITION_KWARGS)."""
    params = inspect.signature(model.forward).parameters
    for name in POSITION_KWARGS:
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes none of {', '.join(POSITION_KWARGS)}: context "
                     "parallelism must tell the model the global positions of this rank's tokens")


def check_cp(model: nn.Module, graph: ModelGraph, *, cp: int, attention: str = "ring") -> str:
    """Every check apply_cp makes, without the mesh (transforms/apply.py runs it before any collective); the
    keyword the model takes positions by."""
    if attention not in CP_ATTENTION:
        raise ValueError(f"cp_attention must be one of {', '.join(CP_ATTENTION)}, got {attention!r}")
    cp_positions(0, cp, graph.seq_len)  # refuses a sequence that does not split into 2 x cp chunks
    keyword = position_keyword(model)
    attentions = [u.attention for u in graph.units if u.attention is not None]
    if not attentions:
        raise ValueError("context parallelism found no attention in the model")
    for info in attentions:
        if info.core != "sdpa":
            raise ValueError(f"{info.module}: context parallelism needs attention through "
                             f"F.scaled_dot_product_attention, this one computes it as {info.core} (Hugging Face "
                             "models with soft-capping or eager attention); use cp=1")
    dropping = [u.moe.module for u in graph.units if u.moe is not None and u.moe.capacity_factor is not None]
    if dropping:
        raise ValueError(f"{dropping[0]}: a MoE capacity is counted over a micro-batch's tokens in token order, and "
                         "context parallelism splits them over ranks; use cp=1 or a dropless MoE (capacity_factor "
                         "null)")
    return keyword


def apply_cp(model: nn.Module, *, mesh: DeviceMesh, graph: ModelGraph, attention: str = "ring") -> LoadBalancedSplit:
    """Make every attention of `model` attend over the sequence split across the 1-D cp `mesh`, by ring
    attention or all-gathered keys and values (`attention`, one of CP_ATTENTION); returns the batch split that
    gives this rank its tokens and their positions (for `ParallelModel.split_batch`)."""
    cp = mesh.size()
    keyword = check_cp(model, graph, cp=cp, attention=attention)
    for info in [u.attention for u in graph.units if u.attention is not None]:
        module = find_submodule(model, info.module)
        if module is not None:  # a pipeline chunk (transforms/pp.py) holds some of the blocks
            _attend_over_cp(module, info, mesh, attention)
    for module in model.modules():  # a MoE aux loss counts the assignments of the whole micro-batch
        if hasattr(module, "token_group") and hasattr(module, "aux_loss_log"):
            module.token_group = mesh.get_group()
    return LoadBalancedSplit(rank=mesh.get_local_rank(), cp=cp, keyword=keyword)
