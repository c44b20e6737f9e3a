"""Data parallelism and ZeRO on PyTorch's own primitives.

How each ZeRO stage maps (what the memory model in cost_models/memory.py assumes):

| zero | PyTorch                                                    | sharded over the data-parallel ranks     |
|------|------------------------------------------------------------|------------------------------------------|
| 0    | DistributedDataParallel                                    | nothing: gradients all-reduced           |
| 1    | DDP + torch.distributed.optim.ZeroRedundancyOptimizer      | optimizer state (Adam moments)           |
| 2    | FSDP2 fully_shard per block, reshard_after_forward=False   | optimizer state and gradients (and the   |
|      |                                                            | weights between steps)                   |
| 3    | FSDP2 fully_shard per block, reshard_after_forward=True    | optimizer state, gradients and weights   |

ZeRO-2 in FSDP2 keeps each block's weights gathered from its forward to its backward (no second gather),
which is ZeRO-2's communication; between steps the weights are sharded too, so it holds less than the
ZeRO paper's stage 2 (our memory model prices the paper's, an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def apply_dp(model: nn.Module, *, zero: int, blocks: list[str], mesh=None, lr: float = 1e-3,
             weight_decay: float = 0.0, sparse_grads: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Wrap `model` for data parallelism at ZeRO stage `zero`; returns the model and its AdamW optimizer.

    `blocks`: FQNs of the repeated blocks (FSDP2 shards each as one unit, then the root).
    `mesh`: a 1-D DeviceMesh over the data-parallel ranks (FSDP2), or None for the default group.
    `sparse_grads`: some parameters may get no gradient in a step (MoE experts no token was routed to);
    DDP must then look for them.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    adamw = {"lr": lr, "weight_decay": weight_decay}
    if zero <= 1:
        group = mesh.get_group() if mesh is not None else None
        wrapped = DistributedDataParallel(model, process_group=group, find_unused_parameters=sparse_grads)
        if zero == 0:
            return wrapped, torch.optim.AdamW(wrapped.parameters(), **adamw)
        return wrapped, ZeroRedundancyOptimizer(wrapped.parameters(), optimizer_class=torch.optim.AdamW,
                                                process_group=group, **adamw)
    kwargs = {"mesh": mesh} if mesh is not None else {}
    reshard = zero == 3
    for fqn in blocks:
        fully_shard(model.get_submodule(fqn), reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    return model, torch.optim.AdamW(model.parameters(), **adamw)

