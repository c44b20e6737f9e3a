"""Expert parallelism: each MoE layer's experts sharded over the ep ranks, tokens sent to them and back.

Groups (torchtitan's "ep" inside "dp_shard"). The ep ranks are consecutive inside the data-parallel axis
"dp_cp" (dp x cp, size D): `mesh["dp_cp"]` is unflattened into ("edp", "ep") = (D / ep, ep). The ep ranks
of one "ep" group hold different experts (E / ep each, contiguous: rank j owns experts j*E/ep ...) and swap
tokens; the D / ep ranks of one "edp" group hold the same experts and are their data-parallel replicas.
Everything else in the model stays data-parallel over all of "dp_cp" (transforms/dp.py).

Dispatch, per MoE layer and forward. Only the experts are replaced, so the routing (softmax or sigmoid,
top-k, renormalisation, capacity drops, the auxiliary load-balancing loss, shared experts) stays the
unsharded model's code. Three paths, by what the MoE module lets us replace:
- route -> run_experts -> combine (autoshard's reference MoE, planner/capture/reference_model.py; any
  module with a `run_experts(rows, counts)` method, rows grouped by expert, counts[e] rows for expert e):
  the router runs once; `run_experts` is replaced by `expert_parallel_run`: one `all_to_all_single` of
  the per-expert counts and one autograd-aware variable-split `all_to_all_single` of the rows (already cut
  to capacity on the sending rank, so dropped assignments are never sent), each rank runs its E / ep
  experts on the rows from all ep ranks (grouped by local expert: one grouped GEMM per weight where
  `torch._grouped_mm` runs, reference_model.run_local_experts), and a second all_to_all sends the outputs
  back in the order they came; the backward is the reverse exchange.
- stacked experts called as experts(hidden_states, top_k_index, top_k_weights) (Hugging Face
  transformers 5 MoE blocks: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...): that module's forward is
  replaced (`stacked_expert_forward`); the router runs once in the model's own forward.
- anything else whose forward calls a ModuleList of experts (the fallback, e.g. a hand-written Mixtral
  loop, tests/data/ep/mixtral_style_moe.py): record/replay, the forward runs twice:
  1. record: calling expert e stores its input rows and returns zeros (shared experts are skipped, also
     returning zeros); the router and top-k run as in the unsharded model;
  2. exchange: the rows for expert e, concatenated in expert order (so grouped by owner rank), go to their
     owner and back as above (`dispatch`);
  3. replay: the forward runs again, and calling expert e now returns the output computed for exactly that
     call, so the gates, the combine (index_add, sums) and the shared experts run in the unsharded order.
  The recorded rows keep their autograd path to the layer input (a gather by token index), so gradients
  reach the input through phase 1 and the gates and router through phase 3. The cost over a hand-fused
  forward: the router, top-k and gather run twice (a few percent of a layer's FLOPs at hidden >> E). It
  needs a forward that calls its experts (each any number of times) with one tensor [..., hidden] and
  returns the same shape, deterministically for the same input.
The routing group (the tokens whose T*k assignments share a capacity and an aux loss) is what one rank's
MoE forward sees: one micro-batch of its data-parallel shard (whole, as tensor parallelism gathers it),
the same set as in the unsharded model run with the same micro-batch size; EP only moves rows, so the
capacity drops and the aux loss are the unsharded model's.

Gradients. Rank r's loss is the mean over its own tokens, and dense gradients are averaged over the D
ranks. An expert's gradient on its owner already sums the contributions of all ep ranks' tokens (the
all_to_all backward brings them), so it is summed over the edp group and divided by D, not by D / ep.
`ExpertParallelOptimizer` divides the expert gradients by ep before stepping (`.grad`, and under bf16 with
fp32 gradient reduction the fp32 `main_grad` buffer they accumulate in); the average over "edp" is ZeRO's:
zero 0 and 1 a `ShardedAdamW` over "edp" (its all-reduce; flat 1/edp slices for zero 1; DDP leaves the
experts out; under bf16 the experts are bf16 and it holds their fp32 master, as the dense optimizer does,
transforms/precision.py), zero 2 and 3 FSDP2 on each local expert over "edp" (its reduce-scatter, in the
same mixed-precision policy), applied before the blocks' FSDP2 so those leave the experts out. (FSDP2's `set_gradient_divide_factor(D)` would fold the
1 / ep into the reduce-scatter, but it needs PREMUL_SUM, which gloo lacks.) The expert parameters keep
their unsharded names (`experts.{e}...`), so the seeded init (transforms/init.py) gives them the unsharded
model's values and `ExpertShards.gather` can collect whole gradients by name.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from autoshard.planner.capture.model_graph import ModelGraph, MoEInfo
from autoshard.planner.capture.reference_model import run_local_experts

from .dp import ShardedAdamW
from .init import REGROUPED, clean_fqn, find_submodule


class LocalExperts(nn.Module):
    """Stands in for a MoE layer's experts ModuleList: holds this rank's experts under their global indices
    (parameter names stay `experts.{e}.…`) and, to a record/replay forward, looks like the list of all E
    experts, whose entries record their inputs or replay outputs computed on the owner ranks."""

    def __init__(self, experts: nn.ModuleList, owned: range) -> None:
        super().__init__()
        self.num_experts, self.owned = len(experts), owned
        for e in owned:
            self.add_module(str(e), experts[e])
        self.calls: dict[int, list[Tensor]] | None = None
        self.outputs: dict[int, list[Tensor]] | None = None

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> Callable[[Tensor], Tensor]:
        e = range(self.num_experts)[e]
        return lambda x, *more, **kw: self._call(e, x, *more, **kw)

    def __iter__(self) -> Iterator[Callable[[Tensor], Tensor]]:
        return (self[e] for e in range(self.num_experts))

    def local(self) -> list[nn.Module]:
        return [self.get_submodule(str(e)) for e in self.owned]

    def _call(self, e: int, x: Tensor, *more, **kw) -> Tensor:
        if more or kw or not isinstance(x, Tensor):
            raise ValueError("expert parallelism needs experts called with one tensor [..., hidden]; this MoE "
                             "passes more arguments")
        if self.calls is not None:
            self.calls.setdefault(e, []).append(x)
            return torch.zeros_like(x)
        if self.outputs is None:
            raise RuntimeError("an expert-parallel MoE layer ran outside its forward")
        out = self.outputs[e].pop(0)
        assert out.shape == x.shape, "the MoE forward called its experts differently on replay"
        return out

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, list[Tensor]]]:
        self.calls = {}
        try:
            yield self.calls
        finally:
            self.calls = None

    @contextlib.contextmanager
    def replaying(self, outputs: dict[int, list[Tensor]]) -> Iterator[None]:
        self.outputs = outputs
        try:
            yield
        finally:
            self.outputs = None


def dispatch(calls: dict[int, list[Tensor]], experts: LocalExperts, *, hidden: int, like: Tensor,
             group: dist.ProcessGroup) -> dict[int, list[Tensor]]:
    """Run every recorded expert call on the rank owning the expert; the outputs, per expert and call."""
    ep, per_rank = dist.get_world_size(group), len(experts.owned)
    rows = [[x.reshape(-1, hidden) for x in calls.get(e, [])] for e in range(experts.num_experts)]
    flat = [torch.cat(r) if r else like.new_zeros(0, hidden) for r in rows]
    counts = torch.tensor([t.shape[0] for t in flat], dtype=torch.long, device=like.device)
    recv_counts = torch.empty_like(counts)  # [source rank, local expert] flattened
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.view(ep, per_rank).sum(1).tolist()
    recv_splits = recv_counts.view(ep, per_rank).sum(1).tolist()
    received = all_to_all_single_autograd(torch.cat(flat), recv_splits, send_splits, group)
    pieces = received.split(recv_counts.tolist())
    outs: list[Tensor] = [None] * len(pieces)  # type: ignore[list-item]
    for i, expert in enumerate(experts.local()):
        mine = [pieces[s * per_rank + i] for s in range(ep)]
        y = expert(torch.cat(mine))
        for s, part in enumerate(y.split([m.shape[0] for m in mine])):
            outs[s * per_rank + i] = part
    back = all_to_all_single_autograd(torch.cat(outs), send_splits, recv_splits, group)
    results: dict[int, list[Tensor]] = {}
    for e, y in enumerate(back.split(counts.tolist())):
        shapes = calls.get(e, [])
        parts = y.split([x.numel() // hidden for x in shapes])
        results[e] = [p.view(*x.shape[:-1], p.shape[-1]) for p, x in zip(parts, shapes, strict=True)]
    return results


def expert_parallel_run(experts: LocalExperts, group: dist.ProcessGroup) -> Callable[[Tensor, Tensor], Tensor]:
    """`run_experts(rows, counts)` of a route -> run_experts -> combine MoE with the experts on their owner
    ranks: rows grouped by (global) expert, counts [E]; the outputs in the same order (module docstring)."""
    per_rank, local = len(experts.owned), experts.local()

    def run(rows: Tensor, counts: Tensor) -> Tensor:
        ep = dist.get_world_size(group)
        recv_counts = torch.empty_like(counts)  # [source rank, local expert] flattened
        dist.all_to_all_single(recv_counts, counts, group=group)
        send_splits = counts.view(ep, per_rank).sum(1).tolist()
        recv_splits = recv_counts.view(ep, per_rank).sum(1).tolist()
        received = all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, group)
        pieces = received.split(recv_counts.tolist())
        by_expert = [s * per_rank + i for i in range(per_rank) for s in range(ep)]  # [local expert, source]
        out = run_local_experts(local, torch.cat([pieces[j] for j in by_expert]),
                                recv_counts.view(ep, per_rank).sum(0))
        outs: list[Tensor] = [None] * len(pieces)  # type: ignore[list-item]
        for j, part in zip(by_expert, out.split([pieces[j].shape[0] for j in by_expert]), strict=True):
            outs[j] = part
        return all_to_all_single_autograd(torch.cat(outs), send_splits, recv_splits, group)

    return run


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))


@contextlib.contextmanager
def _skipped(modules: list[nn.Module]) -> Iterator[None]:
    """While recording, the shared experts return zeros (their output is discarded anyway)."""
    for m in modules:
        m.forward = lambda x, *a, **k: torch.zeros_like(x)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def expert_parallel_forward(moe: nn.Module, experts: LocalExperts, shared: list[nn.Module],
                            group: dist.ProcessGroup) -> Callable:
    """The MoE layer's forward with its experts run on their owner ranks (module docstring, steps 1-3)."""
    original = moe.forward

    def forward(*args, **kwargs):
        x = _first_tensor(args, kwargs)
        with experts.recording() as calls, _skipped(shared):
            original(*args, **kwargs)
        outputs = dispatch(calls, experts, hidden=x.shape[-1], like=x, group=group)
        with experts.replaying(outputs):
            return original(*args, **kwargs)

    return forward


