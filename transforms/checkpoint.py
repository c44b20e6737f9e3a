"""Sharded checkpoints on torch.distributed.checkpoint (DCP) that do not depend on the layout.

What is saved. Every parameter and its AdamW state under the unsharded model's names (`model.{fqn}`,
`optim.{fqn}.exp_avg`, `optim.{fqn}.exp_avg_sq`, `optim.{fqn}.step`), each rank writing only the numbers it
holds, as boxes of the unsharded tensor; the RNG state of every rank (`rng.{rank}`, and `rng_cuda.{rank}`
on a GPU); and, in a small JSON
manifest (`autoshard.json`) written by rank 0, the step, the caller's extra state (the data position), the
model fingerprint (names and unsharded shapes of all parameters), the layout, the world size, tied weights'
other names, and the size of every file. A checkpoint saved under one layout loads under any other: DCP reads
into each rank the boxes it now holds, from whichever files hold them (resharding).

Where this rank's numbers sit in the unsharded tensor (`Where`), for every way autoshard shards:
- a DTensor (TP, FSDP2, both): its local shard is the box DCP's own `compute_local_shape_and_global_offset`
  gives;
- a parameter TP regrouped (a fused q/k/v, transforms/tp.py) or EP cut to this rank's experts (stacked expert
  tensors, transforms/ep.py) holds slices `index` of the unsharded one along a dim (init.REGROUPED): each run
  of consecutive indices is one box;
- ZeRO-1's flat optimizer state (transforms/dp.py `ShardedAdamW`: this rank's 1/dp slice of the concatenated
  parameters) is, for each parameter it touches, a flat range of it: cut into at most 2 x ndim - 1 boxes, each
  a view of the flat state;
- pipeline stages and EP's expert lists keep the unsharded names (transforms/pp.py, ep.py); wrapper name parts
  (DDP, recompute) are dropped (init.clean_fqn), and a tied weight held under another name on the last stage
  is saved under the unsharded model's (`PipelineParallelModel.aliases`).
Replicated boxes (data-parallel copies) are written once: DCP keeps one of identical (name, offset) items.
DCP also checks, at save, that the boxes of every tensor tile it exactly, no gap and no overlap.

Complete or absent. Every rank writes into `.step_N.tmp`; after a barrier rank 0 lists the files with their
sizes in the manifest and renames the folder to `step_N`, then deletes the oldest beyond `keep`. A folder
named `step_N` is therefore complete. On load every rank checks the manifest, the fingerprint and every
file's size on its own, from the shared filesystem, before the first collective, so a missing, truncated or
foreign checkpoint is refused with the same message on every rank and nothing is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from autoshard.planner.errors import UserError

from .dp import ShardedAdamW
from .init import clean_fqn, regrouping

FORMAT = 1
MANIFEST = "autoshard.json"
CHECKSUM_CHUNK = 16 << 20
"""Bytes read at a time to checksum a file (zlib.crc32: about 5 GB/s on one core here)."""
PREFIX = "step_"
Offsets = tuple[int, ...]
Piece = tuple[Tensor, Offsets]
"""A view of numbers this rank holds and the offsets of its box in the unsharded tensor."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded (missing, partial, damaged, or of another model)."""


@dataclass(frozen=True, slots=True)
class Resumed:
    """What `load_checkpoint` restored besides the tensors."""

    path: Path
    step: int
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ where the numbers sit


@dataclass(frozen=True, slots=True)
class Where:
    """How a rank's local tensor maps into the unsharded tensor of shape `shape`: its box starts at `offsets`
    in the tensor as the module holds it, and `regroup` (dim, index) maps held positions along dim to
    unsharded ones (init.REGROUPED), or is None."""

    shape: torch.Size
    offsets: Offsets
    regroup: tuple[int, Tensor] | None = None


