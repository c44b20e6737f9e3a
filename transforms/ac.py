"""Activation recomputation per block: none, selective (the attention core only) or full (the whole block).

Full wraps the block in non-reentrant activation checkpointing. Selective uses PyTorch's selective
activation checkpointing: every op's output is saved except the attention kernels', which the backward
recomputes (Korthikanti et al., arXiv:2205.05198, Sec. 5: the core attention holds the s x s terms).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")
_ATTENTION_OPS = {
    op for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
    if (op := getattr(torch.ops.aten, name, None)) is not None
} | {torch.ops.aten.bmm.default, torch.ops.aten._softmax.default}


def _recompute_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    packet = getattr(func, "overloadpacket", None)
    if func in _ATTENTION_OPS or (packet is not None and any(packet is getattr(o, "overloadpacket", o) for o in _ATTENTION_OPS)):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def apply_ac(model: nn.Module, *, blocks: list[str], modes: dict[str, str]) -> nn.Module:
    """Wrap each block of `blocks` (FQNs) in place by its mode (blocks missing from `modes` stay as they are)."""
    for fqn in blocks:
        mode = modes.get(fqn, "none")
        if mode not in MODES:
            raise ValueError(f"recompute mode for {fqn} must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "none":
            continue
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        block = parent.get_submodule(child)
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=True)
        else:
            # saved outputs that the block later updates in place stay valid (allow_cache_entry_mutation)
            context = partial(create_selective_checkpoint_contexts, _recompute_attention,
                              allow_cache_entry_mutation=True)
            wrapped = checkpoint_wrapper(block, preserve_rng_state=True, context_fn=context)
        parent.register_module(child, wrapped)
    return model