STACKED_SIGNATURE = ("hidden_states", "top_k_index", "top_k_weights")
"""The call of stacked experts (transformers 5): out[t] = sum over slots j of top_k_weights[t, j] *
expert_{top_k_index[t, j]}(hidden_states[t])."""


def shard_stacked(experts: nn.Module, owned: range) -> None:
    """Keep this rank's experts of every [experts, ...] tensor (under the same names; init.REGROUPED tells
    the seeded init and the gradient gather which slice it is) and make the module count only them."""
    index = torch.arange(owned.start, owned.stop)
    for name, param in list(experts.named_parameters(recurse=False)):
        local = param.detach()[owned.start:owned.stop].clone()
        experts.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))
        experts.__dict__.setdefault(REGROUPED, {})[name] = (0, index, int(param.shape[0]))
    if isinstance(getattr(experts, "num_experts", None), int):
        experts.num_experts = len(owned)


def stacked_expert_forward(experts: nn.Module, *, num_experts: int, owned: range,
                           group: dist.ProcessGroup) -> Callable:
    """The stacked experts' forward with every (token, slot) pair sent to the rank owning its expert; the
    owner runs the module's own forward on the rows it received (each as a top-1 call with weight 1), the
    outputs come back and are weighted and summed in the unsharded order (ascending expert per token)."""
    original, per_rank = experts.forward, len(owned)

    def forward(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        hidden = hidden_states.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # grouped by expert, so by owner rank
        token = order // top_k_index.shape[-1]
        counts = torch.bincount(flat, minlength=num_experts)
        recv_counts = torch.empty_like(counts)  # [source rank, local expert] flattened
        dist.all_to_all_single(recv_counts, counts, group=group)
        ep = dist.get_world_size(group)
        send_splits = counts.view(ep, per_rank).sum(1).tolist()
        recv_splits = recv_counts.view(ep, per_rank).sum(1).tolist()
        rows = all_to_all_single_autograd(hidden_states.reshape(-1, hidden)[token], recv_splits, send_splits, group)
        local = torch.arange(per_rank, device=flat.device).repeat(ep).repeat_interleave(recv_counts)
        ones = torch.ones(len(local), 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
        out = original(rows, local[:, None], ones)
        back = all_to_all_single_autograd(out, send_splits, recv_splits, group)
        weighted = back * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add_(0, token, weighted.to(hidden_states.dtype))

    return forward


class ExpertParallelOptimizer:
    """The dense optimizer and the experts' own stepped as one (the interface ParallelModel uses). The
    experts' one averages their gradients over the edp ranks (the all-reduce in `ShardedAdamW`, or FSDP2's
    reduce-scatter); they are divided by ep first, as each already sums the tokens of all ep ranks (in
    whichever buffer holds them: `.grad` and, under bf16 with fp32 reduction, `main_grad`)."""

    def __init__(self, dense, experts, *, expert_params: list[nn.Parameter], ep: int) -> None:
        self.optimizers = (dense, experts)
        self.expert_params, self.ep = expert_params, ep

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for p in self.expert_params:
            for g in (p.grad, getattr(p, "main_grad", None)):
                if g is not None:
                    g.div_(self.ep)
        for opt in self.optimizers:
            opt.step()

    def scale_main_grads(self, factor: float) -> None:
        """`ShardedAdamW.scale_main_grads` on each optimizer that has fp32 gradient buffers (PP under bf16)."""
        for opt in self.optimizers:
            if hasattr(opt, "scale_main_grads"):
                opt.scale_main_grads(factor)

    @property
    def state(self) -> dict:
        return {k: v for opt in self.optimizers for k, v in opt.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]


@dataclass(kw_only=True, slots=True)
class ExpertShards:
    """What expert parallelism hands to data parallelism (transforms/dp.py) and to the gradient check."""

    names: frozenset[str]
    """Unwrapped names of this rank's expert parameters (left out of the dense DP and optimizer)."""
    experts: list[nn.Module]
    """This rank's experts, over all MoE layers."""
    ep_mesh: DeviceMesh
    edp_mesh: DeviceMesh
    zero: int
    mp_policy: MixedPrecisionPolicy | None = None
    """bf16 (transforms/precision.py): FSDP2's policy under zero 2-3; under zero 0-1 the experts' `ShardedAdamW`
    casts them to bf16 and keeps their fp32 master. None: fp32."""

    def optimizer(self, dense, *, lr: float, weight_decay: float = 0.0) -> ExpertParallelOptimizer:
        """`dense` (the data-parallel optimizer of the other parameters) joined with the experts' own (under
        zero 0-1 and bf16, this casts the experts to bf16)."""
        params = [p for m in self.experts for p in m.parameters()]
        if not params:  # a pipeline stage without MoE layers
            return dense
        if self.zero >= 2:  # FSDP2 (applied in apply_ep) averages them over edp in backward
            experts = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            experts = ShardedAdamW(params, group=self.edp_mesh.get_group(), reduce_grads=True,
                                   shard=self.zero == 1, lr=lr, weight_decay=weight_decay,
                                   mp_policy=self.mp_policy)
        return ExpertParallelOptimizer(dense, experts, expert_params=params, ep=self.ep_mesh.size())

    stacked: dict[str, tuple[int, Tensor, int]] | None = None
    """Stacked expert tensors by name: (dim, this rank's expert indices, number of experts)."""

    def gather(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """`grads` (whole gradients by name, this rank's experts among them) with every rank's experts
        added: a collective over the ep ranks. Stacked expert tensors are assembled from every owner's slice."""
        stacked = self.stacked or {}
        mine = {n: (g, stacked[n][1] if n in stacked else None) for n, g in grads.items() if n in self.names}
        everyone: list[dict | None] = [None] * self.ep_mesh.size()
        dist.all_gather_object(everyone, mine, group=self.ep_mesh.get_group())
        merged = dict(grads)
        for part in everyone:
            for name, (g, index) in (part or {}).items():
                if index is None:
                    merged[name] = g
                    continue
                dim, _, size = stacked[name]
                if merged.get(name) is None or merged[name].shape[dim] != size:
                    merged[name] = g.new_zeros(size, *g.shape[1:])
                merged[name].index_copy_(dim, index, g)
        return merged


def merge_expert_shards(parts: list[ExpertShards]) -> ExpertShards | None:
    """One ExpertShards for a rank's pipeline chunks (each sharded by its own `apply_ep` over the same ranks)."""
    if not parts:
        return None
    return ExpertShards(names=frozenset().union(*(p.names for p in parts)),
                        experts=[e for p in parts for e in p.experts], ep_mesh=parts[0].ep_mesh,
                        edp_mesh=parts[0].edp_mesh, zero=parts[0].zero, mp_policy=parts[0].mp_policy,
                        stacked={k: v for p in parts for k, v in (p.stacked or {}).items()})


def apply_ep(model: nn.Module, *, mesh: DeviceMesh, graph: ModelGraph, ep: int, zero: int,
             mp_policy=None) -> ExpertShards:
    """Shard every MoE layer's experts over `ep` consecutive ranks of the data-parallel `mesh` (dp x cp);
    under zero 2-3, FSDP2-shard them over their replicas. Non-local experts are deleted (never allocated
    when the model is on meta). Call before recompute wrapping and DP (transforms/apply.py). `mp_policy`: the
    mixed-precision policy of the whole model (transforms/precision.py; FSDP2's under zero 2-3, the experts'
    `ShardedAdamW`'s under zero 0-1), or None for fp32."""
    replicas = mesh.size()
    layers = [u.moe for u in graph.units if u.moe is not None]
    _check(layers, ep, replicas, zero)
    _check_stacked_calls(model, layers)
    groups = mesh._unflatten(0, (replicas // ep, ep), ("edp", "ep"))
    ep_mesh, edp_mesh = groups["ep"], groups["edp"]
    rank = ep_mesh.get_local_rank()
    local: list[nn.Module] = []
    stacked: dict[str, tuple[int, Tensor, int]] = {}
    for info in layers:
        if find_submodule(model, info.module) is None:  # a pipeline chunk (transforms/pp.py) holds some of the blocks
            continue
        moe = model.get_submodule(info.module)
        parent, _, attr = info.experts.rpartition(".")
        per_rank = info.num_experts // ep
        owned = range(rank * per_rank, (rank + 1) * per_rank)
        if info.fused:
            module = model.get_submodule(info.experts)
            shard_stacked(module, owned)
            module.forward = stacked_expert_forward(module, num_experts=info.num_experts, owned=owned,
                                                    group=ep_mesh.get_group())
            stacked.update({f"{info.experts}.{n}": v for n, v in module.__dict__[REGROUPED].items()})
            local.append(module)
            continue
        experts = LocalExperts(model.get_submodule(info.experts), owned)
        setattr(model.get_submodule(parent), attr, experts)
        if callable(getattr(moe, "run_experts", None)):  # route -> run_experts -> combine: the router runs once
            moe.run_experts = expert_parallel_run(experts, ep_mesh.get_group())
        else:
            shared = [model.get_submodule(s) for s in info.shared]
            moe.forward = expert_parallel_forward(moe, experts, shared, ep_mesh.get_group())
        local += experts.local()
    if zero >= 2:
        for expert in local:
            fully_shard(expert, mesh=edp_mesh, reshard_after_forward=zero == 3,
                        **({"mp_policy": mp_policy} if mp_policy is not None else {}))
    owned = {id(p) for m in local for p in m.parameters()}
    names = frozenset(clean_fqn(n) for n, p in model.named_parameters() if id(p) in owned)
    return ExpertShards(names=names, experts=local, ep_mesh=ep_mesh, edp_mesh=edp_mesh, zero=zero,
                        mp_policy=mp_policy, stacked=stacked)


def _check_stacked_calls(model: nn.Module, layers: list[MoEInfo]) -> None:
    """Stacked experts are dispatched through their call: refuse any other call than STACKED_SIGNATURE."""
    for info in layers:
        module = find_submodule(model, info.experts) if info.fused else None
        if module is None:
            continue
        names = tuple(inspect.signature(module.forward).parameters)[:3]
        if names != STACKED_SIGNATURE:
            raise ValueError(f"{info.experts} ({type(module).__name__}) holds stacked expert tensors but is called "
                             f"as forward{names}; expert parallelism supports stacked experts called as "
                             f"forward{STACKED_SIGNATURE} (transformers 5) or a ModuleList of experts; use ep=1")


def check_ep(model: nn.Module, graph: ModelGraph, *, ep: int, replicas: int, zero: int) -> None:
    """Every check apply_ep makes, without touching the mesh (transforms/apply.py runs it before any collective)."""
    layers = [u.moe for u in graph.units if u.moe is not None]
    _check(layers, ep, replicas, zero)
    _check_stacked_calls(model, layers)


def _check(layers: list[MoEInfo], ep: int, replicas: int, zero: int) -> None:
    """ep divides dp x cp and every layer's expert count; there are MoE layers; zero is 0-3."""
    if replicas % ep:
        raise ValueError(f"ep ({ep}) must divide dp x cp ({replicas}); choose ep among "
                         f"{[d for d in range(1, replicas + 1) if replicas % d == 0]}")
    if not layers:
        raise ValueError(f"ep={ep} shards MoE experts, but the capture found no MoE layer (a router linear "
                         "beside a ModuleList of identical experts) in this model; use ep=1")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3 with expert parallelism, got {zero}")
    for info in layers:
        if info.num_experts % ep:
            common = math.gcd(info.num_experts, replicas)
            raise ValueError(f"{info.module}: {info.num_experts} experts do not divide over ep = {ep}; choose "
                             f"ep among {[d for d in range(1, common + 1) if common % d == 0]}")