def where(root: nn.Module, name: str, p: Tensor) -> Where:
    """Where parameter `name` of `root` (as `root.named_parameters()` names it) sits in the unsharded one."""
    held = p.shape
    offsets: Offsets = (0,) * p.dim()
    if isinstance(p, DTensor):
        _, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        offsets = tuple(int(o) for o in start)
    how = regrouping(root, name)
    if how is None:
        return Where(shape=held, offsets=offsets)
    dim, index, size = how
    return Where(shape=torch.Size(size if d == dim else n for d, n in enumerate(held)), offsets=offsets,
                 regroup=(dim, index))


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[Offsets, tuple[int, ...]]]:
    """The flat (row-major) range [start, stop) of a tensor of `shape` as few boxes (offsets, sizes), each
    contiguous in the flat order: a partial first row, whole rows, a partial last row, recursively."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, last = divmod(start, inner), divmod(stop, inner)
    if first[0] == last[0]:
        return [((first[0], *o), (1, *s)) for o, s in flat_boxes(shape[1:], first[1], last[1])]
    boxes, row = [], first[0]
    if first[1]:
        boxes += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], first[1], inner)]
        row += 1
    if last[0] > row:
        boxes.append(((row, *(0,) * (len(shape) - 1)), (last[0] - row, *shape[1:])))
    if last[1]:
        boxes += [((last[0], *o), (1, *s)) for o, s in flat_boxes(shape[1:], 0, last[1])]
    return boxes


def pieces(at: Where, local: Tensor, flat: tuple[Tensor, int, int] | None = None) -> list[Piece]:
    """This rank's numbers of one tensor as boxes of the unsharded tensor. `local`: the local tensor (for its
    shape; its numbers unless `flat`); `flat` = (buffer, start, stop): the numbers are instead the flat range
    [start, stop) of the local tensor, held in the 1-D `buffer` (ZeRO-1's optimizer state)."""
    if flat is None:
        boxes = [((0,) * local.dim(), tuple(local.shape))] if local.numel() else []
        views = [local for _ in boxes]
    else:
        buffer, start, stop = flat
        boxes = flat_boxes(tuple(local.shape), start, stop)
        views = []
        for offsets, sizes in boxes:
            at_flat = sum(o * math.prod(local.shape[d + 1:]) for d, o in enumerate(offsets)) - start
            views.append(buffer[at_flat: at_flat + math.prod(sizes)].view(sizes))
    out: list[Piece] = []
    for (offsets, _), view in zip(boxes, views, strict=True):
        held = tuple(o + a for o, a in zip(offsets, at.offsets, strict=True))
        out += _unregroup(at, view, held)
    return out


def _unregroup(at: Where, view: Tensor, held: Offsets) -> list[Piece]:
    """A box in held coordinates as boxes in unsharded ones: one per run of consecutive regroup indices."""
    if at.regroup is None:
        return [(view, held)]
    dim, index = at.regroup
    targets = index[held[dim]: held[dim] + view.shape[dim]].tolist()
    out, begin = [], 0
    for i in range(1, len(targets) + 1):
        if i == len(targets) or targets[i] != targets[i - 1] + 1:
            offsets = tuple(targets[begin] if d == dim else o for d, o in enumerate(held))
            out.append((view.narrow(dim, begin, i - begin), offsets))
            begin = i
    return out


class Boxes(Tensor):
    """A tensor of the unsharded shape standing for the boxes of it this rank holds, for DCP: it implements
    DCP's checkpointable protocol (the write items and chunk list of the boxes, and the view of each) and no
    tensor operation. DCP writes the views' numbers at save and copies into them at load."""

    boxes: dict[Offsets, Tensor]

    @staticmethod
    def __new__(cls, shape: torch.Size, parts: list[Piece]) -> Boxes:
        first = parts[0][0]
        self = Tensor._make_wrapper_subclass(cls, shape, dtype=first.dtype, device=first.device)
        self.boxes = {}
        for view, offsets in parts:
            self.boxes.setdefault(offsets, view)  # the same box twice on one rank: tied copies, equal
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"Boxes only carries checkpoint pieces; {func} is not supported")

    def __create_write_items__(self, fqn: str, _obj: object) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(o), v.shape),
                                                      properties=TensorProperties.create_from_tensor(v),
                                                      size=self.shape))
                for o, v in self.boxes.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), v.shape) for o, v in self.boxes.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        return self.boxes[tuple(index.offset or ())]


