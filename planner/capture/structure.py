"""Find a model's structure from its module tree and one recorded forward: units, blocks and their roles.

Nothing here looks at module names: repeated blocks are the largest ModuleList/Sequential of same-class
children, attention is wherever an attention core runs, linear pairs are ordered around that core, MoE
layers are a router beside a list of identical experts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn

from autoshard.planner.capture.model_graph import AttentionInfo, MLPInfo, MoEInfo


@dataclass(kw_only=True, slots=True)
class Event:
    """One recorded call in the forward: a module entered, or an interesting torch function."""

    kind: str
    """`module` or `fn`."""
    name: str
    """Module FQN or function name."""
    stack: tuple[str, ...]
    """FQNs of the modules running, outermost first."""
    info: dict


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def signature(module: nn.Module) -> str:
    """Class plus parameter shapes and dtypes: equal for interchangeable blocks."""
    parts = [type(module).__name__] + [f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in module.named_parameters()]
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]
    return f"{type(module).__name__}#{digest}"


def find_block_container(model: nn.Module) -> tuple[str, list[str]] | None:
    """The container of the repeated blocks: (its FQN, FQNs of its children of the repeated class).

    Among ModuleList/Sequential modules, the class of children holding the most parameters (so a model's
    layers win over a layer's experts, also when the model has a single layer).
    """
    best: tuple[int, int, str, list[str]] | None = None
    for fqn, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        by_class: dict[type, list[str]] = {}
        for name, child in mod.named_children():
            by_class.setdefault(type(child), []).append(name)
        for names in by_class.values():
            weight = sum(param_count(mod.get_submodule(n)) for n in names)
            # the most parameters wins: a model's layers over a layer's experts, even for one layer
            key = (weight, len(names))
            if best is None or key > best[:2]:
                best = (*key, fqn, [_join(fqn, n) for n in names])
    return None if best is None else (best[2], best[3])


def unit_names(model: nn.Module, container: str | None) -> list[str]:
    """Units: the container's children, plus the siblings of the container and of each of its ancestors."""
    if container is None:
        return [n for n, _ in model.named_children()] or [""]
    units: list[str] = []
    path = container.split(".") if container else []
    for depth in range(len(path), -1, -1):
        parent = ".".join(path[:depth])
        skip = path[depth] if depth < len(path) else None
        for name, _ in model.get_submodule(parent).named_children():
            if name != skip:
                units.append(_join(parent, name))
    return units


def unit_kind(model: nn.Module, fqn: str, blocks: set[str], vocab: int) -> str:
    mod = model.get_submodule(fqn)
    if fqn in blocks:
        return "block"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if "norm" in type(mod).__name__.lower():
        return "norm"
    if isinstance(mod, nn.Linear) and vocab and mod.out_features == vocab:
        return "head"
    return "other"


def token_embedding(model: nn.Module) -> nn.Embedding | None:
    """The embedding with the largest vocabulary."""
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embs, key=lambda m: m.num_embeddings, default=None)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _under(fqn: str, prefix: str) -> bool:
    return fqn == prefix or fqn.startswith(prefix + ".")


def _linears(model: nn.Module, block: str, events: list[Event]) -> list[str]:
    """Linear modules of the block in the order they ran."""
    seen: list[str] = []
    for e in events:
        if e.kind == "module" and e.name not in seen and _under(e.name, block):
            if isinstance(model.get_submodule(e.name), nn.Linear):
                seen.append(e.name)
    return seen


