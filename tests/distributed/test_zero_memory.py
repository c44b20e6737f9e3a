"""What each ZeRO stage really holds per rank (dp = 2, after one step), against the stage-to-primitive
mapping in transforms/dp.py and the sharding the cost model assumes (cost_models/memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("zero_memory_worker.py")


def held(zero: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(zero)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_each_zero_stage_shards_what_the_cost_model_assumes():
    full = held(0)[0]
    assert full["optimizer"] == pytest.approx(2 * full["params"])  # Adam: two fp32 moments per parameter
    z1, z2, z3 = held(1)[0], held(2)[0], held(3)[0]
    # ZeRO-1: optimizer state split over the 2 ranks (by whole parameters, so only roughly half)
    assert (z1["params"], z1["grads"]) == (full["params"], full["grads"])
    assert z1["optimizer"] == pytest.approx(full["optimizer"] / 2, rel=0.3)
    # ZeRO-2 and 3 on FSDP2: gradients, optimizer state (and, at rest, weights) halved
    for z in (z2, z3):
        assert z["grads"] == pytest.approx(full["grads"] / 2, rel=0.05)
        assert z["optimizer"] == pytest.approx(full["optimizer"] / 2, rel=0.05)
        assert z["params"] == pytest.approx(full["params"] / 2, rel=0.05)