# ------------------------------------------------------------------------------ what a ParallelModel holds


@dataclass(slots=True)
class Entry:
    """One parameter this rank holds: its unsharded name, the parameter, where its numbers sit."""

    fqn: str
    param: nn.Parameter
    at: Where


def entries(parallel: Any) -> list[Entry]:
    """Every parameter this rank holds, under the unsharded model's names (a pipeline rank: its chunks')."""
    roots = getattr(parallel, "chunks", None) or [parallel.module]
    aliases = getattr(parallel, "aliases", {}) or {}
    out = []
    for root in roots:
        for name, p in root.named_parameters():
            fqn = clean_fqn(name)
            out.append(Entry(fqn=aliases.get(fqn, fqn), param=p, at=where(root, name, p)))
    return out


def tied_names(parallel: Any) -> dict[str, str]:
    """Other names of tied weights -> the name saved (the unsharded model's first)."""
    if getattr(parallel, "chunks", None):
        return dict(parallel.aliases)
    first: dict[int, str] = {}
    out = {}
    for name, p in parallel.module.named_parameters(remove_duplicate=False):
        fqn = clean_fqn(name)
        if id(p) in first and first[id(p)] != fqn:
            out[fqn] = first[id(p)]
        first.setdefault(id(p), fqn)
    return out


def fingerprint_of(model: nn.Module) -> str:
    """sha256[:16] of every parameter's name and shape in the unsharded model (before any transform)."""
    shapes = sorted((clean_fqn(n), list(p.shape)) for n, p in model.named_parameters())
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t.detach()


@dataclass(slots=True)
class FlatState:
    """ZeRO-1 (`ShardedAdamW` with shard=True): AdamW state over this rank's slice of the flat parameters."""

    opt: ShardedAdamW


def optimizer_parts(optimizer: Any) -> Iterator[torch.optim.AdamW | FlatState]:
    """The AdamW optimizers (and ZeRO-1 flat states) inside a ParallelModel's optimizer."""
    if isinstance(optimizer, torch.optim.AdamW):
        yield optimizer
    elif isinstance(optimizer, ShardedAdamW):
        yield FlatState(optimizer) if optimizer.shard else optimizer.inner
    elif hasattr(optimizer, "optimizers"):  # transforms/ep.py ExpertParallelOptimizer
        for inner in optimizer.optimizers:
            yield from optimizer_parts(inner)
    else:
        raise TypeError(f"checkpoints handle AdamW (and autoshard's ZeRO-1 and expert-parallel wrappers of it), "
                        f"not {type(optimizer).__name__}")


@torch.no_grad()
def ensure_state(opt: torch.optim.AdamW) -> None:
    """AdamW's state as its first step creates it (step 0, zero moments), for parameters that have none yet:
    stepping from it gives what stepping a fresh AdamW gives, and a checkpoint always has the same keys."""
    for group in opt.param_groups:
        if group.get("amsgrad") or group.get("capturable") or group.get("fused"):
            raise ValueError("checkpoints support AdamW without amsgrad, capturable or fused")
        for p in group["params"]:
            if not opt.state.get(p):
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}


# ------------------------------------------------------------------------------ the state dict DCP sees


