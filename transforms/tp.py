"""Tensor and sequence parallelism from the captured structure (not from module names), on DTensor.

For each block the capture found (planner/capture/structure.py):
- attention: the linears before the core are column-parallel (q, k, v: heads split over the TP ranks),
  the ones after it row-parallel (o); each rank runs heads/tp heads. A fused q/k/v projection split
  [q | k | v] has its output rows regrouped so each rank's slice is [q_r | k_r | v_r] (`Column(parts=)`);
  one interleaved per head group is cut into whole groups as it is. Fewer kv heads than tp ranks: the
  k/v projection stays whole and each rank uses its kv head's columns (`SelectColumns`). Norms inside
  the attention run per head (`SequenceParallel` on the local heads) or on the gathered width
  (`GatheredNorm`). The model must size its heads from the local tensor (reshape with -1, as autoshard's
  reference model and HF's do) or from attributes this transform sets (`_divide_heads`);
- MLP: linears reading the hidden state column-parallel (a fused gate/up regrouped like q/k/v), the one
  writing it back row-parallel; HF's Conv1D (GPT-2, weight [in, out]) as well as nn.Linear;
- MoE: router and experts replicated (expert parallelism shards them, transforms/ep.py);
- an attention or MLP whose pattern is none of these runs replicated (warned), never guessed;
- the token embedding split over the vocabulary; the output head column-parallel over the vocabulary with
  the logits left sharded for a vocabulary-parallel cross-entropy (`loss_parallel`), so no rank holds the
  full [tokens, vocab] logits. Tied embeddings stay tied: both shard the shared weight by vocabulary rows.
Megatron's pairing (Shoeybi et al., arXiv:1909.08053, Sec. 3): one all-reduce after each row-parallel
linear in forward, one before each column-parallel linear in backward.

Sequence parallelism (Korthikanti et al., arXiv:2205.05198, Sec. 4.2.2): between the TP regions the
residual stream is split over the sequence (dim 1): the norms (and dropout, residual adds) run on s/tp
tokens, each row-parallel linear reduce-scatters instead of all-reducing, and the attention, MLP and MoE
inputs are all-gathered (the backward of each is the other collective). The stream is split where it enters
the first block and gathered again after the last block, so code between the blocks and the head, the
final norm and the head see the whole sequence. Embeddings stay replicated, so models that add learned
positions to the token embedding need no change. `check_tp` refuses, before any collective, a module with
parameters that SP would feed 1/tp of the tokens.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from autoshard.planner.capture.model_graph import AttentionInfo, ModelGraph, Unit

from .init import REGROUPED, find_submodule

Q_ATTRIBUTES = ("n_heads", "num_heads", "num_attention_heads")
KV_ATTRIBUTES = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
GROUP_ATTRIBUTES = ("num_key_value_groups", "n_rep")
WIDTH_ATTRIBUTES = ("split_size",)
"""Widths a model may split its fused q/k/v output by (GPT-2's `split_size`): divided by tp like the heads."""
SUPPORTED = ("attention: separate q/k/v linears, or one fused q/k/v linear or Conv1D split [q | k | v] or "
             "interleaved per head group, per-head or q/k-width norms inside; MLP: column linears (or one "
             "fused gate/up) and one row linear; MoE: a router and a ModuleList or stacked experts; norms")
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
    splits a replicated output back (MoE), and `SequenceBoundary(output=(Shard(1), Replicate()))` gathers
    only the output (the last block)."""

    def __init__(self, src: Any = None, dst: Any = None, output: tuple[Any, Any] | None = None) -> None:
        super().__init__()
        self.src, self.dst, self.output = src, dst, output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def before(_, args, kwargs):
            return _map_hidden(args, kwargs, lambda x: _redistribute(x, device_mesh, self.src, self.dst))

        if self.src is not None:
            module.register_forward_pre_hook(before, with_kwargs=True)
        if self.output is not None:
            src, dst = self.output

            def after(_, __, out):
                if isinstance(out, Tensor):
                    return _redistribute(out, device_mesh, src, dst)
                return (_redistribute(out[0], device_mesh, src, dst), *out[1:])

            module.register_forward_hook(after)
        return module


def _out_dim(module: nn.Module) -> int:
    """The weight's output dimension: 0 for nn.Linear ([out, in]), 1 for HF's Conv1D ([in, out])."""
    return 0 if isinstance(module, nn.Linear) else 1


def regroup_index(parts: list[int], tp: int) -> Tensor:
    """Output rows of a fused projection [p0 | p1 | ...] reordered so that rank r's contiguous 1/tp holds
    its 1/tp of every part: [p0_r | p1_r | ...] (Megatron's fused QKV layout), so that splitting the local
    output by the local part widths gives this rank's q, k and v (or gate and up)."""
    starts = [sum(parts[:i]) for i in range(len(parts))]
    return torch.cat([torch.arange(start + r * (n // tp), start + (r + 1) * (n // tp))
                      for r in range(tp) for start, n in zip(starts, parts, strict=True)])


class Column(ColwiseParallel):
    """ColwiseParallel for nn.Linear and HF's Conv1D; with `parts`, the output rows are regrouped per rank
    first (`regroup_index`), and the order is recorded on the module (init.REGROUPED) so the seeded init
    and the gathered gradients use the unsharded model's order."""

    def __init__(self, *, parts: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parts = parts or []

    def _partition(self, _name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        index = regroup_index(self.parts, mesh.size()) if self.parts else None
        for name, param in list(module.named_parameters(recurse=False)):
            dim = _out_dim(module) if name == "weight" else 0
            if index is not None:
                param = nn.Parameter(param.detach().index_select(dim, index), requires_grad=param.requires_grad)
                module.__dict__.setdefault(REGROUPED, {})[name] = (dim, index, index.numel())
            module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Shard(dim)]),
                                                         requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class Row(RowwiseParallel):
    """RowwiseParallel for nn.Linear and HF's Conv1D (weight sharded over its input dimension, bias replicated)."""

    def _partition(self, _name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            placement = Shard(1 - _out_dim(module)) if name == "weight" else Replicate()
            module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placement]),
                                                         requires_grad=param.requires_grad))
        if not isinstance(module, nn.Linear) and module.bias is not None:
            # Conv1D's addmm(bias, x, W) would add the replicated bias to each rank's partial sum (tp times
            # in the reduced output): reduce the product first, then add the bias once
            layout = self.output_layouts

            def forward(x: DTensor) -> DTensor:
                y = torch.matmul(x, module.weight).redistribute(mesh, layout)
                return y + module.bias

            module.forward = forward

    @staticmethod
    def _output(layouts: tuple, mod: nn.Module, outputs: DTensor, device_mesh: DeviceMesh) -> Tensor:
        # to_local() returns a view that autograd forbids modifying in place, and a model may add its
        # residual into the output in place (Falcon: mlp_output += attention_output): hand out a copy
        return outputs.redistribute(placements=layouts).to_local().clone()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        output = partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)
        if self.use_local_output:
            output = partial(self._output, self.output_layouts)
        return distribute_module(module, device_mesh, self._partition,
                                 partial(self._prepare_input_fn, self.input_layouts, (Shard(-1),)), output)


