"""Weights for sharded models without the full model on any rank.

A large model is built with its parameters on the meta device (`meta_parameters()`; buffers such as RoPE
tables stay real, so models that compute them in `__init__` keep them), sharded by the transforms, then
`materialize()`d: each rank allocates only its shards and fills them with `init_parameters()`.

`init_parameters` draws every parameter from its own generator, seeded by (seed, parameter name), so the
weights depend only on the seed and the names, not on the layout or the order ranks visit them: the
unsharded model initialised this way holds exactly the tensors the shards are cut from. One parameter at a
time is drawn in full and cut (peak: the largest single tensor, not the model). The distribution is the
usual LM one (GPT-2, Llama, HF `initializer_range`): N(0, 0.02) for matrices and embeddings, zero biases,
unit norm scales.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

INIT_STD = 0.02
REGROUPED = "_autoshard_regrouped"
"""Module attribute {parameter name: (dim, index, size)}: the parameter holds the slices `index` along `dim`
of the unsharded parameter, whose size along `dim` is `size`: a fused projection regrouped per TP rank
(transforms/tp.py, index a permutation) or this rank's experts of stacked expert tensors (transforms/ep.py,
a subset). The seeded init draws the unsharded value and selects; whole gradients are put back in the
unsharded order (subsets are assembled from their owners by ExpertShards.gather)."""
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "module.", "_orig_mod.")
"""Name parts added by checkpoint_wrapper, DDP and torch.compile: not part of the model's own names."""


def clean_fqn(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def find_submodule(model: nn.Module, fqn: str) -> nn.Module | None:
    """`model.get_submodule(fqn)`, or None where it is gone (a pipeline chunk holds some blocks only)."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules inside this context with their parameters on meta and their buffers on the CPU."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def full_value(name: str, shape: torch.Size, seed: int) -> Tensor:
    """The unsharded initial value of parameter `name` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(clean_fqn(name).encode()))
    if len(shape) >= 2:
        return torch.empty(shape).normal_(0.0, INIT_STD, generator=g)
    if name.endswith("bias"):
        return torch.zeros(shape)
    return torch.ones(shape)


def regrouping(model: nn.Module, name: str) -> tuple[int, Tensor, int] | None:
    """(dim, index, size) of parameter `name` if it holds selected slices of the unsharded one (REGROUPED)."""
    owner, _, leaf = name.rpartition(".")
    module = find_submodule(model, owner) if owner else model
    return getattr(module, REGROUPED, {}).get(leaf) if module is not None else None


def unsharded_shape(model: nn.Module, name: str, shape: torch.Size) -> torch.Size:
    how = regrouping(model, name)
    if how is None:
        return shape
    return torch.Size([how[2] if d == how[0] else n for d, n in enumerate(shape)])


def regrouped(model: nn.Module, name: str, full: Tensor) -> Tensor:
    """`full` (the unsharded value of parameter `name`) as the model holds it (REGROUPED)."""
    how = regrouping(model, name)
    return full if how is None else full.index_select(how[0], how[1])


def unregrouped(model: nn.Module, name: str, value: Tensor) -> Tensor:
    """The inverse of `regrouped` for a reordering: a whole tensor back in the unsharded order (subsets are
    left as they are)."""
    how = regrouping(model, name)
    if how is None or how[1].numel() != how[2]:
        return value
    return torch.empty_like(value).index_copy_(how[0], how[1], value)


def tied_aliases(tied: list[list[str]]) -> dict[str, str]:
    """Each name of a tied parameter (ModelGraph.tied) -> the name the unsharded model knows it by (its first).
    A pipeline stage may hold a tied weight under another name (the head's, on the last stage)."""
    return {name: names[0] for names in tied for name in names[1:]}


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, aliases: dict[str, str] | None = None) -> None:
    """Fill every parameter (or this rank's shard of it) with its seeded initial value (`aliases`: see
    `tied_aliases`)."""
    aliases = aliases or {}
    for name, p in model.named_parameters():
        clean = clean_fqn(name)
        shape = unsharded_shape(model, name, p.shape)
        full = regrouped(model, name, full_value(aliases.get(clean, clean), shape, seed).to(p.dtype))
        if isinstance(p, DTensor):
            shard = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
        else:
            p.copy_(full)


def materialize(model: nn.Module, device: torch.device | str, seed: int, aliases: dict[str, str] | None = None) -> None:
    """Allocate the meta parameters (their local shards) on `device`, keep the real buffers, initialise."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    ties: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                ties.setdefault(id(p), []).append((module, name))
    model.to_empty(device=device)
    for owners in ties.values():  # to_empty gives each module its own tensor: tie shared weights again
        first, name = owners[0]
        for module, other in owners[1:]:
            setattr(module, other, getattr(first, name))
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    init_parameters(model, seed, aliases)