@dataclass(slots=True)
class StateDict:
    """The flat dict handed to DCP, and what to do after a load fills it."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    after_load: list[Callable[[], None]] = field(default_factory=list)

    def add(self, key: str, shape: torch.Size, parts: list[Piece]) -> None:
        parts = [(v, o) for v, o in parts if v.numel()]
        if not parts:
            return
        held = self.tensors.get(key)
        if isinstance(held, Boxes):
            parts = [*((v, o) for o, v in held.boxes.items()), *parts]
        self.tensors[key] = Boxes(shape, parts)


def mixed_precision_parts(optimizer: Any) -> Iterator[ShardedAdamW]:
    """The `ShardedAdamW`s holding an fp32 master of bf16 parameters (transforms/precision.py, zero 0-1)."""
    if isinstance(optimizer, ShardedAdamW):
        if optimizer.working is not None:
            yield optimizer
    elif hasattr(optimizer, "optimizers"):
        for inner in optimizer.optimizers:
            yield from mixed_precision_parts(inner)


def weight_pieces(parallel: Any, held: list[Entry]) -> tuple[dict[str, tuple[torch.Size, list[Piece]]],
                                                             list[Callable[[], None]]]:
    """Where this rank's full-precision weights are, as pieces of the unsharded tensors by name: the
    parameters themselves, or under bf16 with zero 0-1 their fp32 master (zero 0: a copy of each local
    parameter; zero 1: this rank's flat slice, cut into the parameters it covers). Also what copies the master
    into the bf16 parameters once the pieces were written (a collective under zero 1)."""
    mixed = list(mixed_precision_parts(parallel.optimizer))
    master_of = {id(p): m for o in mixed for p, m in zip(o.params, o.masters, strict=False)}
    flat_of = {id(p): o for o in mixed if o.shard for p in o.params}
    out: dict[str, tuple[torch.Size, list[Piece]]] = {}
    for e in held:
        if id(e.param) not in flat_of:
            source = master_of[id(e.param)] if id(e.param) in master_of else local(e.param)
            out.setdefault(e.fqn, (e.at.shape, []))[1].extend(pieces(e.at, source))
    by_id = {id(e.param): e for e in held}
    for o in mixed:
        if o.shard:
            for e, held_slice, start, stop in _flat_ranges(o, by_id):
                flat = (o.master.detach()[held_slice], start, stop)
                out.setdefault(e.fqn, (e.at.shape, []))[1].extend(pieces(e.at, local(e.param), flat))
    return out, [o.sync_parameters for o in mixed]


def _flat_ranges(opt: ShardedAdamW, by_id: dict[int, Entry]) -> Iterator[tuple[Entry, slice, int, int]]:
    """Each parameter the ZeRO-1 slice covers: its entry, the part of the slice that holds it, and the flat
    range [start, stop) of the local parameter that part is."""
    lo, hi = opt.bounds
    offset = 0
    for p in opt.params:
        n = local(p).numel()
        start, stop = max(lo, offset), min(hi, offset + n)
        if start < stop:
            yield by_id[id(p)], slice(start - lo, stop - lo), start - offset, stop - offset
        offset += n


def persistent_buffers(parallel: Any) -> dict[str, Tensor]:
    """The module buffers saved in its state dict (persistent ones: running statistics, counters), by their
    unsharded names; non-persistent ones (RoPE tables) are rebuilt by the model and not saved."""
    out = {}
    for root in getattr(parallel, "chunks", None) or [parallel.module]:
        for prefix, module in root.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    out[clean_fqn(f"{prefix}.{name}" if prefix else name)] = buffer
    return out


def state_dict(parallel: Any, *, loading: bool) -> StateDict:
    """Model, optimizer, persistent buffers and this rank's RNG as DCP keys of unsharded names (see the module
    docstring)."""
    out = StateDict()
    held = entries(parallel)
    by_id = {id(e.param): e for e in held}
    with torch.no_grad():
        weights, syncs = weight_pieces(parallel, held)
        for fqn, (shape, parts) in weights.items():
            out.add(f"model.{fqn}", shape, parts)
        if loading:
            out.after_load.extend(syncs)
        for o in mixed_precision_parts(parallel.optimizer):  # AdamW steps the masters: their state is the params'
            by_id.update({id(m): by_id[id(p)] for p, m in zip(o.params, o.masters, strict=False)})
        out.tensors.update({f"buffer.{fqn}": b for fqn, b in persistent_buffers(parallel).items()})
        for part in optimizer_parts(parallel.optimizer):
            if isinstance(part, FlatState):
                _add_flat_state(out, part.opt, by_id, loading=loading)
            else:
                _add_adamw_state(out, part, by_id)
    return out


def _add_adamw_state(out: StateDict, opt: torch.optim.AdamW, by_id: dict[int, Entry]) -> None:
    ensure_state(opt)
    for p, state in opt.state.items():
        e = by_id[id(p)]
        for key, value in state.items():
            if value.dim() == 0:
                out.tensors[f"optim.{e.fqn}.{key}"] = value
            else:
                out.add(f"optim.{e.fqn}.{key}", e.at.shape, pieces(e.at, local(value)))


def _add_flat_state(out: StateDict, opt: ShardedAdamW, by_id: dict[int, Entry], *, loading: bool) -> None:
    """ZeRO-1: the master slice's AdamW state cut back into the parameters it covers; after a load of an fp32
    run the master slice is copied from the loaded parameters (it is their fp32 copy; under bf16 the master
    itself was loaded, `weight_pieces`)."""
    ensure_state(opt.inner)
    state = opt.inner.state[opt.master]
    steps: list[Tensor] = []
    for e, held_slice, start, stop in _flat_ranges(opt, by_id):
        for key, value in state.items():
            if value.dim() == 0:
                scalar = torch.empty_like(value) if loading else value
                steps.append(scalar)
                out.tensors[f"optim.{e.fqn}.{key}"] = scalar
            else:
                flat = (value[held_slice], start, stop)
                out.add(f"optim.{e.fqn}.{key}", e.at.shape, pieces(e.at, local(e.param), flat))
    if loading:
        out.after_load.append(lambda: _reload_master(opt, steps))


@torch.no_grad()
def _reload_master(opt: ShardedAdamW, steps: list[Tensor]) -> None:
    if opt.working is None:
        flat = torch.cat([local(p).reshape(-1) for p in opt.params])
        opt.master.copy_(flat[slice(*opt.bounds)])
    if steps:
        opt.inner.state[opt.master]["step"].copy_(torch.stack(steps).max())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP warns that it saves or loads in one process: that is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------ save


def save_checkpoint(parallel: Any, root: str | Path, *, step: int, extra: dict | None = None,
                    keep: int | None = None) -> Path:
    """Save `parallel` (model, optimizer, RNG) as `root/step_{step}` (a collective: call on every rank);
    `extra`: JSON-serialisable state of the caller (the data position); `keep`: checkpoints kept in `root`
    (the newest), all if None. Returns the checkpoint's folder."""
    root = Path(root)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f".{PREFIX}{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{PREFIX}*.tmp"):  # left by a job killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    tensors = state_dict(parallel, loading=False).tensors
    tensors.update(_rng_states())
    with _quiet():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not dist.is_initialized())
    _barrier()  # every rank's files are on disk
    checksums = _gathered(_checksums(tmp, sorted(f.name for f in tmp.iterdir() if f.is_file()), share=True))
    if _rank() == 0:
        _write_manifest(tmp, step=step, extra=extra or {}, parallel=parallel, checksums=checksums)
        _publish(tmp, final)
        if keep is not None:
            _prune(root, keep)
    _barrier()
    return final


