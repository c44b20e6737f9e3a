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
