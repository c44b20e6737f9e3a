"""The distributed equivalence checks and `plan calibrate` on CUDA/NCCL; skipped without a GPU.

examples/train.py picks NCCL and the local GPU when CUDA is available, so the CPU/gloo equivalence tests of
tests/distributed/test_equivalence.py run unchanged here; the tolerances are fp32 on both sides (TF32 off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: tests/gpu runs only on GPUs")

ROOT = Path(__file__).resolve().parents[2]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(autouse=True)
def fp32_matmuls(monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # children compare fp32 against fp32


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("layout", ["dp=2,zero=0", "dp=2,zero=3", "tp=2"])
def test_equivalence_on_nccl(layout, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("equivalence", ROOT / "tests/distributed/test_equivalence.py")
    equivalence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(equivalence)
    equivalence.check(equivalence.TINY_LLAMA, layout, 2, tmp_path)


def test_calibrate_on_gpu(tmp_path):
    from autoshard.hardware_profiles import load_profile

    n = min(GPUS, 8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
           "autoshard.planner.cli", "calibrate", "--profile-out", str(tmp_path / "gpu.yaml"), "--quick", "--quiet",
           "--base", "h100_ib"]
    if n == 1:
        cmd = [sys.executable, "-m", "autoshard.planner.cli", *cmd[cmd.index("calibrate"):]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    prof = load_profile(tmp_path / "gpu.yaml")
    assert prof.sources["gemm_efficiency_max"].startswith("measured by plan calibrate")
    assert 0 < prof.gemm_efficiency_max <= 1
