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
ZeRO-2 in FSDP2 keeps each block's weights gathered from its forward to its backward (no second gather),
which is ZeRO-2's communication; between steps the weights are sharded too, so it holds less than the
ZeRO paper's stage 2 (our memory model prices the paper's, an upper bound).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .init import clean_fqn

BUCKET_ELEMENTS = 25_000_000
"""Gradients are all-reduced in flat buckets of about this many elements (DDP's default is 25 MB)."""


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_grad(p: nn.Parameter) -> Tensor:
    """This rank's gradient shard, laid out like the parameter (a partial DTensor sum is reduced first)."""
    if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
    return local(p.grad)


def has_dtensors(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedAdamW:
    """AdamW over data-parallel ranks with the gradient all-reduce done here (for DTensor parameters, which
    DDP cannot wrap) and, with `shard=True`, ZeRO-1: each rank steps only its 1/dp slice of the flattened
    parameters and the updated slices are all-gathered back into every rank's parameters."""

    def __init__(self, params: list[nn.Parameter], *, group: dist.ProcessGroup | None, reduce_grads: bool,
                 shard: bool, lr: float, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.group, self.reduce_grads, self.shard = group, reduce_grads, shard
        self.size = dist.get_world_size(group)
        self.numel = sum(local(p).numel() for p in self.params)
        self.slice = math.ceil(self.numel / self.size)
        lo = dist.get_rank(group) * self.slice
        self.bounds = (min(lo, self.numel), min(lo + self.slice, self.numel))
        if shard:
            self.master = nn.Parameter(self._flat([local(p).detach() for p in self.params])[slice(*self.bounds)].clone())
            self.inner = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay)
        else:
            self.inner = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    @property
    def state(self):
        return self.inner.state

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [local_grad(p) for p in self.params]
        if self.reduce_grads:
            for bucket in _buckets(grads):
                flat = self._flat(bucket)
                dist.all_reduce(flat, group=self.group)
                for g, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat / self.size, bucket),
                                      strict=True):
                    g.copy_(reduced)
        if not self.shard:
            self.inner.step()
            return
        self.master.grad = self._flat(grads)[slice(*self.bounds)]
        self.inner.step()
        gathered = torch.empty(self.slice * self.size, dtype=self.master.dtype, device=self.master.device)
        mine = torch.zeros(self.slice, dtype=self.master.dtype, device=self.master.device)
        mine[: self.master.numel()] = self.master
        dist.all_gather_into_tensor(gathered, mine, group=self.group)
        offset = 0
        for p in self.params:
            t = local(p)
            t.copy_(gathered[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    @staticmethod
    def _flat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    out: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if size and size + t.numel() > BUCKET_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
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
    `mp_policy`: FSDP2's MixedPrecisionPolicy (zero 2-3; transforms/precision.py), or None for fp32.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    adamw = {"lr": lr, "weight_decay": weight_decay}
    if zero <= 1:
        group = mesh.get_group() if mesh is not None else None
        tensor_parallel = has_dtensors(model)
        if not tensor_parallel:
            if exclude:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, [n for n, _ in model.named_parameters() if clean_fqn(n) in exclude])
            model = DistributedDataParallel(model, process_group=group, find_unused_parameters=sparse_grads)
            if zero == 0:
                return model, torch.optim.AdamW(_kept(model, exclude), **adamw)
        return model, ShardedAdamW(_kept(model, exclude), group=group, reduce_grads=tensor_parallel,
                                   shard=zero == 1, **adamw)
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
        return ShardedAdamW(params, group=mesh.get_group(), reduce_grads=True, shard=zero == 1, **adamw)
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