def _write_manifest(folder: Path, *, step: int, extra: dict, parallel: Any, checksums: dict[str, int]) -> None:
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    manifest = {"format": FORMAT, "step": step, "extra": extra, "fingerprint": parallel.fingerprint,
                "layout": parallel.layout, "world_size": _world(), "tied": tied_names(parallel), "files": files,
                "crc32": dict(sorted(checksums.items()))}
    schedule = getattr(parallel, "lr_schedule", None)
    if schedule is not None:
        manifest["lr_schedule"] = schedule.state_dict()
    path = folder / MANIFEST
    with path.open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place (replacing an older checkpoint of the same step)."""
    if final.exists():
        old = final.with_name(final.name + ".old.tmp")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in `root`, oldest first."""
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _prune(root: Path, keep: int) -> None:
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ load


def resolve(path: str | Path) -> Path:
    """The checkpoint `path` names: a checkpoint folder, or a folder of them (its newest)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    if (path / MANIFEST).exists() or path.name.startswith(PREFIX):
        return path
    found = checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint in {path}: it holds no {PREFIX}N folder (a save that did not "
                              "finish leaves only a .tmp folder, which is never loaded)")
    return found[-1]


def read_manifest(folder: Path, *, fingerprint: str = "") -> dict:
    """The manifest of a checkpoint, after checking on this rank alone that the checkpoint is complete (every
    file it lists, at its size) and, if `fingerprint` is given, of the same model."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete autoshard checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); load an older checkpoint") from exc
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: the shard file {name} is missing; load an "
                                  "older checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder} is damaged: the shard file {name} has "
                                  f"{f.stat().st_size} bytes, {size} were written (truncated or changed); load "
                                  "an older checkpoint")
    saved = manifest.get("fingerprint") or ""
    if fingerprint and saved and saved != fingerprint:
        raise CheckpointError(f"checkpoint {folder} is of another model (fingerprint {saved}, this model's is "
                              f"{fingerprint}: the parameter names or shapes differ)")
    return manifest


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _checksums(folder: Path, names: list[str], *, share: bool) -> dict[str, int]:
    """crc32 of the files `names` in `folder`: with `share`, only this rank's part of them (every world-th
    file), so the ranks read the checkpoint once between them."""
    mine = names[_rank()::_world()] if share else names
    return {name: _crc32(folder / name) for name in mine}


