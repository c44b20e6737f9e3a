"""`plan calibrate` on CPU under torchrun (2 gloo ranks, small sizes), then a plan for 2 "GPUs" of the measured
profile, run by examples/train.py for 3 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from autoshard.hardware_profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_calibrate_plan_and_train(tmp_path):
    profile = tmp_path / "my_cluster.yaml"
    out = subprocess.run([*TORCHRUN, "-m", "autoshard.planner.cli", "calibrate", "--profile-out", str(profile),
                          "--quick", "--quiet"], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote" in out.stdout and "collective_efficiency_intra" in out.stdout
    prof = load_profile(profile)
    assert prof.name == "my_cluster" and prof.gpus_per_node == 2 and prof.family == "cpu"
    for key in ("bf16_flops_per_s", "hbm_bw_bytes_per_s", "intra_node_bw_bytes_per_s", "collective_efficiency_intra",
                "gemm_efficiency_max"):
        assert prof.sources[key].startswith("measured by plan calibrate on "), key
        assert "torch " in prof.sources[key]
    assert prof.sources["overlap_slowdown"].startswith("from base profile cpu_gloo")
    assert 1e8 < prof.bf16_flops_per_s < 1e14 and 1e7 < prof.intra_node_bw_bytes_per_s < 1e12

    # pp, cp and ep fixed to 1: examples/train.py runs tp/dp/zero/recompute layouts today
    plan_file = tmp_path / "plan.yaml"
    out = subprocess.run([sys.executable, "-m", "autoshard.planner.cli", str(ROOT / "examples/specs/tiny_llama.yaml"),
                          "--gpus", "2", "--profile", str(profile), "--global-batch", "8", "--layout", "pp=1,cp=1,ep=1",
                          "-o", str(plan_file), "--quiet"], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*TORCHRUN, str(ROOT / "examples/train.py"), "--model", str(ROOT / "examples/specs/tiny_llama.yaml"),
                          "--plan", str(plan_file), "--steps", "3", "--global-batch", "8", "--seq-len", "32"],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
