"""transforms/checkpoint.py in one process: boxes of flat ranges and regrouped tensors, a save/load round trip
(with the RNG state), keep-N and stale temporary folders, and the refusals (missing, truncated or absent shard,
another model)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from autoshard.transforms.checkpoint import (
    MANIFEST,
    CheckpointError,
    export_state_dict,
    flat_boxes,
    load_checkpoint,
    pieces,
    save_checkpoint,
    where,
)
from autoshard.transforms.init import REGROUPED
from autoshard.transforms.lr_schedule import WarmupCosine


def test_flat_boxes_tile_the_range_exactly():
    rng = random.Random(0)
    for _ in range(200):
        shape = tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 4)))
        n = math.prod(shape)
        start = rng.randint(0, n)
        stop = rng.randint(start, n)
        hit = torch.zeros(shape, dtype=torch.int)
        for offsets, sizes in flat_boxes(shape, start, stop):
            hit[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
        want = torch.zeros(n, dtype=torch.int)
        want[start:stop] = 1
        assert torch.equal(hit.reshape(-1), want), (shape, start, stop)


def test_pieces_of_a_flat_slice_of_a_regrouped_parameter_land_in_the_unsharded_tensor():
    """A fused projection held regrouped (rows in `index` order, as TP regroups q/k/v), of which a ZeRO-1 rank
    holds a flat range of the optimizer state: each box is a view of the flat buffer at its unsharded place."""
    full = torch.arange(6 * 4, dtype=torch.float).view(6, 4)
    index = torch.tensor([0, 1, 4, 2, 3, 5])
    module = nn.Linear(4, 6, bias=False)
    module.weight.data = full[index].clone()
    module.__dict__[REGROUPED] = {"weight": (0, index, 6)}
    at = where(module, "weight", module.weight)
    assert at.shape == (6, 4)
    flat = module.weight.detach().reshape(-1)
    rebuilt = torch.full_like(full, -1)
    for start, stop in [(0, 7), (7, 13), (13, 24)]:
        for view, offsets in pieces(at, module.weight.detach(), (flat[start:stop], start, stop)):
            rebuilt[tuple(slice(o, o + s) for o, s in zip(offsets, view.shape, strict=True))] = view
    assert torch.equal(rebuilt, full)


@dataclass
class Tiny:
    """The part of a ParallelModel checkpoints use, around one Linear and its AdamW."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    fingerprint: str = "tiny"
    layout: str = "dp=1"


def tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    module = nn.Linear(3, 2)
    return Tiny(module, torch.optim.AdamW(module.parameters(), lr=0.1))


def train(model: Tiny, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        model.optimizer.zero_grad()
        loss = model.module(torch.full((1, 3), float(i))).square().sum()
        loss.backward()
        model.optimizer.step()
        losses.append(loss.item())
    return losses


def test_round_trip_keep_and_stale_temporary_folders(tmp_path):
    a = tiny(0)
    train(a, 2)
    (tmp_path / ".step_00000009.tmp").mkdir(parents=True)  # a save killed half-way
    for step in (2, 3, 4):
        save_checkpoint(a, tmp_path, step=step, extra={"data_position": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    draw = torch.rand(3)
    want = train(a, 3)
    b = tiny(1)  # other weights, no optimizer state yet, another RNG state
    resumed = load_checkpoint(b, tmp_path)
    assert (resumed.step, resumed.extra) == (4, {"data_position": 4})
    assert torch.equal(torch.rand(3), draw)  # same layout: the RNG state is restored
    assert train(b, 3) == want
    weights = export_state_dict(tmp_path / "step_00000003")
    assert weights.keys() == {"weight", "bias"}


def test_damaged_missing_and_foreign_checkpoints_are_refused_before_loading(tmp_path):
    a = tiny(0)
    train(a, 1)
    folder = save_checkpoint(a, tmp_path, step=1)
    b = tiny(1)
    before = b.module.weight.detach().clone()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(b, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no step_N folder"):
        load_checkpoint(b, _empty(tmp_path))
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(Tiny(b.module, b.optimizer, fingerprint="other"), folder)
    shard = folder / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="__0_0.distcp has .* bytes"):
        load_checkpoint(b, folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        load_checkpoint(b, folder)
    (folder / MANIFEST).write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(b, folder)
    assert torch.equal(b.module.weight, before)


def _empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_a_same_size_change_of_a_shard_is_refused_by_its_checksum(tmp_path):
    a = tiny(0)
    train(a, 1)
    folder = save_checkpoint(a, tmp_path, step=1)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["crc32"]) == set(manifest["files"]) and "__0_0.distcp" in manifest["crc32"]
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    shard.write_bytes(bytes(data))
    b = tiny(1)
    before = b.module.weight.detach().clone()
    with pytest.raises(CheckpointError, match="__0_0.distcp does not match the checksum"):
        load_checkpoint(b, folder)
    with pytest.raises(CheckpointError, match="__0_0.distcp does not match the checksum"):
        export_state_dict(folder)
    assert torch.equal(b.module.weight, before)


@dataclass
class WithState(Tiny):
    lr_schedule: WarmupCosine | None = None


def test_persistent_buffers_and_the_lr_schedule_are_saved_and_restored(tmp_path):
    """BatchNorm's running statistics (persistent buffers) and the schedule's position come back; a
    non-persistent buffer is not saved."""

    def model(seed: int) -> WithState:
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        module.register_buffer("table", torch.full((2,), float(seed)), persistent=False)
        return WithState(module, torch.optim.AdamW(module.parameters(), lr=0.1),
                         lr_schedule=WarmupCosine(peak=0.1, warmup=2, total=6))

    def steps(m: WithState, n: int) -> list[float]:
        out = []
        for i in range(n):
            m.optimizer.zero_grad()
            loss = m.module(torch.arange(6.0).view(2, 3) * (i + 1)).square().sum()
            loss.backward()
            m.lr_schedule.apply(m.optimizer)
            m.optimizer.step()
            out.append(loss.item())
        return out

    a = model(0)
    steps(a, 3)
    folder = save_checkpoint(a, tmp_path, step=3)
    assert json.loads((folder / MANIFEST).read_text())["lr_schedule"]["steps"] == 3
    want = steps(a, 3)
    b = model(1)
    assert not torch.equal(b.module[1].running_mean, a.module[1].running_mean)
    load_checkpoint(b, folder)
    assert b.lr_schedule.steps == 3 and b.module.table.tolist() == [1.0, 1.0]
    assert steps(b, 3) == want
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(b.module[1], name), getattr(a.module[1], name)), name


def test_warmup_cosine_schedule():
    s = WarmupCosine(peak=1.0, warmup=4, total=14, floor=0.1)
    assert [s.lr(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr(9) == pytest.approx(0.55) and s.lr(14) == pytest.approx(0.1) and s.lr(99) == pytest.approx(0.1)