def _gathered(part: dict) -> dict:
    """The union of every rank's `part` (all_gather_object: a collective when a process group runs)."""
    if not dist.is_initialized():
        return part
    every: list[dict] = [{} for _ in range(_world())]
    dist.all_gather_object(every, part)
    return {k: v for d in every for k, v in d.items()}


def verify_checksums(folder: Path, manifest: dict, *, share: bool) -> None:
    """Refuse a checkpoint whose shard files no longer match the crc32 the manifest holds (a bit flipped,
    bytes overwritten: changes that keep the size). With `share` (every rank of a load calls it) each rank
    reads its part of the files and the ranks exchange the mismatches (one all_gather_object), so every rank
    raises the same error before the load's first collective. Checkpoints without checksums pass."""
    want = manifest.get("crc32", {})
    try:
        got = _checksums(folder, sorted(want), share=share)
        bad = {name: crc for name, crc in got.items() if crc != want[name]}
    except OSError as exc:
        bad = {str(exc): -1}
    bad = _gathered(bad) if share else bad
    if bad:
        name = sorted(bad)[0]
        raise CheckpointError(f"checkpoint {folder} is damaged: the shard file {name} does not match the checksum "
                              f"written with it (crc32 {bad[name] & 0xFFFFFFFF:08x}, {want.get(name, 0):08x} was "
                              f"written: changed on disk){f', and {len(bad) - 1} more files' if len(bad) > 1 else ''};"
                              " load an older checkpoint")


def _rng_states() -> dict[str, Tensor]:
    """This rank's CPU (and current CUDA device's) RNG state, under keys of its rank."""
    states = {f"rng.{_rank()}": torch.get_rng_state()}
    if torch.cuda.is_available():
        states[f"rng_cuda.{_rank()}"] = torch.cuda.get_rng_state()
    return states


def load_checkpoint(parallel: Any, path: str | Path) -> Resumed:
    """Load a checkpoint saved under any layout into `parallel` (a collective: call on every rank). RNG states
    are restored when the layout is the same (another layout draws other random streams anyway)."""
    folder = resolve(path)
    manifest = read_manifest(folder, fingerprint=parallel.fingerprint)
    verify_checksums(folder, manifest, share=True)
    reader = dcp.FileSystemReader(folder)
    state = state_dict(parallel, loading=True)
    saved = reader.read_metadata().state_dict_metadata  # buffers: only those saved (older checkpoints: none)
    state.tensors = {k: v for k, v in state.tensors.items() if not k.startswith("buffer.") or k in saved}
    rng = {}
    if manifest.get("layout") == parallel.layout and manifest.get("world_size") == _world():
        rng = {key: torch.empty_like(value) for key, value in _rng_states().items()}
        state.tensors.update(rng)
    with _quiet():
        dcp.load(state.tensors, storage_reader=reader, no_dist=not dist.is_initialized())
    for fix in state.after_load:
        fix()
    schedule = getattr(parallel, "lr_schedule", None)
    if schedule is not None and "lr_schedule" in manifest:
        schedule.load_state_dict(manifest["lr_schedule"])
    for key, value in rng.items():
        (torch.cuda.set_rng_state if key.startswith("rng_cuda.") else torch.set_rng_state)(value)
    return Resumed(path=folder, step=int(manifest["step"]), extra=manifest.get("extra", {}))


