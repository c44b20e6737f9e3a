"""Find a model's structure from its module tree and one recorded forward: units, blocks and their roles.

Nothing here looks at module names: repeated blocks are the largest ModuleList/Sequential of same-class
children, attention is wherever an attention core runs, linear pairs are ordered around that core, MoE
layers are a router beside a list of identical experts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
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


def declared_parameters(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(FQN under `module`, shape, dtype) of its parameters as named_parameters() lists them, then those of
    experts a MoE layer declares but did not build: autoshard's reference MoE captured on meta builds two of
    its experts (`unbuilt_experts` more are copies of its first, reference_model.MoE). What signatures and
    parameter counts and bytes are taken over (planner/capture/trace.py)."""
    out = [(n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()]
    for name, mod in module.named_modules():
        unbuilt = getattr(mod, "unbuilt_experts", 0)
        if unbuilt:
            built = len(mod.experts)
            out += [(f"{_join(name, 'experts')}.{i}.{n}", tuple(p.shape), p.dtype)
                    for i in range(built, built + unbuilt) for n, p in mod.experts[0].named_parameters()]
    return out


def signature(module: nn.Module) -> str:
    """Class plus parameter names, shapes and dtypes (declared experts too): equal for interchangeable blocks."""
    parts = sorted(f"{n}:{shape}:{dtype}" for n, shape, dtype in declared_parameters(module))
    digest = hashlib.sha1("|".join([type(module).__name__, *parts]).encode()).hexdigest()[:8]
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


def is_linear(mod: nn.Module) -> bool:
    """nn.Linear, or Hugging Face's Conv1D (GPT-2: the same map with its weight stored [in, out])."""
    if isinstance(mod, nn.Linear):
        return True
    weight = getattr(mod, "weight", None)
    return type(mod).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def in_out(mod: nn.Module) -> tuple[int, int]:
    """(input, output) width of a linear module (is_linear)."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return int(mod.weight.shape[0]), int(mod.weight.shape[1])


def _linears(model: nn.Module, block: str, events: list[Event]) -> list[str]:
    """Linear modules of the block in the order they ran."""
    seen: list[str] = []
    for e in events:
        if e.kind == "module" and e.name not in seen and _under(e.name, block):
            if is_linear(model.get_submodule(e.name)):
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
        info = AttentionInfo(module=module, core=core, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             column=column, row=row)
        _attention_layout(model, info, events)
        return info
    return None


def _attention_layout(model: nn.Module, info: AttentionInfo, events: list[Event]) -> None:
    """How TP may split this attention: the q/k/v layout of its projections and the norms inside it; sets
    `info.replicate` to the reason when the pattern is not one autoshard knows to shard exactly."""
    h, kv, d = info.heads * info.head_dim, info.kv_heads * info.head_dim, info.head_dim
    widths = [in_out(model.get_submodule(n))[1] for n in info.column]
    if len(info.row) != 1 or in_out(model.get_submodule(info.row[0]))[0] != h:
        info.replicate = f"expected one output projection reading heads x head_dim = {h}, found {info.row}"
    elif len(widths) == 3 and widths[0] == h and widths[1:] == [kv, kv]:
        pass  # separate q, k, v projections
    elif len(widths) == 1 and widths[0] == h + 2 * kv:
        info.fused, info.replicate = _fused_qkv(info.column[0], [h, kv, kv], d, info.heads // info.kv_heads, events)
    else:
        info.replicate = f"projections {info.column} of widths {widths} are not q, k, v of {h}, {kv}, {kv} or one fused"
    if info.replicate:
        return
    taken = info.column + info.row
    for fqn, mod in model.get_submodule(info.module).named_modules():
        full = _join(info.module, fqn) if fqn else info.module
        if any(_under(full, t) for t in taken) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        size = sum(p.numel() for p in mod.parameters(recurse=False))
        is_norm = "norm" in type(mod).__name__.lower()
        if is_norm and size == d:
            info.head_norms.append(full)
        elif is_norm and size in (h, kv) and not info.fused:
            info.width_norms.append(full)
        else:
            info.replicate = f"{full} ({type(mod).__name__}, {size} parameters) is not a per-head or q/k norm"
            return


RESHAPES = ("view", "reshape", "unflatten")
"""Cuts of a linear's output that only reshape it (trace.py follows those into heads; _fused_qkv reads them)."""


def _fused_qkv(linear: str, parts: list[int], d: int, group: int, events: list[Event]) -> tuple[list[int], str]:
    """(part widths, "") for a fused projection split into [q | k | v]; ([], "") for one interleaved per head
    group ([q heads of the group, k, v] repeated, GPT-NeoX, Falcon's new decoder), which contiguous column
    sharding cuts into whole groups; ([], reason) when the recorded forward does not show which.

    A view of the flat width into its heads [heads + 2 kv, d] alone shows neither: the next cut of that view
    decides (Falcon: split([heads, 1, 1]) is [q | k | v]; a regrouping [kv, group + 2, d] is per group)."""
    cuts = [e for e in events if e.kind == "fn" and e.info.get("linear") == linear]
    if not cuts:
        return [], f"the forward never splits the output of the fused projection {linear}"
    kv, heads = parts[1] // d, sum(parts) // d
    for cut in cuts:
        if cut.name not in RESHAPES:
            return parts, ""  # split / chunk / slicing of the flat width or of its heads: [q | k | v]
        out = cut.info["out_shapes"][0] if cut.info["out_shapes"] else ()
        tail = tuple(out[len(cut.info["in_shape"]) - 1:])
        if tail in ((kv, (group + 2) * d), (kv, group + 2, d)):
            return [], ""
        if tail != (heads, d):
            return [], f"its fused projection {linear} is viewed as {tail}, neither [q | k | v] heads nor kv groups"
    return [], (f"its fused projection {linear} is only viewed as its {heads} heads of {d}; the forward does not "
                "show which of them are q, k and v")


def _kv_heads_from_linears(model: nn.Module, column: list[str], heads: int, head_dim: int) -> int | None:
    """KV heads from the projection widths: the core may see repeated kv heads (GQA done by repeat_kv).

    Separate q/k/v projections: the narrowest is one of k, v. A fused qkv projection: (heads + 2 kv) x d.
    """
    outs = [in_out(model.get_submodule(n))[1] for n in column]
    if not outs or not head_dim:
        return None
    if len(outs) == 1:
        fused = outs[0] // head_dim - heads
        return fused // 2 if fused > 0 and fused % 2 == 0 else None
    narrow = min(outs)
    return narrow // head_dim if narrow % head_dim == 0 else None


def _head_dim_from_linears(model: nn.Module, linears: list[str], heads: int) -> int:
    first = model.get_submodule(linears[0]) if linears else None
    return in_out(first)[1] // heads if first is not None and heads else 0


def moe_info(model: nn.Module, block: str, events: list[Event]) -> MoEInfo | None:
    """A ModuleList of >= 2 identical modules holding linears, or one module of stacked expert tensors
    [experts, ...] (transformers 5), beside a router with one output per expert."""
    root = model.get_submodule(block)
    for fqn, mod in root.named_modules():
        built, fused = _experts(mod)
        if not built:
            continue
        experts = _join(block, fqn)
        parent = experts.rsplit(".", 1)[0]
        count = built + getattr(model.get_submodule(parent), "unbuilt_experts", 0)  # declared_parameters
        router, shared = None, []
        for name, child in model.get_submodule(parent).named_children():
            full = _join(parent, name)
            if full == experts:
                continue
            weight = getattr(child, "weight", None)
            if router is None and isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == count:
                router = full
            elif any(True for _ in child.parameters()):
                shared.append(full)
        if router is None:
            continue
        top_k = next((e.info["k"] for e in events if e.kind == "fn" and e.name == "topk"
                      and e.stack and _under(e.stack[-1], parent)), 1)
        return MoEInfo(module=parent, router=router, experts=experts, num_experts=count, top_k=top_k,
                       shared=shared, expert_params=param_count(mod) // built, fused=fused,
                       capacity_factor=getattr(model.get_submodule(parent), "capacity_factor", None))
    return None


def _experts(mod: nn.Module) -> tuple[int, bool]:
    """(number of experts, stacked) if `mod` holds experts: a ModuleList of >= 2 identical modules with
    linears, or a module whose own parameters are all [experts, ...] stacks of matrices; else (0, False)."""
    if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
        if len({signature(c) for c in mod}) == 1 and any(is_linear(m) for m in mod[0].modules()):
            return len(mod), False
        return 0, False
    own = list(mod.parameters(recurse=False))
    if own and all(p.dim() == 3 for p in own) and len({p.shape[0] for p in own}) == 1 and own[0].shape[0] >= 2:
        return int(own[0].shape[0]), True
    return 0, False


def mlp_info(model: nn.Module, linears: list[str], hidden: int, events: list[Event]) -> MLPInfo | None:
    """Dense MLP: linears reading the hidden size (column) and writing it (row), under one parent."""
    if not linears:
        return None
    column = [n for n in linears if in_out(model.get_submodule(n))[0] == hidden]
    row = [n for n in linears if n not in column and in_out(model.get_submodule(n))[1] == hidden]
    parts = [n.split(".") for n in linears]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    module = ".".join(common) if len(common) < len(parts[0]) else ".".join(parts[0][:-1])
    info = MLPInfo(module=module, column=column, row=row)
    _mlp_layout(model, info, linears, events)
    return info


def _mlp_layout(model: nn.Module, info: MLPInfo, linears: list[str], events: list[Event]) -> None:
    """Sets `info.fused` for a fused gate/up projection, or `info.replicate` when TP cannot shard it exactly:
    every column linear must write the width the one row linear reads (gate, up), or one writes twice that
    width and the forward chunks it."""
    if len(info.row) != 1 or set(linears) != set(info.column + info.row):
        info.replicate = f"expected column linears and one row linear, found {linears}"
        return
    inner = in_out(model.get_submodule(info.row[0]))[0]
    widths = [in_out(model.get_submodule(n))[1] for n in info.column]
    split = next((e for e in events if e.kind == "fn" and e.info.get("linear") in info.column), None)
    if widths == [2 * inner] and split is not None and split.name in ("chunk", "split", "__getitem__", "split_with_sizes"):
        info.fused = [inner, inner]
    elif not widths or any(w != inner for w in widths):
        info.replicate = f"column widths {widths} do not match the {inner} inputs of {info.row[0]}"
    else:
        for fqn, mod in model.get_submodule(info.module).named_modules():
            full = _join(info.module, fqn) if fqn else info.module
            if any(True for _ in mod.parameters(recurse=False)) and full not in linears:
                info.replicate = f"{full} ({type(mod).__name__}) holds parameters beside its linears"
                return


def norm_modules(model: nn.Module, block: str) -> list[str]:
    return [_join(block, n) for n, m in model.get_submodule(block).named_modules()
            if n and "norm" in type(m).__name__.lower()]


def block_roles(model: nn.Module, block: str, events: list[Event], hidden: int) -> dict:
    """Attention, MLP or MoE, and norms of one block, from the block's recorded events. The norms are the
    residual stream's (those inside the attention are in its head_norms / width_norms, if it is sharded)."""
    linears = _linears(model, block, events)
    attn = attention_info(model, block, events, linears)
    moe = moe_info(model, block, events)
    taken = [attn.module] if attn else []
    if moe:
        taken.append(moe.module)
    rest = [n for n in linears if not any(_under(n, t) for t in taken)]
    mlp = mlp_info(model, rest, hidden, events)
    # norms inside the attention, MLP or MoE belong to them (sharded with them, or replicated with them)
    inner = [m.module for m in (attn, mlp, moe) if m is not None and m.module != block]
    return {"attention": attn, "moe": moe, "mlp": mlp,
            "norms": [n for n in norm_modules(model, block) if not any(_under(n, m) for m in inner)]}