class GatheredNorm(ParallelStyle):
    """A norm over a whole projection's width (OLMo-2's q/k norms) whose input is that projection's
    column-parallel output: all-gather the width, normalise with the replicated weight on every rank, keep
    this rank's slice. The statistics are the unsharded ones; the backward all-gathers the output gradient,
    so the weight's gradient is whole and equal on every rank."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(_name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()]),
                                                          requires_grad=param.requires_grad))

        def gather(_mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            x = inputs[0]
            whole = DTensor.from_local(x, mesh, [Shard(x.dim() - 1)], run_check=False).redistribute(mesh, [Replicate()])
            return (whole, *inputs[1:])

        def keep_slice(_mod: nn.Module, out: Tensor, mesh: DeviceMesh) -> Tensor:
            return out.redistribute(mesh, [Shard(out.dim() - 1)]).to_local()

        return distribute_module(module, device_mesh, replicate, gather, keep_slice)


class SelectColumns(ParallelStyle):
    """A projection kept whole on every tp rank, each rank using only the output columns its heads need:
    kv heads fewer than tp ranks (Megatron replicates them). The selected output's gradient is declared
    partial, so DTensor sums it over tp: the replicated weight and the input get every rank's share."""

    def __init__(self, columns: Callable[[int], Tensor]) -> None:
        super().__init__()
        self.columns = columns

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        index = self.columns(device_mesh.get_local_rank())

        def replicate(_name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()]),
                                                          requires_grad=param.requires_grad))

        def whole(_mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False), *inputs[1:])

        def select(_mod: nn.Module, out: DTensor, mesh: DeviceMesh) -> Tensor:
            return out.to_local(grad_placements=[Partial()]).index_select(-1, index.to(out.device))

        return distribute_module(module, device_mesh, replicate, whole, select)


