"""Capture deep models fast: trace and measure two or three blocks of each run of identical blocks, then repeat.

A run of n identical blocks (equal signature: class, parameter shapes and dtypes) costs the same per block,
so the model is captured with the run cut to a few blocks and the ModelGraph is expanded back to n blocks:
each kept block's unit is repeated under the names of the blocks it stands for (itself and those after it up
to the next kept block), with its incoming edges, and the edge between consecutive blocks is repeated.
- A model of the user's keeps each run's first, second and last block: the first sees the embedding, the
  last feeds what follows, the second stands for all between. Llama-3.1-405B is captured as 3 blocks of 126.
- A spec (autoshard's own reference transformer, whose blocks all read and write the hidden state alone)
  keeps the first and second: the second also stands for the last (reference_model.repeated_blocks).

Only regular data flow is expanded: kept blocks feed only the next kept block, and only a run's last block
feeds later units. A skip connection (block 0 read again after the last block) shows up as an edge
between non-adjacent kept blocks or from a block other than a run's last; then, or when the cut model fails
to run, this returns None and the caller captures the whole model. Tests check that the expanded graph
equals the full capture.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from torch import nn

from autoshard.planner.capture import structure
from autoshard.planner.capture.model_graph import Edge, ModelGraph, Unit

MIN_SAVED_BLOCKS = 1


def capture_repeated(module: nn.Module, capture_fn: Callable[[nn.Module], ModelGraph]) -> ModelGraph | None:
    """`capture_fn(module)` on the model with each run of identical blocks cut to three, expanded back;
    None when the model has no long run or its data flow is not regular."""
    found = structure.find_block_container(module)
    if found is None:
        return None
    container, _ = found
    blocks = module.get_submodule(container)
    if not isinstance(blocks, nn.ModuleList) or not container:
        return None
    runs = _runs([structure.signature(b) for b in blocks])
    keep = [i for start, n in runs for i in sorted({start, min(start + 1, start + n - 1), start + n - 1})]
    if len(blocks) - len(keep) < MIN_SAVED_BLOCKS:
        return None
    parent_name, _, attr = container.rpartition(".")
    parent = module.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList(blocks[i] for i in keep))
    try:
        reduced = capture_fn(module)
    except Exception:  # noqa: BLE001 - a model that needs all its layers is captured whole
        return None
    finally:
        setattr(parent, attr, blocks)
    return _expand(reduced, container, keep, runs)


def _runs(signatures: list[str]) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of equal consecutive signatures."""
    runs: list[tuple[int, int]] = []
    for i, sig in enumerate(signatures):
        if runs and signatures[runs[-1][0]] == sig:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def expand_captured(g: ModelGraph, container: str, keep: list[int], runs: list[tuple[int, int]]) -> ModelGraph | None:
    """The full ModelGraph from the capture of a model that holds only the `keep` blocks of `runs` (the
    reference transformer of a spec is built that way: planner/capture/trace.py)."""
    return _expand(g, container, keep, runs)


def _expand(g: ModelGraph, container: str, keep: list[int], runs: list[tuple[int, int]]) -> ModelGraph | None:
    """The full ModelGraph from the reduced one (see the module docstring)."""
    name = {f"{container}.{j}": f"{container}.{i}" for j, i in enumerate(keep)}
    units = {name.get(u.name, u.name): _rename(u, u.name, name.get(u.name, u.name)) for u in g.units}
    stands_for = _stands_for(container, keep, runs)
    full_units: list[Unit] = []
    for u in g.units:
        orig = name.get(u.name, u.name)
        if orig not in stands_for:
            full_units.append(units[orig])
            continue
        full_units.extend(_rename(units[orig], orig, copy) for copy in stands_for[orig])
    edges = _expand_edges([_rename_edge(e, name) for e in g.edges], container, keep, runs, stands_for)
    if edges is None:
        return None
    order = {u.name: i for i, u in enumerate(full_units)}
    expanded = dataclasses.replace(g, units=full_units, edges=edges, cut_points=_cuts(order, edges), gm=None)
    extra = [u for u in full_units if u.name not in units]
    expanded.fwd_flops += sum(u.fwd_flops for u in extra)
    expanded.bwd_flops += sum(u.bwd_flops for u in extra)
    expanded.saved_bytes += sum(u.saved_bytes for u in extra)
    expanded.warnings = [*g.warnings, f"captured {len(keep)} of {len(full_units) - len(g.units) + len(keep)} "
                                      "blocks; identical blocks repeated (planner/capture/repeat.py)"]
    return expanded


