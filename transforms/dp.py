"""Data parallelism and ZeRO on PyTorch's own primitives.

How each ZeRO stage maps (what the memory model in cost_models/memory.py assumes):

| zero | PyTorch                                                  | held per rank (fp32 training, N params)        |
|------|----------------------------------------------------------|------------------------------------------------|
| 0    | DistributedDataParallel (with TP: `ShardedAdamW` all-    | weights 4N, grads 4N, Adam moments 8N          |
|      | reduces the local shards of the DTensor gradients)       |                                                |
| 1    | DDP (or the all-reduce) + `ShardedAdamW`: each rank owns | weights 4N, grads 4N, moments + fp32 master    |
|      | 1/dp of the flattened parameters, steps it, all-gathers  | copy of its slice 12N/dp                       |
| 2    | FSDP2 fully_shard per block, reshard_after_forward=False | weights 4N/dp at rest, grads 4N/dp, moments    |
|      |                                                          | 8N/dp                                          |
| 3    | FSDP2 fully_shard per block, reshard_after_forward=True  | as 2, and weights also resharded after forward |

ZeRO-1 here is Megatron's distributed optimizer (Rajbhandari et al., arXiv:1910.02054, P_os): exact 1/dp
slices of the flat parameter vector, not whole tensors (torch's ZeroRedundancyOptimizer partitions by
tensor, so one rank can hold far more than 1/dp), and it works on TP's DTensor parameters, which DDP
cannot wrap. Its fp32 master slice is what a mixed-precision run keeps anyway (the cost model's 12 bytes of
optimizer state per parameter); in fp32 training it is a copy.
bf16 (transforms/precision.py): zero 2-3 are FSDP2's mixed precision; zero 0-1 and a single replica are
`ShardedAdamW` with bf16 parameters and an fp32 master (held per rank: weights 2N, grads 2N or 4N as
grad_reduce says, master + moments 12N, or 12N/dp with zero 1).
ZeRO-2 in FSDP2 keeps each block's weights gathered from its forward to its backward (no second gather),
which is ZeRO-2's communication; between steps the weights are sharded too, so it holds less than the
ZeRO paper's stage 2 (our memory model prices the paper's, an upper bound).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .init import clean_fqn
from .precision import cast_parameters

BUCKET_ELEMENTS = 25_000_000
"""Gradients are all-reduced in flat buckets of about this many elements (DDP's default is 25 MB)."""


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_grad(p: nn.Parameter) -> Tensor:
    """This rank's gradient shard, laid out like the parameter (a partial DTensor sum is reduced first): the
    fp32 `main_grad` buffer under mixed precision with fp32 gradient reduction, else `.grad`."""
    if getattr(p, "main_grad", None) is not None and p.grad is not None:  # accumulated outside the hook
        _accumulate_main_grad(p)
    attr = "main_grad" if getattr(p, "main_grad", None) is not None else "grad"
    g = getattr(p, attr)
    if isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
        setattr(p, attr, g)
    return local(g)


def has_grad(p: nn.Parameter) -> bool:
    return p.grad is not None or getattr(p, "main_grad", None) is not None


def has_dtensors(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _accumulate_main_grad(p: nn.Parameter) -> None:
    """Post-accumulate-grad hook (fp32 gradient buffer): add the bf16 gradient into `p.main_grad` in fp32
    and drop it, so micro-batches accumulate in fp32 and only one bf16 gradient lives at a time."""
    g = p.grad
    if getattr(p, "main_grad", None) is None:
        p.main_grad = g.float()
    else:
        assert not isinstance(g, DTensor) or g.placements == p.main_grad.placements
        local(p.main_grad).add_(local(g))
    p.grad = None


class ShardedAdamW:
    """AdamW over data-parallel ranks with the gradient all-reduce done here (for DTensor parameters, which
    DDP cannot wrap, and under mixed precision) and, with `shard=True`, ZeRO-1: each rank steps only its 1/dp
    slice of the flattened parameters and the updated slices are all-gathered back into every rank's
    parameters.

    `mp_policy` (transforms/precision.py), for zero 0-1 and a single replica: the parameters are cast to its
    `param_dtype` (bf16) and the optimizer keeps their fp32 master (a copy of each local parameter, or the
    zero-1 slice); gradients are reduced in its `reduce_dtype` (fp32: accumulated into an fp32 `main_grad`
    buffer by a hook), cast to fp32 into the master's .grad a bucket at a time, the master is stepped and
    copied back (zero 1: all-gathered in bf16). `group=None` without reduction or sharding: one replica."""

    def __init__(self, params: list[nn.Parameter], *, group: dist.ProcessGroup | None, reduce_grads: bool,
                 shard: bool, lr: float, weight_decay: float, mp_policy: MixedPrecisionPolicy | None = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.group, self.reduce_grads, self.shard = group, reduce_grads, shard
        self.size = dist.get_world_size(group) if reduce_grads or shard else 1
        self.numel = sum(local(p).numel() for p in self.params)
        self.slice = math.ceil(self.numel / self.size)
        lo = (dist.get_rank(group) if shard else 0) * self.slice
        self.bounds = (min(lo, self.numel), min(lo + self.slice, self.numel))
        self.mp_policy = mp_policy
        self.working = mp_policy.param_dtype if mp_policy is not None else None
        """The dtype of the module's parameters (bf16) when the optimizer keeps an fp32 master, else None."""
        self.masters: list[nn.Parameter] = []
        """Zero 0 under mixed precision: the fp32 master of each local parameter (what AdamW steps)."""
        with torch.no_grad():
            if shard:
                self.master = nn.Parameter(self._my_slice([local(p).detach() for p in self.params]))
                self.inner = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay)
            elif self.working is not None:
                self.masters = [nn.Parameter(local(p).detach().float().clone()) for p in self.params]
                self.inner = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay)
            else:
                self.inner = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        if self.working is not None:
            cast_parameters(self.params, self.working)
        self.fp32_grads = self.working is not None and mp_policy.reduce_dtype == torch.float32
        """Gradients accumulate into an fp32 `main_grad` buffer (grad_reduce fp32 under mixed precision)."""
        if self.fp32_grads:
            for p in self.params:
                p.register_post_accumulate_grad_hook(_accumulate_main_grad)

    @property
    def state(self):
        return self.inner.state

    @property
    def param_groups(self):
        return self.inner.param_groups

    def master_of(self, p: nn.Parameter) -> Tensor | None:
        """The fp32 master of parameter `p` under mixed precision, zero 0 (None otherwise)."""
        if not self.masters:
            return None
        return self.masters[next(i for i, q in enumerate(self.params) if q is p)]

    @torch.no_grad()
    def scale_main_grads(self, factor: float) -> None:
        """Multiply the fp32 gradient buffers by `factor` (a pipeline schedule scales `.grad` only: the
        gradients it assigns itself, which `step` adds in, are scaled already)."""
        for p in self.params:
            if getattr(p, "main_grad", None) is not None:
                local(p.main_grad).mul_(factor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
            p.main_grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if self.fp32_grads and p.grad is not None:  # a schedule that set .grad itself, bypassing the hook
                _accumulate_main_grad(p)
            if not has_grad(p):
                p.grad = torch.zeros_like(p)
        grads = [local_grad(p) for p in self.params]
        if self.reduce_grads:
            for bucket in _buckets(grads):
                flat = self._flat(bucket)
                dist.all_reduce(flat, group=self.group)
                for g, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat / self.size, bucket),
                                      strict=True):
                    g.copy_(reduced)
        if self.shard:
            self.master.grad = self._my_slice(grads)
            self.inner.step()
            self.master.grad = None
            self.sync_parameters()
        elif self.working is None:
            self.inner.step()
        else:  # fp32 gradients of a bucket of masters at a time: the transient is one bucket, not 4 bytes each
            for bucket in _buckets(list(range(len(grads))), size=lambda i: grads[i].numel()):
                for i in bucket:
                    self.masters[i].grad = grads[i].float()
                self.inner.step()
                for i in bucket:
                    self.masters[i].grad = None
            self.sync_parameters()

    @torch.no_grad()
    def sync_parameters(self) -> None:
        """Copy the fp32 master into the module's parameters (zero 1: every rank's slice, all-gathered in the
        parameters' dtype); a collective under zero 1, local otherwise. A no-op in fp32 without ZeRO-1."""
        if self.shard:
            dtype = self.working or self.master.dtype
            gathered = torch.empty(self.slice * self.size, dtype=dtype, device=self.master.device)
            mine = torch.zeros(self.slice, dtype=dtype, device=self.master.device)
            mine[: self.master.numel()] = self.master
            dist.all_gather_into_tensor(gathered, mine, group=self.group)
            offset = 0
            for p in self.params:
                t = local(p)
                t.copy_(gathered[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
        else:
            for p, master in zip(self.params, self.masters, strict=False):
                local(p).copy_(master)

    def _my_slice(self, tensors: list[Tensor]) -> Tensor:
        """This rank's [lo, hi) of the tensors' concatenation, as a new fp32 tensor (the whole concatenation
        is never built)."""
        lo, hi = self.bounds
        out = torch.empty(hi - lo, dtype=torch.float32, device=tensors[0].device if tensors else None)
        offset = 0
        for t in tensors:
            start, stop = max(lo, offset), min(hi, offset + t.numel())
            if start < stop:
                out[start - lo: stop - lo] = t.reshape(-1)[start - offset: stop - offset]
            offset += t.numel()
        return out

    @staticmethod
    def _flat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])


