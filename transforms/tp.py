"""Tensor parallelism from the captured structure (not from module names), on DTensor.

For each block the capture found (planner/structure.py):
- attention: the linears before the core are column-parallel (q, k, v: heads split over the TP ranks),
  the ones after it row-parallel (o); each rank runs heads/tp heads. The model must size its head
  dimension from the local tensor (reshape with -1, as autoshard's reference model does) or from
  attributes this transform divides (`n_heads`, `n_kv_heads`, `num_heads`, `num_key_value_heads`);
- MLP: linears reading the hidden state column-parallel, the one writing it back row-parallel;
- the token embedding and the output head: split over the vocabulary, the logits gathered for the loss.
Megatron's pairing (Shoeybi et al., arXiv:1909.08053, Sec. 3): one all-reduce after each row-parallel
linear in forward, one before each column-parallel linear in backward. Sequence parallelism and a
vocabulary-parallel loss come next; this version gathers the logits.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from autoshard.planner.model_graph import ModelGraph

HEAD_ATTRIBUTES = ("n_heads", "n_kv_heads", "num_heads", "num_key_value_heads")


def tp_plan(graph: ModelGraph) -> dict[str, object]:
    """FQN -> ParallelStyle for every TP-sharded module of the captured model."""
    plan: dict[str, object] = {}
    for unit in graph.units:
        if unit.kind == "embedding" and graph.vocab and unit.params == graph.vocab * graph.hidden:
            plan[unit.name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        elif unit.kind == "head":
            plan[unit.name] = ColwiseParallel(output_layouts=Replicate())
        for info in (unit.attention, unit.mlp):
            if info is None:
                continue
            plan.update(dict.fromkeys(info.column, ColwiseParallel()))
            plan.update(dict.fromkeys(info.row, RowwiseParallel()))
    return plan


def apply_tp(model: nn.Module, *, mesh: DeviceMesh, graph: ModelGraph) -> nn.Module:
    """Shard `model` in place over the 1-D TP `mesh` as `tp_plan(graph)` says; divide head-count attributes."""
    tp = mesh.size()
    if graph.tied and tp > 1:
        raise ValueError("tied embeddings are not supported with tensor parallelism yet; untie them or use tp=1")
    for unit in graph.units:
        if unit.attention is None:
            continue
        attn = model.get_submodule(unit.attention.module)
        for name in HEAD_ATTRIBUTES:
            value = getattr(attn, name, None)
            if isinstance(value, int):
                if value % tp:
                    raise ValueError(f"{unit.attention.module}.{name} = {value} is not divisible by tp = {tp}")
                setattr(attn, name, value // tp)
    return parallelize_module(model, mesh, tp_plan(graph))
