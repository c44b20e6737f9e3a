"""benchmarks/gpu_step.py: skips cleanly without CUDA; its prediction and efficiency fit run on CPU."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoshard.hardware_profiles import load_profile

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
gs = importlib.import_module("benchmarks.gpu_step")
TINY = str(REPO / "examples/specs/tiny_llama.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path only runs without CUDA")
def test_skips_cleanly_without_cuda() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_step.py"), "--fit", "--torchtitan"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "gpu_step: skipped, no CUDA device (torch.cuda.is_available() is False); nothing measured."]


def test_prediction_of_block_and_model() -> None:
    loaded = gs.load(TINY, layers=2, seq_len=32)
    assert loaded.spec.layers == 2
    profile = load_profile("h100_ib")
    pred = gs.predict(loaded, profile, mbs=2, seq_len=32)
    block, model = pred["block"], pred["model"]
    assert 0 < block.compute_s < model.compute_s  # the model is two blocks plus embedding and head
    assert 0 < block.activations_bytes < model.activations_bytes
    assert model.peak_bytes > model.activations_bytes
    assert {"weights", "gradients", "optimizer"} <= set(model.breakdown)


def test_implied_efficiency_recovers_the_profile() -> None:
    """Fed its own prediction as the measurement, the fit returns the profile's efficiency; a slower
    measurement implies a lower one."""
    loaded = gs.load(TINY, layers=2, seq_len=32)
    profile = load_profile("h100_ib")
    t = gs.predict(loaded, profile, mbs=2, seq_len=32)["model"].compute_s
    assert gs.implied_gemm_efficiency(loaded, profile, 2, 32, t) == pytest.approx(profile.gemm_efficiency_max)
    assert gs.implied_gemm_efficiency(loaded, profile, 2, 32, 1.5 * t) < profile.gemm_efficiency_max