# ------------------------------------------------------------------------------ plain weights in and out


def load_weights(parallel: Any, source: str | Path | dict[str, Tensor]) -> None:
    """Copy the unsharded model's weights (a state dict, or a .safetensors file read box by box) into this
    rank's shards; the optimizer state is left as it is. Local to each rank: no collective."""
    if isinstance(source, dict):
        read = _dict_reader(source)
    else:
        read = _safetensors_reader(Path(source))
    held = entries(parallel)
    missing = [e.fqn for e in held if not read.has(e.fqn)]
    if missing:
        raise CheckpointError(f"{_describe(source)} lacks {len(missing)} of the model's weights: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for e in held:
            if read.shape(e.fqn) != tuple(e.at.shape):
                raise CheckpointError(f"{_describe(source)}: {e.fqn} has shape {list(read.shape(e.fqn))}, the "
                                      f"model's is {list(e.at.shape)}")
            for view, offsets in pieces(e.at, local(e.param)):
                view.copy_(read.box(e.fqn, offsets, tuple(view.shape)))
        if any(mixed_precision_parts(parallel.optimizer)):  # bf16: the fp32 master from the file too
            for fqn, (_, parts) in weight_pieces(parallel, held)[0].items():
                for view, offsets in parts:
                    view.copy_(read.box(fqn, offsets, tuple(view.shape)))
        for part in optimizer_parts(parallel.optimizer):
            if isinstance(part, FlatState):
                _reload_master(part.opt, [])


@dataclass(frozen=True, slots=True)
class _Reader:
    has: Callable[[str], bool]
    shape: Callable[[str], tuple[int, ...]]
    box: Callable[[str, Offsets, tuple[int, ...]], Tensor]


def _slices(offsets: Offsets, sizes: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))


def _dict_reader(weights: dict[str, Tensor]) -> _Reader:
    return _Reader(has=lambda k: k in weights, shape=lambda k: tuple(weights[k].shape),
                   box=lambda k, o, s: weights[k][_slices(o, s)])


def _safetensors_reader(path: Path) -> _Reader:
    """Reads only the boxes asked for (safetensors' get_slice on a memory map)."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise CheckpointError("reading .safetensors needs the safetensors package (pip install safetensors, "
                              "or autoshard[hf])") from exc
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    f = safe_open(str(path), framework="pt")
    names = set(f.keys())

    def box(k: str, o: Offsets, s: tuple[int, ...]) -> Tensor:
        return f.get_slice(k)[_slices(o, s)] if s else f.get_tensor(k)

    return _Reader(has=names.__contains__, shape=lambda k: tuple(f.get_slice(k).get_shape()), box=box)


def _describe(source: object) -> str:
    return "the state dict" if isinstance(source, dict) else str(source)


def export_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The unsharded model's weights in a checkpoint saved under any layout, by their names in the unsharded
    model (tied weights under each of their names), as whole CPU tensors: read in this one process."""
    folder = resolve(path)
    manifest = read_manifest(folder)
    verify_checksums(folder, manifest, share=False)
    reader = dcp.FileSystemReader(folder)
    stored = reader.read_metadata().state_dict_metadata
    weights = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in stored.items()
               if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    with _quiet():
        dcp.load(weights, storage_reader=reader, no_dist=True)
    out = {key[len("model."):]: t for key, t in weights.items()}
    for alias, name in manifest.get("tied", {}).items():
        out[alias] = out[name]
    return out


def save_safetensors(path: str | Path, out: str | Path) -> None:
    """Write a checkpoint's unsharded weights (`export_state_dict`) to a .safetensors file."""
    from safetensors.torch import save_file

    weights = export_state_dict(path)
    seen: set[int] = set()
    for name, t in weights.items():  # safetensors stores no shared tensors: tied names get their own copy
        if id(t) in seen:
            weights[name] = t.clone()
        seen.add(id(t))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata={"format": "pt"})
