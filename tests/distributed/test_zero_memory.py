"""What each ZeRO stage (and TP x ZeRO) really holds per rank after one step, against the cost model's
prediction for that layout (cost_models/memory.py model_states): parameters, gradients and optimizer state
each within 5%. The stage-to-primitive mapping is in transforms/dp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spawn import spawn

WORKER = Path(__file__).with_name("zero_memory_worker.py")
LAYOUTS = [("dp=2,zero=0", 2), ("dp=2,zero=1", 2), ("dp=2,zero=2", 2), ("dp=2,zero=3", 2), ("tp=2,dp=2,zero=1", 4),
           ("tp=2,dp=2,zero=3", 4)]


@pytest.fixture(scope="module")
def reports() -> dict[int, tuple]:
    """One launch per world size measures all its layouts in turn (started when a test first needs it)."""
    launches = {}

    def get(nproc: int) -> tuple:
        if nproc not in launches:
            out = spawn([str(WORKER), *(layout for layout, n in LAYOUTS if n == nproc)], nproc)
            rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            launches[nproc] = out, {r["layout"]: r for r in rows}
        return launches[nproc]

    return get


@pytest.mark.parametrize(("layout", "nproc"), LAYOUTS)
def test_bytes_held_per_rank_match_the_cost_model(layout, nproc, reports):
    out, rows = reports(nproc)
    assert out.returncode == 0, out.stderr[-2000:]
    report = rows[layout]
    for kind in ("params", "grads", "optimizer"):
        assert report["held"][kind] == pytest.approx(report["predicted"][kind], rel=0.05), (kind, report)