def attention_sharding(info: AttentionInfo, tp: int) -> str:
    """"" when TP shards this attention's heads; else why it runs replicated (all heads on every tp rank,
    correct but not memory-saving). Raises ValueError when the heads fit neither."""
    if info.replicate:
        return info.replicate
    if info.heads % tp:
        raise ValueError(f"{info.module}: {info.heads} attention heads do not divide over tp = {tp}; choose tp "
                         f"among {[d for d in range(1, info.heads + 1) if info.heads % d == 0]}")
    if info.kv_heads % tp and tp % info.kv_heads:
        raise ValueError(f"{info.module}: {info.kv_heads} kv heads do not divide over tp = {tp} nor tp over them; "
                         f"choose tp among {[d for d in range(1, info.heads + 1) if info.heads % d == 0 and (info.kv_heads % d == 0 or d % info.kv_heads == 0)]}")
    if info.kv_heads < tp and len(info.column) == 1 and not info.fused:
        return f"{info.kv_heads} kv heads are fewer than tp = {tp} ranks in a projection interleaved per group"
    if info.kv_heads < tp and info.width_norms:
        return f"{info.kv_heads} kv heads are fewer than tp = {tp} ranks under a norm over the kv width"
    return ""


def _replicated_kv_columns(info: AttentionInfo, tp: int) -> Callable[[int], Tensor]:
    """Rank r's output columns when kv heads are fewer than tp ranks: its q heads and the one kv head they
    use, g = r x kv / tp (from a fused [q | k | v] projection), or that kv head alone (a k or v projection)."""
    d, q = info.head_dim, info.heads * info.head_dim // tp

    def columns(rank: int) -> Tensor:
        g = rank * info.kv_heads // tp
        head = torch.arange(g * d, (g + 1) * d)
        if not info.fused:
            return head
        h, kv = info.fused[0], info.fused[1]
        return torch.cat([torch.arange(rank * q, (rank + 1) * q), h + head, h + kv + head])

    return columns


def _attention_plan(info: AttentionInfo, tp: int, sp: bool, stream: Any) -> dict[str, ParallelStyle]:
    if attention_sharding(info, tp):
        return {info.module: SequenceBoundary(Shard(SEQ), Replicate(), output=(Replicate(), Shard(SEQ)))} if sp else {}
    if info.kv_heads < tp:  # q heads sharded, kv heads replicated
        select = SelectColumns(_replicated_kv_columns(info, tp))
        plan: dict[str, ParallelStyle] = {info.column[0]: select} if info.fused else \
            {info.column[0]: Column(), info.column[1]: select, info.column[2]: select}
    elif info.fused:
        plan = {info.column[0]: Column(parts=info.fused)}
    else:
        plan = dict.fromkeys(info.column, Column())
    plan.update(dict.fromkeys(info.row, Row(output_layouts=stream)))
    # per-head norms run on this rank's heads; their replicated weight's gradient is summed over tp
    plan.update(dict.fromkeys(info.head_norms, SequenceParallel(use_local_output=True)))
    plan.update(dict.fromkeys(info.width_norms, GatheredNorm()))
    if sp:
        plan[info.module] = SequenceBoundary(Shard(SEQ), Replicate())
    return plan


