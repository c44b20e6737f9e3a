"""What each ZeRO stage (and TP x ZeRO) really holds per rank after one step, against the cost model's
prediction for that layout (cost_models/memory.py model_states): parameters, gradients and optimizer state
each within 5%. The stage-to-primitive mapping is in transforms/dp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spawn import spawn

WORKER = Path(__file__).with_name("zero_memory_worker.py")


@pytest.mark.parametrize(("layout", "nproc"), [("dp=2,zero=0", 2), ("dp=2,zero=1", 2), ("dp=2,zero=2", 2),
                                               ("dp=2,zero=3", 2), ("tp=2,dp=2,zero=1", 4), ("tp=2,dp=2,zero=3", 4)])
def test_bytes_held_per_rank_match_the_cost_model(layout, nproc):
    out = spawn([str(WORKER), layout], nproc)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    for kind in ("params", "grads", "optimizer"):
        assert report["held"][kind] == pytest.approx(report["predicted"][kind], rel=0.05), (kind, report)
