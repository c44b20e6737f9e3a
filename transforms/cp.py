"""Context parallelism: the sequence split over the cp ranks, attention over the whole sequence.

Causal load balancing (Megatron-LM's, Llama 3 Sec. 3.3.2): the sequence is cut into 2 x cp chunks and cp
rank i holds chunks i and 2cp-1-i, so every rank has the same share of the causal attention work (an early
chunk with few keys to attend to, paired with a late one with many).

Attention: inside each attention module the capture found (graph.blocks[i].attention), calls to
`F.scaled_dot_product_attention` are intercepted (a `TorchFunctionMode` entered around the module's
forward) and replaced by all-gather attention as in Llama 3 (arXiv:2407.21783, Sec. 3.3.2): the keys and
values of every cp rank are all-gathered (one collective for both; its backward is a reduce-scatter of their
gradients), and this rank's queries attend to all of them under a causal mask built from the global
positions of the queries and of the gathered keys (the keys stay in rank order: softmax does not care).
With grouped-query attention the gather carries only the kv heads: a model that repeated its kv heads
before SDPA (Llama's `repeat_kv`, autoshard's reference model) has them taken apart again (after checking that
the repeated heads are copies) and SDPA runs with `enable_gqa=True`.
The attention's own mask, if any, is taken to be the causal one and replaced (padding masks are not
supported under CP); without a mask and `is_causal=False` the attention is bidirectional over all keys.

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
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

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


class ContextParallelAttention(TorchFunctionMode):
    """Replaces `F.scaled_dot_product_attention` on this rank's queries by attention over the keys and
    values all-gathered from the cp ranks (see the module docstring)."""

    def __init__(self, *, mesh: DeviceMesh, n_rep: int, window: int | None = None) -> None:
        super().__init__()
        self.group, self.cp, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.n_rep, self.window = n_rep, window

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
        local = q.shape[2]
        if k.shape == v.shape:  # one collective for both
            k, v = self._gather(torch.stack((k, v)))
        else:  # e.g. a value head_dim other than the key's
            k, v = self._gather(k[None])[0], self._gather(v[None])[0]
        mask = None
        if is_causal or attn_mask is not None:
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


def _attend_over_cp(module: nn.Module, info: AttentionInfo, mesh: DeviceMesh) -> None:
    mode = ContextParallelAttention(mesh=mesh, n_rep=info.heads // info.kv_heads, window=sliding_window(module))

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


def check_cp(model: nn.Module, graph: ModelGraph, *, cp: int) -> str:
    """Every check apply_cp makes, without the mesh (transforms/apply.py runs it before any collective); the
    keyword the model takes positions by."""
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
    return keyword


def apply_cp(model: nn.Module, *, mesh: DeviceMesh, graph: ModelGraph) -> LoadBalancedSplit:
    """Make every attention of `model` attend over the sequence split across the 1-D cp `mesh`; returns the
    batch split that gives this rank its tokens and their positions (for `ParallelModel.split_batch`)."""
    cp = mesh.size()
    keyword = check_cp(model, graph, cp=cp)
    for info in [u.attention for u in graph.units if u.attention is not None]:
        module = find_submodule(model, info.module)
        if module is not None:  # a pipeline chunk (transforms/pp.py) holds some of the blocks
            _attend_over_cp(module, info, mesh)
    return LoadBalancedSplit(rank=mesh.get_local_rank(), cp=cp, keyword=keyword)
