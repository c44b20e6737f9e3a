"""Mixed precision as the plan says: bf16 compute, fp32 master weights, gradients in the plan's `grad_reduce`.

Two mechanisms, one policy object (FSDP2's `MixedPrecisionPolicy(param_dtype, reduce_dtype)`):

- ZeRO 2-3 (FSDP2, as torchtitan runs it): the sharded parameters stay fp32 and are what AdamW steps (the
  master weights); each block's all-gather casts them to bf16, so its forward and backward compute in bf16;
  the gradients are reduce-scattered in `reduce_dtype` into fp32 shards. Per parameter: 4 / N bytes of
  weights, 4 / N of gradients and 8 / N of moments at rest, plus the bf16 copy of the blocks gathered at the
  moment: the 16 / N bytes cost_models/memory.py counts for ZeRO-3.
- ZeRO 0-1, a single data-parallel replica, and so PP with those (transforms/dp.py `ShardedAdamW` with a
  policy): the module's parameters themselves become bf16 (`cast_parameters`: each parameter object is
  swapped in place with its bf16 version, so a DTensor's local data is bf16 too and tied weights, TP's
  placements and every reference to the parameter stay valid). The optimizer holds the fp32 master: a copy of
  every local parameter (zero 0) or of this rank's 1/N slice of the flat parameters (zero 1, Megatron's
  distributed optimizer). After the backward the gradients are reduced over the data-parallel ranks in
  `reduce_dtype`, cast to fp32 into the master's .grad (a bucket at a time), AdamW steps the master, and the
  master is copied back into the bf16 parameters (zero 1: each rank's slice all-gathered in bf16). Bytes per
  parameter, as cost_models/memory.py counts them (2 + g + 12, or 2 + g + 12 / N with zero 1):
    weights 2 (bf16), master + moments 12 (fp32), gradient buffer g:
    - `grad_reduce="bf16"` (the torch framework's default, `framework.grad_bytes = 2`): autograd accumulates
      bf16 gradients and they are all-reduced in bf16 (g = 2);
    - `grad_reduce="fp32"`: each parameter's bf16 gradient is added, as soon as autograd has accumulated it,
      into an fp32 buffer (`param.main_grad`, Megatron's name) and dropped, so micro-batches accumulate in fp32
      and the all-reduce runs in fp32 (g = 4).
  Transients beyond those: one gradient bucket (25M elements) at the reduction and at the step.
  The gradient reduction runs after the backward, in the optimizer step (as ZeRO 0-1 under TP and PP already
  did), not overlapped with it as DDP would: DDP would reduce the bf16 gradients in place of the plan's dtype.

`grad_reduce=None` takes the framework default the cost model prices: bf16 under ZeRO 0-1 (`grad_bytes = 2`),
fp32 under FSDP2 (`estimate.FSDP_REDUCE_BYTES = 4`). Checkpoints hold the fp32 master weights under either
mechanism, so a checkpoint loads under any precision and layout (transforms/checkpoint.py).

Expert parallelism takes the same two mechanisms for the experts: FSDP2's policy on each expert over its
"edp" replicas under ZeRO 2-3; under ZeRO 0-1 the experts' own `ShardedAdamW` over "edp" (transforms/ep.py)
casts them to bf16 and keeps their fp32 master, and their 1/ep gradient division applies to whichever buffer
holds the gradients (`.grad`, or `main_grad` with `grad_reduce="fp32"`).

Not done: fp8 (torchao float8; needs a GPU) is refused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.utils._pytree import tree_map

from autoshard.cost_models.layout import Layout

PRECISIONS = ("fp32", "bf16")
GRAD_REDUCE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str, layout: Layout, grad_reduce: str | None = None) -> None:
    """Refuse a precision this layout cannot run, with the reason (before any collective)."""
    if precision == "fp8":
        raise ValueError("fp8 training (torchao float8) is not implemented; run bf16 or fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if grad_reduce is not None and grad_reduce not in GRAD_REDUCE:
        raise ValueError(f"grad_reduce must be fp32 or bf16, got {grad_reduce!r}")


def mixed_precision_policy(precision: str, *, zero: int = 3, grad_reduce: str | None = None
                           ) -> MixedPrecisionPolicy | None:
    """The policy for `precision` (None for fp32): bf16 parameters in compute, gradients reduced in
    `grad_reduce` (None: fp32 under FSDP2, zero >= 2; bf16 under zero 0-1, the cost model's defaults)."""
    if precision != "bf16":
        return None
    reduce = GRAD_REDUCE[grad_reduce or ("fp32" if zero >= 2 else "bf16")]
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)


@torch.no_grad()
def cast_parameters(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    """Make each parameter `dtype` in place, keeping the parameter object (torch.utils.swap_tensors, what
    nn.Module.to does for tensor subclasses): a DTensor's local shard is converted too, not only its
    metadata (setting `.data` on a DTensor leaves the local tensor as it was)."""
    for p in params:
        if p.dtype != dtype:
            torch.utils.swap_tensors(p, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))


def cast_forward_inputs(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Cast the floating-point tensors each module's forward receives to `dtype` (a forward pre-hook), as
    FSDP2 does for the modules it wraps (`cast_forward_inputs`): fp32 buffers passed to the blocks, such as
    RoPE tables, meet the bf16 activations in bf16."""

    def cast(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def to(t: object) -> object:
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        return tree_map(to, args), tree_map(to, kwargs)

    for module in modules:
        module.register_forward_pre_hook(cast, with_kwargs=True)
