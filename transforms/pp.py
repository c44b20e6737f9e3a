"""Pipeline parallelism on the module tree, driven by `torch.distributed.pipelining`.

Splitting. A model captured by autoshard runs "units before the blocks (embeddings) -> the repeated blocks
in their container -> units after them (norm, head)". Each pipeline chunk is the model itself with its
block container cut down to the chunk's blocks, so the model's own forward (RoPE tables, masks, position
ids, HF's output types) runs unchanged on every stage, whatever the model, traced by fx or not:
- the container keeps only the chunk's blocks, under their original names (`layers.5` stays `layers.5`,
  so sharding plans, seeded initialisation and checkpoints see the unsharded model's FQNs);
- a chunk that does not start the model swaps the embeddings for parameter-free stand-ins with the same
  output shape, and a pre-hook on its first block replaces that block's hidden-state input with the
  activation received from the previous stage (the stand-ins' zeros are never used);
- a chunk that does not end the model appends a parameter-free `_Exit` to the container, which stops the
  model's forward right after the chunk's last block and returns the hidden state (norm and head are
  dropped from the chunk).
Chunk c of pp x vpp runs on pipeline rank c mod pp (Megatron's interleaving), or in a V under zbv (rank r
holds chunks r and 2 pp - 1 - r: cost_models/pipeline.chunk_stage); the stage split is the plan's (block
counts per chunk, uneven when the planner balances by cost) or even.

Schedules, as torch implements them: GPipe, 1F1B and interleaved 1F1B with vpp chunks per rank (Narayanan
et al., SC'21, arXiv:2104.04473); zb_interleaved (ScheduleInterleavedZeroBubble: ZB-H1 over vpp >= 1
chunks per rank) and zbv (ScheduleZBVZeroBubble: exactly 2 chunks per rank in a V), the zero-bubble
schedules of Qi et al. (arXiv:2401.10241), which split each backward into the input gradient (sent on at
once) and the weight gradient (run later, in what would be the bubble). What they need, read from torch's
source and checked by the tests:
- the weight-gradient split walks each chunk's autograd graph from its inputs to its parameters
  (`stage_backward_input` / `stage_backward_weight`): it works through `PipelineChunk`, its pre-hook,
  recompute wrappers (the weight pass recomputes a checkpointed block again) and TP's DTensors; the first
  chunk, whose input is token ids, runs its whole backward in the weight pass;
- zbv puts the first and the last chunk on pipeline rank 0: tied embeddings then have both copies on one
  rank and `TiedGradients` sums them there, with no group;
- micro-batches: zb_interleaved runs in rounds of max(1, m // pp) as interleaved 1F1B does (m a multiple
  of the rounds); zbv takes any m;
- neither runs torch.compile'd chunks (torch refuses them; autoshard does not compile).
Gradients are divided by the number of micro-batches; the loss on the last stage is the mean next-token
cross-entropy of each micro-batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from autoshard.cost_models.pipeline import chunk_stage
from autoshard.planner.capture.model_graph import ModelGraph

from .dp import has_grad, local_grad
from .init import clean_fqn

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
             "zb_interleaved": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble"}
"""Layout schedule -> torch.distributed.pipelining class (imported when a pipeline is built: it pulls in
torch._dynamo, half a second on every rank of every job that has no pipeline)."""
MULTI_CHUNK = ("interleaved_1f1b", "zb_interleaved", "zbv")
"""Schedules that take a list of stages (torch's PipelineScheduleMulti), any number per rank but zbv's 2."""


class _StageOutput(Exception):
    """Raised by `_Exit` to leave the model's forward after a chunk's last block."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Exit(nn.Module):
    """The last entry of a non-final chunk's block container: hands the hidden state to `PipelineChunk`."""

    def forward(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        raise _StageOutput(hidden)


class _ZeroEmbedding(nn.Module):
    """Stands in for an embedding on chunks that receive their hidden state from the previous stage."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


class PipelineChunk(nn.Module):
    """One model chunk: `module` is the model cut down to the chunk (see the module docstring). Its forward
    takes token ids on the first chunk, the previous chunk's hidden state [b, s', hidden] elsewhere, and
    returns the hidden state, or the logits on the last chunk. `first_block`: FQN of the chunk's first block."""

    def __init__(self, module: nn.Module, *, first: bool, last: bool, seq_len: int, first_block: str) -> None:
        super().__init__()
        self.module, self.first, self.last, self.seq_len = module, first, last, seq_len
        self.first_block = first_block
        self.model_kwargs: dict = {}
        """Keyword arguments of the model's forward, the same for every micro-batch (context parallelism's
        positions of this rank's tokens)."""

    def forward(self, x: Tensor) -> Tensor:
        handle = None
        if self.first:
            ids = x
        else:  # the stand-in embeddings only need the token shape; the hidden state comes in by a pre-hook
            ids = torch.zeros(x.shape[0], self.seq_len, dtype=torch.long, device=x.device)
            # on the module now in the block's slot (a recompute or FSDP wrapper, whose own hooks then see the
            # received tensor), for this call only: a recompute in the backward re-runs the inner block
            block = self.module.get_submodule(self.first_block)
            handle = block.register_forward_pre_hook(partial(_inject, x), prepend=True, with_kwargs=True)
        try:
            out = self.module(ids, **self.model_kwargs)
        except _StageOutput as stop:
            return stop.hidden
        finally:
            if handle is not None:
                handle.remove()
        return getattr(out, "logits", out)


def _inject(received: Tensor, _block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pre-hook of a chunk's first block: its hidden-state input is the activation received."""
    if args:
        return (received, *args[1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
    return args, {**kwargs, key: received}


@dataclass(kw_only=True, frozen=True, slots=True)
class ChunkSpec:
    index: int
    """Position of the chunk in the whole pipeline (0 .. pp * vpp - 1)."""
    blocks: range
    """Indices of the blocks it runs."""
    first: bool
    last: bool


def chunk_specs(n_blocks: int, sizes: list[int], pp_rank: int, pp: int, schedule: str = "1f1b") -> list[ChunkSpec]:
    """The chunks pipeline rank `pp_rank` runs (chunk c on rank c mod pp, or in a V under zbv), from the blocks
    per chunk."""
    if sum(sizes) != n_blocks or min(sizes) < 1 or len(sizes) % pp:
        raise ValueError(f"a stage split of {sizes} blocks per chunk does not give each of {len(sizes)} chunks "
                         f"at least one of the {n_blocks} blocks over pp = {pp}")
    starts = [sum(sizes[:c]) for c in range(len(sizes))]
    return [ChunkSpec(index=c, blocks=range(starts[c], starts[c] + sizes[c]), first=c == 0,
                      last=c == len(sizes) - 1) for c in range(len(sizes)) if chunk_stage(c, pp, schedule) == pp_rank]


def split_from_units(stage_units: list[list[str]], blocks: list[str]) -> list[int]:
    """Blocks per chunk from a plan's stages (units per pipeline rank, chunks not marked): each run of
    consecutive blocks on one rank is a chunk; chunks are ordered by their first block."""
    index = {name: i for i, name in enumerate(blocks)}
    runs: list[list[int]] = []
    for units in stage_units:
        first_run = len(runs)
        for i in sorted(index[u] for u in units if u in index):
            if len(runs) > first_run and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return [len(r) for r in sorted(runs)]


def build_chunk(model: nn.Module, graph: ModelGraph, spec: ChunkSpec, *, seq_len: int) -> PipelineChunk:
    """`model`, cut down in place to the chunk `spec`."""
    blocks = [b.name for b in graph.blocks]
    container_name = blocks[0].rpartition(".")[0]
    container = model.get_submodule(container_name)
    if not isinstance(container, nn.ModuleList):
        raise ValueError(f"pipeline parallelism needs the blocks in an nn.ModuleList; {container_name} is a "
                         f"{type(container).__name__}")
    kept = {name.rpartition(".")[2]: model.get_submodule(name) for name in (blocks[i] for i in spec.blocks)}
    if not spec.last:
        kept["exit"] = _Exit()
    container._modules.clear()
    container._modules.update(kept)  # original keys: the blocks keep their FQNs
    chunk = PipelineChunk(model, first=spec.first, last=spec.last, seq_len=seq_len,
                          first_block=blocks[spec.blocks[0]])
    order = [u.name for u in graph.units]
    start, end = order.index(blocks[0]), order.index(blocks[-1])
    # the _Exit module ends the container of a chunk that does not end the model: it takes an entry too
    _slice_layer_config(model, container_name, [*spec.blocks, *([] if spec.last else spec.blocks[-1:])],
                        n_blocks=len(blocks))
    for unit in graph.units[:start] if not spec.first else []:
        _replace(model, unit.name, _stand_in(model.get_submodule(unit.name)))
    for unit in graph.units[end + 1:] if not spec.last else []:
        _replace(model, unit.name, nn.Identity())
    return chunk


def _slice_layer_config(model: nn.Module, container: str, kept: list[int], *, n_blocks: int) -> None:
    """Per-layer lists in a Hugging Face config (`layer_types`: which layers use sliding-window attention),
    which the model's forward indexes by the loop position over its layers (Gemma 2:
    `causal_mask_mapping[self.config.layer_types[i]]`), cut to the chunk's blocks, on the modules outside
    the blocks only (a block reads its own entry at construction). Without it, Gemma 2's second stage gave
    its full-attention layer the sliding-window mask of layer 0: a silently different loss."""
    shared = getattr(model, "config", None)
    if shared is None:
        return
    sliced = copy.copy(shared)
    for key, value in vars(shared).items():
        if isinstance(value, (list, tuple)) and len(value) == n_blocks and n_blocks > 1:
            setattr(sliced, key, type(value)(value[i] for i in kept))
    for name, module in model.named_modules():
        inside = name == container or name.startswith(container + ".")
        if not inside and getattr(module, "config", None) is shared:
            module.config = sliced


def _stand_in(module: nn.Module) -> nn.Module:
    if not any(True for _ in module.parameters()):
        return module
    if isinstance(module, nn.Embedding):
        return _ZeroEmbedding(module.embedding_dim, module.weight.dtype)
    raise ValueError(f"pipeline parallelism can replace embeddings before the first block on later stages, "
                     f"not a {type(module).__name__} with parameters")


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    model.get_submodule(parent).register_module(child, new)


def split_model(model: nn.Module, graph: ModelGraph, *, sizes: list[int], pp_rank: int, pp: int,
                seq_len: int, schedule: str = "1f1b") -> list[PipelineChunk]:
    """The chunks this pipeline rank runs, each a cut-down copy of `model` (the last one reuses it)."""
    specs = chunk_specs(len(graph.blocks), sizes, pp_rank, pp, schedule)
    return [build_chunk(model if i == len(specs) - 1 else copy.deepcopy(model), graph, spec, seq_len=seq_len)
            for i, spec in enumerate(specs)]


class TiedGradients:
    """Tied weights split across stages (the embedding on the first, the head on the last: Megatron's embedding
    group): each copy gets the gradient of both uses, summed over the copies before the optimizer step. The
    copies start equal (seeded by the same name) and get equal updates, so they stay equal. Under zbv both
    copies are on pipeline rank 0 and are summed there."""

    def __init__(self, chunks: list[nn.Module], tied: list[list[str]], pipelines: list[list[int]],
                 ends: tuple[int, int]) -> None:
        """`pipelines`: the global ranks of every pipeline, first stage first (every rank creates every
        first-last group, in the same order, as new_group requires); `ends`: the pipeline ranks holding the
        first and the last chunk."""
        self.copies = []
        for group in tied:
            names = set(group)
            params = [p for chunk in chunks for n, p in chunk.named_parameters() if clean_fqn(n) in names]
            if params:
                self.copies.append(params)
        self.group = None
        if ends[0] == ends[1]:
            return
        for line in pipelines:
            ranks = [line[ends[0]], line[ends[1]]]
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                self.group = group

    @torch.no_grad()
    def sum_gradients(self) -> None:
        for params in self.copies:
            grads = [local_grad(p) for p in params if has_grad(p)]
            if not grads:
                continue
            total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
            if self.group is not None:
                dist.all_reduce(total, group=self.group)
            for g in grads:
                if g is not total:
                    g.copy_(total)


def build_schedule(chunks: list[PipelineChunk], specs_index: list[int], *, schedule: str, n_stages: int,
                   n_microbatches: int, device: torch.device, group, loss_fn) -> object:
    """torch's schedule `schedule` over this rank's chunks (PipelineStage indices `specs_index`)."""
    from torch.distributed import pipelining

    stages = [pipelining.PipelineStage(chunk, index, n_stages, device, group=group)
              for chunk, index in zip(chunks, specs_index, strict=True)]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule in MULTI_CHUNK:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(f"schedule {schedule} runs one chunk per pipeline rank; vpp > 1 needs one of "
                         f"{', '.join(MULTI_CHUNK)}")
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