def attention_info(model: nn.Module, block: str, events: list[Event], linears: list[str]) -> AttentionInfo | None:
    """The attention core is the first SDPA call, or a softmax over a 4-D (b, heads, s, s) score tensor."""
    for i, e in enumerate(events):
        if e.kind != "fn":
            continue
        if e.name == "scaled_dot_product_attention":
            core, heads, kv_heads, head_dim = "sdpa", e.info["heads"], e.info["kv_heads"], e.info["head_dim"]
        elif e.name == "softmax" and e.info.get("ndim") == 4:
            core, heads = "matmul_softmax", e.info["shape"][1]
            kv_heads, head_dim = heads, _head_dim_from_linears(model, linears, heads)
        else:
            continue
        module = e.stack[-1] if e.stack else block
        before = {x.name for x in events[:i] if x.kind == "module"}
        inside = [n for n in linears if _under(n, module)]
        column = [n for n in inside if n in before]
        row = [n for n in inside if n not in before]
        kv_heads = _kv_heads_from_linears(model, column, heads, head_dim) or kv_heads
        return AttentionInfo(module=module, core=core, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             column=column, row=row)
    return None


def _kv_heads_from_linears(model: nn.Module, column: list[str], heads: int, head_dim: int) -> int | None:
    """KV heads from the projection widths: the core may see repeated kv heads (GQA done by repeat_kv).

    Separate q/k/v projections: the narrowest is one of k, v. A fused qkv projection: (heads + 2 kv) x d.
    """
    outs = [model.get_submodule(n).out_features for n in column]
    if not outs or not head_dim:
        return None
    if len(outs) == 1:
        fused = outs[0] // head_dim - heads
        return fused // 2 if fused > 0 and fused % 2 == 0 else None
    narrow = min(outs)
    return narrow // head_dim if narrow % head_dim == 0 else None


def _head_dim_from_linears(model: nn.Module, linears: list[str], heads: int) -> int:
    first = model.get_submodule(linears[0]) if linears else None
    return first.out_features // heads if isinstance(first, nn.Linear) and heads else 0


def moe_info(model: nn.Module, block: str, events: list[Event]) -> MoEInfo | None:
    """A ModuleList of >= 2 identical modules holding linears, beside a router linear with one output per expert."""
    root = model.get_submodule(block)
    for fqn, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        sigs = {signature(c) for c in mod}
        if len(sigs) != 1 or not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        experts = _join(block, fqn)
        parent = experts.rsplit(".", 1)[0]
        router, shared = None, []
        for name, child in model.get_submodule(parent).named_children():
            full = _join(parent, name)
            if full == experts:
                continue
            if isinstance(child, nn.Linear) and child.out_features == len(mod):
                router = full
            elif any(isinstance(m, nn.Linear) for m in child.modules()):
                shared.append(full)
        if router is None:
            continue
        top_k = next((e.info["k"] for e in events if e.kind == "fn" and e.name == "topk"
                      and e.stack and _under(e.stack[-1], parent)), 1)
        return MoEInfo(module=parent, router=router, experts=experts, num_experts=len(mod), top_k=top_k,
                       shared=shared, expert_params=param_count(mod[0]))
    return None


def mlp_info(model: nn.Module, linears: list[str], hidden: int) -> MLPInfo | None:
    """Dense MLP: linears reading the hidden size (column) and writing it (row), under one parent."""
    if not linears:
        return None
    column = [n for n in linears if model.get_submodule(n).in_features == hidden]
    row = [n for n in linears if n not in column and model.get_submodule(n).out_features == hidden]
    parts = [n.split(".") for n in linears]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    module = ".".join(common) if len(common) < len(parts[0]) else ".".join(parts[0][:-1])
    return MLPInfo(module=module, column=column, row=row)


def norm_modules(model: nn.Module, block: str) -> list[str]:
    return [_join(block, n) for n, m in model.get_submodule(block).named_modules()
            if n and "norm" in type(m).__name__.lower()]


def block_roles(model: nn.Module, block: str, events: list[Event], hidden: int) -> dict:
    """Attention, MLP or MoE, and norms of one block, from the block's recorded events."""
    linears = _linears(model, block, events)
    attn = attention_info(model, block, events, linears)
    moe = moe_info(model, block, events)
    taken = [attn.module] if attn else []
    if moe:
        taken.append(moe.module)
    rest = [n for n in linears if not any(_under(n, t) for t in taken)]
    return {"attention": attn, "moe": moe, "mlp": mlp_info(model, rest, hidden), "norms": norm_modules(model, block)}