def _buckets(items: list, size=lambda t: t.numel()) -> list[list]:
    """`items` in order, cut into lists of about BUCKET_ELEMENTS elements (`size` of each)."""
    out: list[list] = [[]]
    total = 0
    for t in items:
        if total and total + size(t) > BUCKET_ELEMENTS:
            out.append([])
            total = 0
        out[-1].append(t)
        total += size(t)
    return out


def apply_dp(model: nn.Module, *, zero: int, blocks: list[str], mesh=None, lr: float = 1e-3,
             weight_decay: float = 0.0, sparse_grads: bool = False,
             exclude: frozenset[str] = frozenset(), mp_policy=None) -> tuple[nn.Module, object]:
    """Wrap `model` for data parallelism at ZeRO stage `zero`; returns the model and its AdamW optimizer.

    `blocks`: FQNs of the repeated blocks (FSDP2 shards each as one unit, then the root).
    `mesh`: a 1-D DeviceMesh over the data-parallel ranks, or None for the default group.
    `sparse_grads`: some parameters may get no gradient in a step (MoE experts no token was routed to);
    DDP must then look for them.
    `exclude`: unwrapped names of parameters reduced and stepped elsewhere (expert parallelism's experts,
    data-parallel over their own group, transforms/ep.py): left out of DDP and of the returned optimizer;
    under FSDP2 they must already be fully_shard-ed on their own mesh.
    `mp_policy`: the MixedPrecisionPolicy (transforms/precision.py), or None for fp32: FSDP2's under zero 2-3;
    under zero 0-1 `ShardedAdamW` casts the parameters and keeps their fp32 master (no DDP: it would reduce
    the gradients in the parameters' dtype).
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    adamw = {"lr": lr, "weight_decay": weight_decay}
    if zero <= 1:
        group = mesh.get_group() if mesh is not None else None
        own_reduction = has_dtensors(model) or mp_policy is not None  # DDP reduces in the parameters' dtype
        if not own_reduction:
            if exclude:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, [n for n, _ in model.named_parameters() if clean_fqn(n) in exclude])
            model = DistributedDataParallel(model, process_group=group, find_unused_parameters=sparse_grads)
            if zero == 0:
                return model, torch.optim.AdamW(_kept(model, exclude), **adamw)
        return model, ShardedAdamW(_kept(model, exclude), group=group, reduce_grads=own_reduction,
                                   shard=zero == 1, mp_policy=mp_policy, **adamw)
    _fully_shard(model, [model.get_submodule(fqn) for fqn in blocks], mesh=mesh, reshard=zero == 3,
                 mp_policy=mp_policy)
    return model, torch.optim.AdamW(_kept(model, exclude), **adamw)


def _kept(model: nn.Module, exclude: frozenset[str]) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if clean_fqn(n) not in exclude]


def apply_dp_to_chunks(chunks: list[nn.Module], *, zero: int, blocks: list[nn.Module], mesh, lr: float = 1e-3,
                       weight_decay: float = 0.0, exclude: frozenset[str] = frozenset(), mp_policy=None) -> object:
    """Data parallelism for the pipeline chunks of one rank; returns their optimizer. The schedule runs each
    chunk's backward once per micro-batch, so zero 0 and 1 reduce the gradients once, in the optimizer step
    (`ShardedAdamW`), not in DDP's per-backward hooks; zero 2 and 3 are FSDP2 per chunk, whose last-backward
    reduce-scatter the schedule triggers. `blocks`: the repeated blocks inside the chunks; `exclude`: as in
    `apply_dp` (experts under expert parallelism, already FSDP2-sharded on their own mesh for zero 2-3)."""
    adamw = {"lr": lr, "weight_decay": weight_decay}
    if zero <= 1:
        params = [p for chunk in chunks for p in _kept(chunk, exclude)]
        return ShardedAdamW(params, group=mesh.get_group(), reduce_grads=True, shard=zero == 1, mp_policy=mp_policy,
                            **adamw)
    for chunk in chunks:
        inside = {id(m) for m in chunk.modules()}
        _fully_shard(chunk, [b for b in blocks if id(b) in inside], mesh=mesh, reshard=zero == 3, mp_policy=mp_policy)
    return torch.optim.AdamW([p for chunk in chunks for p in _kept(chunk, exclude)], **adamw)


def _fully_shard(root: nn.Module, blocks: list[nn.Module], *, mesh, reshard: bool, mp_policy=None) -> None:
    """FSDP2: each block one unit (gathered just before it runs), then the root (embeddings, norm, head)."""
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(root, reshard_after_forward=reshard, **kwargs)
