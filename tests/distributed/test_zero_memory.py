"""What each ZeRO stage (and TP x ZeRO) really holds per rank after one step, against the cost model's
prediction for that layout (cost_models/memory.py model_states): parameters, gradients and optimizer state
each within 5%. The stage-to-primitive mapping is in transforms/dp.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("zero_memory_worker.py")


@pytest.mark.parametrize(("layout", "nproc"), [("dp=2,zero=0", 2), ("dp=2,zero=1", 2), ("dp=2,zero=2", 2),
                                               ("dp=2,zero=3", 2), ("tp=2,dp=2,zero=1", 4), ("tp=2,dp=2,zero=3", 4)])
def test_bytes_held_per_rank_match_the_cost_model(layout, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           layout]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    for kind in ("params", "grads", "optimizer"):
        assert report["held"][kind] == pytest.approx(report["predicted"][kind], rel=0.05), (kind, report)