def _stands_for(container: str, keep: list[int], runs: list[tuple[int, int]]) -> dict[str, list[str]]:
    """Kept block -> the blocks it stands for: itself and the blocks after it up to the next kept block of its
    run (keeping first, second and last, the second stands for all between; keeping first and second, the
    second also stands for the last)."""
    out: dict[str, list[str]] = {}
    for start, n in runs:
        kept = [i for i in keep if start <= i < start + n]
        assert kept[:2] == list(range(start, start + min(n, 2))), "a run keeps its first and second blocks"
        for k, end in zip(kept, [*kept[1:], start + n], strict=True):
            out[f"{container}.{k}"] = [f"{container}.{j}" for j in range(k, end)]
    return out


def _expand_edges(edges: list[Edge], container: str, keep: list[int], runs: list[tuple[int, int]],
                  stands_for: dict[str, list[str]]) -> list[Edge] | None:
    """Repeat edges into the blocks a kept block stands for and between them. None if the flow is irregular."""
    position = {f"{container}.{i}": j for j, i in enumerate(keep)}
    ends_run = {f"{container}.{s + n - 1}" for s, n in runs}
    out: list[Edge] = []
    for e in edges:
        src_block, dst_block = e.src in position, e.dst in position
        if src_block and dst_block and position[e.dst] != position[e.src] + 1:
            return None  # a skip connection between blocks
        src = stands_for[e.src][-1] if src_block else e.src  # a kept block's group feeds on from its last
        if src_block and not dst_block and src not in ends_run:
            return None  # a block other than a run's last feeds a later unit
        if src_block and dst_block:  # into a group: its first block, then block to block within it
            group = stands_for[e.dst]
            out.append(dataclasses.replace(e, src=src, dst=group[0]))
            out.extend(dataclasses.replace(e, src=a, dst=b) for a, b in itertools.pairwise(group))
        elif dst_block:  # from a non-block unit into a block: into each block of its group
            out.extend(dataclasses.replace(e, dst=d) for d in stands_for[e.dst])
        else:
            out.append(dataclasses.replace(e, src=src))
    return sorted(out, key=lambda x: (x.src, x.dst))


def _cuts(order: dict[str, int], edges: list[Edge]) -> list[int]:
    """Valid cuts from aggregated edges: a producer's tensors read by several later units are one set, so
    each producer counts with its largest edge across the cut (exact for the regular flow expanded here)."""
    cuts = []
    for k in range(1, len(order)):
        crossing: dict[str, int] = {}
        for e in edges:
            if order[e.src] < k <= order[e.dst]:
                crossing[e.src] = max(crossing.get(e.src, 0), e.activations)
        if sum(crossing.values()) == 1:
            cuts.append(k)
    return cuts


def _rename(unit: Unit, old: str, new: str) -> Unit:
    """The unit with FQNs under `old` moved under `new` (its name and its attention/MLP/MoE/norm info)."""
    if old == new:
        return unit

    def move(value):
        if isinstance(value, str):
            return new + value[len(old):] if value == old or value.startswith(old + ".") else value
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    def info(obj):
        if obj is None:
            return None
        return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name)) for f in dataclasses.fields(obj)})

    return dataclasses.replace(unit, name=new, attention=info(unit.attention), mlp=info(unit.mlp),
                               moe=info(unit.moe), norms=move(unit.norms))


def _rename_edge(e: Edge, name: dict[str, str]) -> Edge:
    return dataclasses.replace(e, src=name.get(e.src, e.src), dst=name.get(e.dst, e.dst))