def _mlp_plan(unit: Unit, sp: bool, stream: Any) -> dict[str, ParallelStyle]:
    info = unit.mlp
    if info is None:
        return {}
    if info.replicate:
        return {info.module: SequenceBoundary(Shard(SEQ), Replicate(), output=(Replicate(), Shard(SEQ)))} if sp else {}
    plan: dict[str, ParallelStyle] = {info.column[0]: Column(parts=info.fused)} if info.fused else \
        dict.fromkeys(info.column, Column())
    plan.update(dict.fromkeys(info.row, Row(output_layouts=stream)))
    if sp:
        plan[info.module] = SequenceBoundary(Shard(SEQ), Replicate())
    return plan


def tp_plan(graph: ModelGraph, *, tp: int = 2, sp: bool = False, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """FQN -> ParallelStyle for every TP-sharded module of the captured model."""
    stream = Shard(SEQ) if sp else Replicate()  # the residual stream's layout between TP regions
    plan: dict[str, ParallelStyle] = {}
    # under SP the stream is split from the first block's input to the last block's output: whatever the
    # model's own forward does after its blocks (GPT-2 views the hidden state with the full sequence length)
    # sees the whole sequence, and so do the final norm and the head
    blocks = [u for u in graph.units if u.kind == "block"]
    for unit in graph.units:
        if unit.kind == "embedding" and graph.vocab and unit.params == graph.vocab * graph.hidden:
            plan[unit.name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        elif unit.kind == "head":
            plan[unit.name] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1) if loss_parallel
                                              else Replicate(), use_local_output=not loss_parallel)
        if unit.attention is not None:
            plan.update(_attention_plan(unit.attention, tp, sp, stream))
        plan.update(_mlp_plan(unit, sp, stream))
        if sp and unit.kind == "block":
            plan.update(dict.fromkeys(unit.norms, SequenceParallel(use_local_output=True)))
            if unit.moe is not None:
                plan[unit.moe.module] = SequenceBoundary(Shard(SEQ), Replicate(), output=(Replicate(), Shard(SEQ)))
    if sp and blocks:
        gather = (Shard(SEQ), Replicate())
        if len(blocks) == 1:
            plan[blocks[0].name] = SequenceBoundary(Replicate(), Shard(SEQ), output=gather)
        else:
            plan[blocks[0].name] = SequenceBoundary(Replicate(), Shard(SEQ))
            plan[blocks[-1].name] = SequenceBoundary(output=gather)
    return plan


def apply_tp(model: nn.Module, *, mesh: DeviceMesh, graph: ModelGraph, sp: bool = False,
             loss_parallel: bool = True) -> nn.Module:
    """Shard `model` in place over the 1-D TP `mesh` as `tp_plan(graph)` says; divide head-count attributes.

    With `loss_parallel` the model returns vocabulary-sharded DTensor logits: compute the cross-entropy under
    `torch.distributed.tensor.parallel.loss_parallel()` (ParallelModel.train_step does)."""
    tp = mesh.size()
    full_plan = check_tp(model, graph, tp=tp, sp=sp, loss_parallel=loss_parallel, warn=False)
    for unit in graph.units:
        attn = find_submodule(model, unit.attention.module) if unit.attention is not None else None
        if attn is not None and not attention_sharding(unit.attention, tp):
            _divide_heads(attn, unit.attention, tp)
    # a pipeline chunk (transforms/pp.py) holds some of the modules; the others are gone or parameter-free
    plan = {fqn: style for fqn, style in full_plan.items()
            if (m := find_submodule(model, fqn)) is not None and any(True for _ in m.parameters())}
    parallelize_module(model, mesh, plan)
    emb = next((u.name for u in graph.units if u.kind == "embedding"), None)
    head = next((u.name for u in graph.units if u.kind == "head"), None)
    if graph.tied and emb and head and all(plan.get(m) for m in (emb, head)):
        # both styles made their own DTensor of the shared weight (same rows): share it again (a pipeline
        # stage holding only one of them keeps its own; transforms/pp.py sums the two gradients)
        model.get_submodule(head).weight = model.get_submodule(emb).weight
    return model


