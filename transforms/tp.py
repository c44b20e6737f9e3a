"""Tensor and sequence parallelism from the captured structure (not from module names), on DTensor.

For each block the capture found (planner/capture/structure.py):
- attention: the linears before the core are column-parallel (q, k, v: heads split over the TP ranks),
  the ones after it row-parallel (o); each rank runs heads/tp heads. The model must size its head
  dimension from the local tensor (reshape with -1, as autoshard's reference model and HF's do) or from
  attributes this transform divides (`n_heads`, `n_kv_heads`, `num_heads`, `num_key_value_heads`);
- MLP: linears reading the hidden state column-parallel, the one writing it back row-parallel;
- MoE: router and experts replicated (expert parallelism shards them, transforms/ep.py);
- the token embedding split over the vocabulary; the output head column-parallel over the vocabulary with
  the logits left sharded for a vocabulary-parallel cross-entropy (`loss_parallel`), so no rank holds the
  full [tokens, vocab] logits. Tied embeddings stay tied: both shard the shared weight by vocabulary rows.
Megatron's pairing (Shoeybi et al., arXiv:1909.08053, Sec. 3): one all-reduce after each row-parallel
linear in forward, one before each column-parallel linear in backward.

Sequence parallelism (Korthikanti et al., arXiv:2205.05198, Sec. 4.2.2): between the TP regions the
residual stream is split over the sequence (dim 1): the norms (and dropout, residual adds) run on s/tp
tokens, each row-parallel linear reduce-scatters instead of all-reducing, and the attention, MLP and MoE
inputs are all-gathered (the backward of each is the other collective). The stream is split where it enters
the first block and gathered again by the head's column-parallel linear. Embeddings stay replicated, so
models that add learned positions to the token embedding need no change.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from autoshard.planner.capture.model_graph import ModelGraph

from .init import find_submodule

HEAD_ATTRIBUTES = ("n_heads", "n_kv_heads", "num_heads", "num_key_value_heads")
SEQ = 1
"""The sequence dimension of the [batch, seq, hidden] residual stream."""


def _redistribute(x: Tensor, mesh: DeviceMesh, src: Any, dst: Any) -> Tensor:
    """Autograd-aware change of layout of a local tensor: the backward runs the opposite collective."""
    return DTensor.from_local(x, mesh, [src], run_check=False).redistribute(mesh, [dst]).to_local()


def _map_hidden(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """Apply `fn` to the module's hidden-state argument: the first positional tensor, else the first tensor
    keyword (HF layers are called with `hidden_states=`)."""
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            return (*args[:i], fn(a), *args[i + 1:]), kwargs
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            return args, {**kwargs, k: fn(v)}
    return args, kwargs


class SequenceBoundary(ParallelStyle):
    """Change the hidden-state input (and optionally the output) of a module between sequence-sharded and
    replicated: `SequenceBoundary(Shard(1), Replicate())` all-gathers the input (attention, MLP, MoE),
    `SequenceBoundary(Replicate(), Shard(1))` splits it (the first block), `output=(Replicate(), Shard(1))`
    splits a replicated output back (MoE)."""

    def __init__(self, src: Any, dst: Any, output: tuple[Any, Any] | None = None) -> None:
        super().__init__()
        self.src, self.dst, self.output = src, dst, output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def before(_, args, kwargs):
            return _map_hidden(args, kwargs, lambda x: _redistribute(x, device_mesh, self.src, self.dst))

        module.register_forward_pre_hook(before, with_kwargs=True)
        if self.output is not None:
            src, dst = self.output

            def after(_, __, out):
                if isinstance(out, Tensor):
                    return _redistribute(out, device_mesh, src, dst)
                return (_redistribute(out[0], device_mesh, src, dst), *out[1:])

            module.register_forward_hook(after)
        return module


def tp_plan(graph: ModelGraph, *, sp: bool = False, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """FQN -> ParallelStyle for every TP-sharded module of the captured model."""
    stream = Shard(SEQ) if sp else Replicate()  # the residual stream's layout between TP regions
    plan: dict[str, ParallelStyle] = {}
    blocks = [u for u in graph.units if u.kind == "block"]
    for unit in graph.units:
        if unit.kind == "embedding" and graph.vocab and unit.params == graph.vocab * graph.hidden:
            plan[unit.name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        elif unit.kind == "head":
            plan[unit.name] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel
                                              else Replicate(), use_local_output=not loss_parallel)
        elif unit.kind == "norm" and sp:
            plan[unit.name] = SequenceParallel(use_local_output=True)
        for info in (unit.attention, unit.mlp):
            if info is None:
                continue
            plan.update(dict.fromkeys(info.column, ColwiseParallel()))
            plan.update(dict.fromkeys(info.row, RowwiseParallel(output_layouts=stream)))
            if sp:
                plan[info.module] = SequenceBoundary(Shard(SEQ), Replicate())
        if sp and unit.kind == "block":
            plan.update(dict.fromkeys(unit.norms, SequenceParallel(use_local_output=True)))
            if unit.moe is not None:
                plan[unit.moe.module] = SequenceBoundary(Shard(SEQ), Replicate(), output=(Replicate(), Shard(SEQ)))
    if sp and blocks:
        plan[blocks[0].name] = SequenceBoundary(Replicate(), Shard(SEQ))
    return plan


def apply_tp(model: nn.Module, *, mesh: DeviceMesh, graph: ModelGraph, sp: bool = False,
             loss_parallel: bool = True) -> nn.Module:
    """Shard `model` in place over the 1-D TP `mesh` as `tp_plan(graph)` says; divide head-count attributes.

    With `loss_parallel` the model returns vocabulary-sharded DTensor logits: compute the cross-entropy under
    `torch.distributed.tensor.parallel.loss_parallel()` (ParallelModel.train_step does)."""
    tp = mesh.size()
    _check_divisible(model, graph, tp, sp)
    for unit in graph.units:
        attn = find_submodule(model, unit.attention.module) if unit.attention is not None else None
        if attn is None:
            continue
        for name in HEAD_ATTRIBUTES:
            value = getattr(attn, name, None)
            if isinstance(value, int):
                setattr(attn, name, value // tp)
    # a pipeline chunk (transforms/pp.py) holds some of the modules; the others are gone or parameter-free
    plan = {fqn: style for fqn, style in tp_plan(graph, sp=sp, loss_parallel=loss_parallel).items()
            if (m := find_submodule(model, fqn)) is not None and any(True for _ in m.parameters())}
    parallelize_module(model, mesh, plan)
    emb = next((u.name for u in graph.units if u.kind == "embedding"), None)
    head = next((u.name for u in graph.units if u.kind == "head"), None)
    if graph.tied and emb and head and all(plan.get(m) for m in (emb, head)):
        # both styles made their own DTensor of the shared weight (same rows): share it again (a pipeline
        # stage holding only one of them keeps its own; transforms/pp.py sums the two gradients)
        model.get_submodule(head).weight = model.get_submodule(emb).weight
    return model


def _check_divisible(model: nn.Module, graph: ModelGraph, tp: int, sp: bool) -> None:
    """Heads, kv heads, and (with SP) the sequence must divide evenly over the TP ranks."""
    for unit in graph.units:
        info = unit.attention
        if info is None:
            continue
        for what, n in (("attention heads", info.heads), ("kv heads", info.kv_heads)):
            if n % tp:
                raise ValueError(f"{info.module}: {n} {what} do not divide over tp = {tp}; "
                                 f"choose tp among {[d for d in range(1, n + 1) if n % d == 0]}")
    if sp and graph.seq_len % tp:
        raise ValueError(f"sequence parallelism splits the {graph.seq_len} tokens over tp = {tp}: not divisible")
