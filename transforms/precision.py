"""Mixed precision as the plan says: bf16 compute, fp32 master weights, fp32 gradient reduction.

What runs (FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, as torchtitan runs it): the
sharded parameters stay fp32 and are what AdamW steps (the master weights); each block's all-gather casts them
to bf16, so its forward and backward compute in bf16; the gradients are reduce-scattered in fp32 into fp32
shards. Per parameter that is 4 / N bytes of weights, 4 / N of gradients and 8 / N of moments at rest, plus
the bf16 copy of the blocks gathered at the moment: the 16 / N bytes cost_models/memory.py counts for ZeRO-3
(2 + 2 + 12 bytes, the master copy being the sharded fp32 weights).

Scope. bf16 runs where data parallelism is FSDP2: zero 2 or 3 with dp x cp > 1, with TP, CP, EP (the experts'
own FSDP2 over their replicas takes the same policy) and PP (each chunk its own FSDP2). Plain DDP, ZeRO-1's
flat optimizer and a single data-parallel replica would need a bf16 copy of the weights next to the fp32
master slice: not done; they are refused with that reason. fp8 (torchao float8) needs a GPU: refused here.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from autoshard.cost_models.layout import Layout

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, layout: Layout) -> None:
    """Refuse a precision this layout cannot run, with the reason (before any collective)."""
    if precision == "fp8":
        raise ValueError("fp8 training (torchao float8) is not implemented; run bf16 (zero 2 or 3) or fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and (layout.zero < 2 or layout.dp * layout.cp == 1):
        raise ValueError(f"bf16 mixed precision runs under FSDP2, i.e. zero 2 or 3 with dp x cp > 1; this layout "
                         f"has zero={layout.zero}, dp x cp = {layout.dp * layout.cp}. Use zero=2 or 3, or fp32 "
                         "(bf16 for plain DDP and ZeRO-1 is not implemented)")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy | None:
    """FSDP2's policy for `precision` (None for fp32: FSDP2's default, all fp32)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None