def _divide_heads(attn: nn.Module, info: AttentionInfo, tp: int) -> None:
    """This rank's head counts (q heads / tp, kv heads / tp or 1 when fewer than tp, their ratio) and fused
    split widths, on the attention module and, if its forward reads them from its config (Phi-3), on its own
    copy of the config. Only attributes holding the unsharded value are changed."""
    heads, kv = info.heads // tp, max(info.kv_heads // tp, 1)
    local = {**dict.fromkeys(Q_ATTRIBUTES, (info.heads, heads)), **dict.fromkeys(KV_ATTRIBUTES, (info.kv_heads, kv)),
             **dict.fromkeys(GROUP_ATTRIBUTES, (info.heads // info.kv_heads, heads // kv)),
             **dict.fromkeys(WIDTH_ATTRIBUTES, (info.heads * info.head_dim, heads * info.head_dim))}
    for name, (whole, mine) in local.items():
        if getattr(attn, name, None) == whole:
            setattr(attn, name, mine)
    config = getattr(attn, "config", None)
    if config is not None and any(getattr(config, k, None) is not None for k in Q_ATTRIBUTES + KV_ATTRIBUTES):
        attn.config = copy.copy(config)
        for name in Q_ATTRIBUTES + KV_ATTRIBUTES:
            if getattr(config, name, None) == local[name][0]:
                setattr(attn.config, name, local[name][1])


def check_tp(model: nn.Module, graph: ModelGraph, *, tp: int, sp: bool, loss_parallel: bool = True,
             warn: bool = True) -> dict[str, ParallelStyle]:
    """The TP plan, after checking (on every rank, before any collective) that every module holding
    parameters is one the plan shards, or sees the same whole input on every tp rank (so its replicated
    parameters get equal, whole gradients). Raises ValueError naming the first module that is neither;
    warns for each attention or MLP that runs replicated."""
    plan = tp_plan(graph, tp=tp, sp=sp, loss_parallel=loss_parallel)
    if sp and graph.seq_len % tp:
        raise ValueError(f"sequence parallelism splits the {graph.seq_len} tokens over tp = {tp}: not divisible")
    for unit in graph.blocks:
        for info in (unit.attention, unit.mlp):
            why = (attention_sharding(info, tp) if isinstance(info, AttentionInfo) else info.replicate) if info else ""
            if why and warn:
                warnings.warn(f"tp={tp}: {info.module} runs replicated on every tp rank (correct, no memory "
                              f"saving): {why}", stacklevel=3)
    if sp:
        _check_covered(model, graph, plan)
    return plan


def _check_covered(model: nn.Module, graph: ModelGraph, plan: dict[str, ParallelStyle]) -> None:
    """Under SP the residual stream is split over the sequence: a module with parameters outside every
    planned module would see 1/tp of the tokens and get 1/tp of its gradient on each rank, a silently wrong
    update (the Mixtral bug of issue 14: experts stored as tensors were not recognised as an MoE)."""
    for unit in graph.blocks:
        root = find_submodule(model, unit.name)
        if root is None:
            continue
        for fqn, mod in root.named_modules():
            full = f"{unit.name}.{fqn}" if fqn else unit.name
            if not any(True for _ in mod.parameters(recurse=False)):
                continue
            # the block's own boundary (its input split or output gathered) does not cover what runs inside
            if not any(full == p or full.startswith(p + ".") for p in plan if p != unit.name):
                raise ValueError(
                    f"{full} ({type(mod).__name__}) holds parameters that tensor parallelism with sequence "
                    f"parallelism does not know how to run: it is neither sharded nor given the whole sequence. "
                    f"Supported: {SUPPORTED}. Use sp=false (the residual stream stays whole) or tp=1")
