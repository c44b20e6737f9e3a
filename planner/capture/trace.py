"""Capture a model on the meta device into a ModelGraph.

Two things happen:

1. **Trace** for the data flow between units: torch.fx symbolic trace with shape propagation first; when
   that fails (data-dependent control flow, as in many Hugging Face models), torch.export (non-strict);
   when that fails too, forward hooks on an eager run. Each gives tensor-level flow between units, from
   which the same block graph and pipeline cut points follow.
2. **Measure** with one forward and backward under FakeTensorMode on meta weights: FLOPs per module and op
   with torch.utils.flop_counter, and the bytes saved for backward with saved-tensor hooks (the model's own
   number, not a textbook formula). Fake tensors rather than plain meta ones, because model code that reads
   a tensor value (`.item()` in mask helpers) fails on meta but is traced through on fake tensors.

No real weights are ever allocated: a 405B model is captured in well under 2 GB of RAM.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from autoshard.planner.capture import structure
from autoshard.planner.capture.model_graph import ModelGraph, Unit, cuts_from_flow, edges_from_flow
from autoshard.planner.capture.repeat import capture_repeated, expand_captured
from autoshard.planner.errors import CaptureError

METHODS = ("fx", "export", "hooks")
SPEC_METHODS = ("hooks",)
"""A spec is autoshard's own reference transformer: the module hooks of the measuring run see the flow that fx
would trace (tests/unit/capture/test_capture.py checks that the three methods agree on the bundled specs), and
fx tracing cost 0.1-0.3 s of a cold `plan` (benchmarks/search_speed.py)."""
Flow = list[tuple[str, str, int, bool]]
"""(producer unit, consumer unit, tensor id, needs grad)."""


def capture(
    model: nn.Module | str,
    micro_batch: int = 1,
    seq_len: int | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    methods: Sequence[str] | None = None,
    repeat: bool = True,
) -> ModelGraph:
    """Capture `model` (an nn.Module, or a path to model.py, spec.yaml or a Hugging Face config) on meta.

    `methods` restricts the trace methods tried, in order (tests use it to force a path; default METHODS,
    SPEC_METHODS for a spec). `repeat` captures
    two blocks of each run of identical blocks and repeats them (planner/capture/repeat.py); False captures every
    block (and keeps the whole model's fx GraphModule).
    """
    from autoshard.planner.capture.loading import (  # loading imports capture's callers; keep the import local
        load_model,
        with_seq_len,
    )

    loaded = load_model(model)
    seq_len = seq_len or loaded.seq_len
    loaded = with_seq_len(loaded, seq_len)
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch ({micro_batch}) and seq_len ({seq_len}) must be positive")
    inputs = loaded.example_inputs(micro_batch, seq_len)
    methods = methods or (SPEC_METHODS if loaded.module is None else METHODS)
    graph = None
    if loaded.module is None and repeat:
        graph, module, declared, unbuilt = _capture_spec_repeated(loaded.spec, dtype, inputs, methods)
    if graph is None:
        module = to_meta(loaded.module) if loaded.module is not None else _spec_module(loaded.spec)
        declared, unbuilt = _param_bytes(module), 0
        module.to(dtype)
        if repeat:
            graph = capture_repeated(module, lambda mod: _capture_module(mod, inputs, methods))
        if graph is None:
            graph = _capture_module(module, inputs, methods)
    built = _param_count(module)
    graph.params = built + unbuilt  # blocks never built: their repeated units carry their parameters
    declared = {k: round(v * graph.params / built) for k, v in declared.items()}
    graph.tied = _tied(module)
    graph.name, graph.micro_batch, graph.seq_len, graph.dtype = loaded.name, micro_batch, seq_len, str(dtype)
    graph.param_bytes = declared
    graph.warnings = list(loaded.warnings) + graph.warnings
    return graph


def _spec_module(spec: Any, layer_ids: list[int] | None = None, experts_built: int | None = None) -> nn.Module:
    """autoshard's reference transformer for a spec, built on meta (ours: no copy needed)."""
    from autoshard.planner.capture.reference_model import build_reference_model

    with torch.device("meta"):
        return build_reference_model(spec, layer_ids, experts_built)


def _capture_spec_repeated(spec: Any, dtype: torch.dtype, inputs: tuple,
                           methods: Sequence[str]) -> tuple[ModelGraph | None, nn.Module, dict[str, int], int]:
    """A spec model with only the blocks repeat.py would keep built, captured and expanded to every block:
    (graph, the built module, its declared parameter bytes, parameters of the blocks never built); graph
    None when there is nothing to save or the flow is irregular (the caller then builds the whole model)."""
    from autoshard.planner.capture.reference_model import repeated_blocks

    keep, runs = repeated_blocks(spec)
    if len(keep) == spec.layers:
        return None, nn.Module(), {}, 0
    module = _spec_module(spec, keep, experts_built=2)  # one expert runs on meta (reference_model.MoE)
    declared = _param_bytes(module)
    module.to(dtype)
    try:
        graph = expand_captured(_capture_module(module, inputs, methods), "layers", keep, runs)
    except Exception:  # noqa: BLE001 - the whole model is captured instead
        graph = None
    if graph is None:
        return None, module, declared, 0
    built = {f"layers.{i}" for i in keep}
    unbuilt = sum(u.params for u in graph.units if u.kind == "block" and u.name not in built)
    return graph, module, declared, unbuilt


def to_meta(model: nn.Module) -> nn.Module:
    """A copy of the model on meta (weights are never copied; the user's model is never changed, even when it
    is already on meta: capture casts its copy to the capture dtype)."""
    tensors = list(model.parameters()) + list(model.buffers())
    memo: dict[int, Any] = {}
    for t in tensors:
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def _param_bytes(model: nn.Module, declared: list | None = None) -> dict[str, int]:
    """Parameter bytes by dtype, experts declared but not built included (structure.declared_parameters,
    or `declared` when the caller has them)."""
    out: dict[str, int] = defaultdict(int)
    for _, shape, dtype in declared if declared is not None else structure.declared_parameters(model):
        out[str(dtype).removeprefix("torch.")] += math.prod(shape) * dtype.itemsize
    return dict(out)


def _param_count(model: nn.Module, declared: list | None = None) -> int:
    """Parameters of `model`, experts declared but not built included (as _param_bytes)."""
    return sum(math.prod(shape) for _, shape, _ in
               (declared if declared is not None else structure.declared_parameters(model)))


@dataclass(kw_only=True, slots=True)
class _Layout:
    """Units of a model: FQNs in execution order, which are blocks, and the module -> FQN map."""

    units: list[str]
    blocks: set[str]
    fqn_of: dict[int, str]

    def unit_of_stack(self, stack: Sequence[str]) -> str | None:
        """The outermost unit among the running modules."""
        return next((f for f in stack if f in self.unit_set), None)

    @property
    def unit_set(self) -> frozenset[str]:
        if self._unit_set is None or len(self._unit_set) != len(self.units):
            self._unit_set = frozenset(self.units)
        return self._unit_set

    _unit_set: frozenset[str] | None = None


def _layout(module: nn.Module) -> _Layout:
    found = structure.find_block_container(module)
    container, blocks = (found[0], found[1]) if found else (None, [])
    return _Layout(
        units=structure.unit_names(module, container),
        blocks=set(blocks),
        fqn_of={id(m): n for n, m in module.named_modules()},
    )


def _capture_module(module: nn.Module, inputs: tuple, methods: Sequence[str]) -> ModelGraph:
    layout = _layout(module)
    m = _measure(module, inputs, layout)
    order = {u: i for i, u in enumerate(m.order)}
    layout.units = sorted((u for u in layout.units if u in order), key=order.__getitem__)
    failures: dict[str, str] = {}
    for method in methods:
        try:
            gm, flow, nbytes = _TRACERS[method](module, inputs, layout, m)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next method
            failures[method] = f"{type(exc).__name__}: {_first_line(exc)}"
            continue
        graph = _build_graph(module, layout, m, flow, nbytes)
        graph.capture_method, graph.capture_failures, graph.gm = method, failures, gm
        return graph
    reasons = "; ".join(f"{k}: {v}" for k, v in failures.items())
    raise CaptureError(
        f"could not capture the model: every trace method failed ({reasons}). Make the forward run on the "
        "meta device (no .item(), no data-dependent Python control flow outside torch ops), or pass "
        "example_inputs() that match its signature."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


# ---------------------------------------------------------------- measurement (always on fake tensors)


@dataclass(kw_only=True, slots=True)
class _Measured:
    order: list[str] = field(default_factory=list)
    fwd: dict[str, dict[str, int]] = field(default_factory=dict)
    total: dict[str, dict[str, int]] = field(default_factory=dict)
    saved: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    """(innermost module FQN, torch function) -> bytes saved for backward."""
    events: dict[str, list[structure.Event]] = field(default_factory=lambda: defaultdict(list))
    flow: Flow = field(default_factory=list)
    nbytes: dict[int, int] = field(default_factory=dict)


_FN_EVENTS = {"scaled_dot_product_attention", "softmax", "topk"}
_SPLITS = {"split", "chunk", "view", "reshape", "__getitem__", "unflatten", "split_with_sizes", "tensor_split"}
"""How a linear's output is cut into parts (q/k/v, gate/up): recorded for fused projections (structure.py)."""


class _Recorder(TorchFunctionMode):
    """Tracks running modules, attributes saved tensors to (module, function), records the unit flow.

    The flow is what the `hooks` method reports: each tensor is tagged with the unit that made it; a call
    outside every unit (the model's own forward body) runs as part of the latest unit it reads from.
    """

    def __init__(self, layout: _Layout, m: _Measured) -> None:
        super().__init__()
        self.layout, self.m = layout, m
        self.stack: list[str] = []
        self.op = ""
        self.tensor_unit: dict[int, str] = {}
        self.rank: dict[str, int] = {}
        """Unit -> position in the order of first call."""
        self.keep: list[torch.Tensor] = []  # keeps ids unique while the run lasts
        self.param_storages: set[int] = set()
        self.seen_storages: set[int] = set()
        self.linear_out: dict[int, tuple[str, tuple[int, ...]]] = {}
        """id of a linear module's output, or of a view of it into heads -> (the linear's FQN, its output
        shape), to record how the output is split."""

    def pre_hook(self, mod: nn.Module, args: Any) -> None:
        fqn = self.layout.fqn_of.get(id(mod))
        if fqn is None:
            return
        self.stack.append(fqn)
        unit = self.layout.unit_of_stack(self.stack)
        if unit is not None and unit not in self.rank:
            self.rank[unit] = len(self.m.order)
            self.m.order.append(unit)
        if unit is not None:
            self.m.events[unit].append(structure.Event(kind="module", name=fqn, stack=tuple(self.stack), info={}))

    def post_hook(self, mod: nn.Module, args: Any, out: Any) -> None:
        fqn = self.layout.fqn_of.get(id(mod))
        if fqn is not None and self.stack:
            self.stack.pop()
        if fqn is not None and structure.is_linear(mod) and isinstance(out, torch.Tensor):
            self.linear_out[id(out)] = (fqn, tuple(out.shape))
            self.keep.append(out)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.param_storages and key not in self.seen_storages:
            self.seen_storages.add(key)
            where = self.stack[-1] if self.stack else ""
            self.m.saved[(where, self.op)] += t.untyped_storage().nbytes()
        return t

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        outer, self.op = self.op, name
        out = func(*args, **kwargs)
        self.op = outer
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outs:
            ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self._flow(ins, outs)
            if name in _FN_EVENTS:
                self._event(name, args, kwargs)
            elif name in _SPLITS and args and id(args[0]) in self.linear_out:
                self._split_event(name, args[0], outs)
        return out

    def _split_event(self, name: str, source: torch.Tensor, outs: list[torch.Tensor]) -> None:
        """Records how a linear's output is cut; `in_shape` is the linear's output shape (the flat width
        last), also when `source` is a view of it into heads [..., n, d], whose next cut is recorded too
        (structure._fused_qkv: such a view alone does not show which heads are q, k and v)."""
        unit = self.layout.unit_of_stack(self.stack)
        if unit is None:
            return
        linear, shape = self.linear_out[id(source)]
        info = {"linear": linear, "in_shape": shape, "out_shapes": [tuple(o.shape) for o in outs]}
        self.m.events[unit].append(structure.Event(kind="fn", name=name, stack=tuple(self.stack), info=info))
        out = outs[0] if len(outs) == 1 else None
        if out is not None and name in structure.RESHAPES and source.shape == shape and \
                out.dim() == source.dim() + 1 and out.shape[:-2] == source.shape[:-1]:
            self.linear_out[id(out)] = (linear, shape)

    def _flow(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        unit = self.layout.unit_of_stack(self.stack)
        in_units = [self.tensor_unit.get(id(t)) for t in ins]
        if unit is None:
            known = [u for u in in_units if u is not None]
            unit = max(known, key=self.rank.__getitem__) if known else None
        if unit is None:
            return
        for t, u in zip(ins, in_units, strict=True):
            if u is not None and u != unit:
                self.m.flow.append((u, unit, id(t), t.requires_grad))
        for t in outs:
            self.tensor_unit[id(t)] = unit
            self.m.nbytes[id(t)] = t.numel() * t.element_size()
            self.keep.append(t)

    def _event(self, name: str, args: Any, kwargs: Any) -> None:
        unit = self.layout.unit_of_stack(self.stack)
        if unit is None:
            return
        info: dict[str, Any] = {}
        if name == "scaled_dot_product_attention":
            q, k = args[0], args[1]
            info = {"heads": q.shape[-3], "kv_heads": k.shape[-3], "head_dim": q.shape[-1]}
        elif name == "softmax":
            info = {"ndim": args[0].dim(), "shape": tuple(args[0].shape)}
        elif name == "topk":
            info = {"k": int(args[1] if len(args) > 1 else kwargs["k"])}
        self.m.events[unit].append(structure.Event(kind="fn", name=name, stack=tuple(self.stack), info=info))


def _measure(module: nn.Module, inputs: tuple, layout: _Layout) -> _Measured:
    """One forward + backward: FLOPs, saved bytes, events and the hooks flow.

    Plain meta tensors first (fast); fake tensors when the forward reads a value (`.item()`), which meta
    tensors cannot give but FakeTensorMode traces through.
    """
    try:
        return _measure_in(module, inputs, layout, fake=None)
    except Exception:  # noqa: BLE001 - retry on fake tensors; report that run's error if it fails too
        pass
    try:
        return _measure_in(module, inputs, layout, fake=FakeTensorMode(allow_non_fake_inputs=True))
    except Exception as exc:
        raise CaptureError(
            f"the model's forward and backward could not run on the meta device: {type(exc).__name__}: "
            f"{_first_line(exc)}. autoshard measures FLOPs and activations without real weights, so the "
            "forward must not read tensor values (.item(), .tolist(), Python branches on tensor data); a "
            "sequence length beyond the model's maximum (position tables) fails the same way."
        ) from exc


def _measure_in(module: nn.Module, inputs: tuple, layout: _Layout, fake: FakeTensorMode | None) -> _Measured:
    m = _Measured()
    state = dict(_named_state(module))
    args = inputs
    if fake is not None:
        state = {n: fake.from_tensor(t) for n, t in state.items()}
        for n, p in module.named_parameters(remove_duplicate=False):
            state[n].requires_grad_(p.requires_grad)
        args = pytree.tree_map(lambda t: fake.from_tensor(t) if isinstance(t, torch.Tensor) else t, inputs)
    rec = _Recorder(layout, m)
    rec.param_storages = {t.untyped_storage()._cdata for t in state.values()}
    pre = nn.modules.module.register_module_forward_pre_hook(rec.pre_hook)
    post = nn.modules.module.register_module_forward_hook(rec.post_hook, always_call=True)
    try:
        with fake if fake is not None else contextlib.nullcontext():
            counter = FlopCounterMode(display=False)
            with counter, torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
                with rec:
                    out = torch.func.functional_call(module, state, args, tie_weights=True, strict=False)
                m.fwd = _by_fqn(counter, module)
                rec.op = "backward"
                _scalar(out).backward()
            m.total = _by_fqn(counter, module)
    finally:
        pre.remove()
        post.remove()
    return m


def _named_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = list(module.named_parameters(remove_duplicate=False))
    return params + list(module.named_buffers(remove_duplicate=False))


def _scalar(out: Any) -> torch.Tensor:
    """A scalar to call backward on: the model's loss if it returns one, else the sum of its first output."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.sum()
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            return t.sum()
    raise CaptureError("the model's output holds no floating-point tensor that needs a gradient")


def _by_fqn(counter: FlopCounterMode, module: nn.Module) -> dict[str, dict[str, int]]:
    """FlopCounterMode names modules `RootClass.fqn`; key them by FQN ('' for the root)."""
    root = type(module).__name__
    out: dict[str, dict[str, int]] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root:
            continue  # the root's backward is missed when its output is not a pytree: use Global
        fqn = "" if name == "Global" else name.removeprefix(root + ".")
        out[fqn] = {str(op): int(v) for op, v in ops.items()}
    return out


# ---------------------------------------------------------------- the three trace methods


def _trace_fx(module: nn.Module, inputs: tuple, layout: _Layout, m: _Measured) -> tuple[Any, Flow, dict]:
    gm = torch.fx.symbolic_trace(module)
    ShapeProp(gm).propagate(*inputs)  # inputs and weights are on meta: shapes without data
    return gm, *_graph_flow(gm.graph, layout, lambda n: n.meta.get("tensor_meta"))


def _trace_export(module: nn.Module, inputs: tuple, layout: _Layout, m: _Measured) -> tuple[Any, Flow, dict]:
    ep = torch.export.export(module, tuple(inputs), strict=False)
    params = set(ep.graph_signature.inputs_to_parameters)
    return ep.module(), *_graph_flow(ep.graph, layout, lambda n: n.meta.get("val"), params=params)


def _trace_hooks(module: nn.Module, inputs: tuple, layout: _Layout, m: _Measured) -> tuple[Any, Flow, dict]:
    return None, m.flow, m.nbytes


_TRACERS = {"fx": _trace_fx, "export": _trace_export, "hooks": _trace_hooks}


def _graph_flow(
    graph: torch.fx.Graph, layout: _Layout, meta: Callable[[torch.fx.Node], Any], params: set[str] = frozenset()
) -> tuple[Flow, dict[int, int]]:
    """Tensor-level flow between units from a traced graph, by the same rule as the hooks recorder."""
    order = {u: i for i, u in enumerate(layout.units)}
    unit_of: dict[torch.fx.Node, str | None] = {}
    grad: dict[torch.fx.Node, bool] = {}
    flow: Flow = []
    nbytes: dict[int, int] = {}
    for node in graph.nodes:
        tensors = _tensor_metas(meta(node))
        ins = [n for n in node.all_input_nodes if unit_of.get(n) is not None]
        grad[node] = _needs_grad(node, tensors, grad, params)
        if not tensors or node.op in ("placeholder", "get_attr", "output"):
            unit_of[node] = None
            continue
        stack = [v[0] for v in node.meta.get("nn_module_stack", {}).values()]
        unit = layout.unit_of_stack(stack)
        if unit is None and ins:
            unit = max((unit_of[n] for n in ins), key=order.__getitem__)
        unit_of[node] = unit
        if unit is None:
            continue
        for n in ins:
            if unit_of[n] != unit:
                flow.append((unit_of[n], unit, id(n), grad[n]))
        nbytes[id(node)] = sum(_nbytes(t) for t in tensors)
    return flow, nbytes


def _tensor_metas(val: Any) -> list[Any]:
    leaves = pytree.tree_leaves(val, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return [x for x in leaves if hasattr(x, "shape") and hasattr(x, "dtype")]


def _needs_grad(node: torch.fx.Node, tensors: list[Any], grad: dict, params: set[str]) -> bool:
    """A node needs a gradient when it is floating point and reads a trainable parameter."""
    if not tensors or not all(_is_float(t) for t in tensors):
        return False
    if any(getattr(t, "requires_grad", False) for t in tensors):
        return True
    return node.name in params or any(grad.get(n, False) for n in node.all_input_nodes)


def _is_float(t: Any) -> bool:
    return getattr(t, "dtype", None) in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                         torch.float8_e4m3fn, torch.float8_e5m2)


def _nbytes(t: Any) -> int:
    numel = 1
    for s in t.shape:
        numel *= int(s)
    return numel * t.dtype.itemsize


# ---------------------------------------------------------------- assembling the ModelGraph


def _build_graph(module: nn.Module, layout: _Layout, m: _Measured, flow: Flow, nbytes: dict[int, int]) -> ModelGraph:
    emb = structure.token_embedding(module)
    vocab, hidden = (emb.num_embeddings, emb.embedding_dim) if emb is not None else (0, 0)
    units = [_unit(module, name, layout, m, vocab, hidden) for name in layout.units]
    order = {u: i for i, u in enumerate(layout.units)}
    flow = [f for f in flow if f[0] in order and f[1] in order]
    total_fwd = sum(m.fwd.get("", {}).values())
    total_bwd = sum(m.total.get("", {}).values()) - total_fwd
    saved_total = sum(m.saved.values())
    return ModelGraph(
        name="",
        capture_method="",
        capture_failures={},
        micro_batch=0,
        seq_len=0,
        dtype="",
        units=units,
        edges=edges_from_flow(flow, nbytes),
        cut_points=cuts_from_flow(order, flow),
        params=_param_count(module),
        param_bytes={},
        fwd_flops=total_fwd,
        bwd_flops=total_bwd,
        saved_bytes=saved_total,
        root_fwd_flops=total_fwd - sum(u.fwd_flops for u in units),
        root_bwd_flops=total_bwd - sum(u.bwd_flops for u in units),
        root_saved_bytes=saved_total - sum(u.saved_bytes for u in units),
        hidden=hidden,
        vocab=vocab,
        tied=_tied(module),
    )


def _unit(module: nn.Module, name: str, layout: _Layout, m: _Measured, vocab: int, hidden: int) -> Unit:
    mod = module.get_submodule(name)
    fwd_ops, tot_ops = m.fwd.get(name, {}), m.total.get(name, {})
    flops_by_op = {op: [fwd_ops.get(op, 0), tot_ops.get(op, 0) - fwd_ops.get(op, 0)] for op in sorted(tot_ops)}
    saved_by_op: dict[str, int] = defaultdict(int)
    for (where, op), n in m.saved.items():
        if structure._under(where, name):
            saved_by_op[op] += n
    declared = structure.declared_parameters(mod)
    unit = Unit(
        name=name,
        kind=structure.unit_kind(module, name, layout.blocks, vocab),
        cls=type(mod).__name__,
        signature=structure.signature(mod),
        params=_param_count(mod, declared),
        param_bytes=_param_bytes(mod, declared),
        param_tensors=len(declared),
        fwd_flops=sum(v[0] for v in flops_by_op.values()),
        bwd_flops=sum(v[1] for v in flops_by_op.values()),
        saved_bytes=sum(saved_by_op.values()),
        flops_by_op=flops_by_op,
        saved_by_op=dict(sorted(saved_by_op.items())),
    )
    if unit.kind == "block":
        roles = structure.block_roles(module, name, m.events.get(name, []), hidden)
        unit.attention, unit.mlp, unit.moe, unit.norms = roles["attention"], roles["mlp"], roles["moe"], roles["norms"]
        if unit.attention is not None:
            _attention_costs(unit, m)
    return unit


def _attention_costs(unit: Unit, m: _Measured) -> None:
    """FLOPs and saved bytes of the attention core alone (the cost model swaps them for a fused kernel's)."""
    attn = unit.attention
    assert attn is not None
    core_ops = ("scaled_dot_product", "bmm")
    ops = m.fwd.get(attn.module, {})
    attn.core_fwd_flops = sum(v for op, v in ops.items() if any(c in op for c in core_ops))
    core_fns = ("scaled_dot_product_attention", "softmax", "matmul", "bmm", "dropout", "__matmul__")
    attn.core_saved_bytes = sum(n for (where, op), n in m.saved.items()
                                if structure._under(where, attn.module) and op in core_fns)


def _tied(module: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = defaultdict(list)
    for n, p in module.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(n)
    return [names for names in by_id.values() if len(names) > 1]
