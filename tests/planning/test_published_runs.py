"""The cost model against published measurements, with the coefficients stored in the profiles.

A regression guard on a few runs from different sources (docs/accuracy.md has all of them, with
cross-validation); each tolerance is the model's documented error band, not a fitted target.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

calibration = pytest.importorskip("benchmarks.calibration_runs")
try:
    RUNS = {r.id: r for r in calibration.load_runs()[0]}
except FileNotFoundError:  # pragma: no cover - the shared calibration data is not beside this clone
    pytest.skip("../shared/calibration/published_runs_dev.yaml not found", allow_module_level=True)


@pytest.mark.parametrize(("run_id", "tolerance"), [
    ("megatron_sc21_t1_7p5b_128gpu", 0.15),          # A100, TP4 x DP32, full recompute (SC'21 Table 1)
    ("nemo2407_llama2_13b_16gpu", 0.15),             # H100 FP8, PP4 interleaved (NeMo 24.07)
    ("megascale_t2_megatronlm_175b_512gpu", 0.15),   # A100, TP8 PP8 VPP6 (MegaScale Table 2)
])
def test_throughput_within_the_documented_band(run_id, tolerance):
    from autoshard.cost_models.estimate import estimate
    from autoshard.hardware_profiles import load_profile
    from benchmarks.accuracy import graph_for

    run = RUNS[run_id]
    est = estimate(graph_for(run), run.layout, run.training,
                   load_profile(run.profile, gpu_memory_gib=run.gpu_memory_gib))
    error = est.tokens_per_sec_per_gpu / run.tokens_per_sec_per_gpu - 1
    print(f"{run_id}: predicted {est.tokens_per_sec_per_gpu:.1f}, measured {run.tokens_per_sec_per_gpu:.1f} "
          f"tokens/s/GPU ({error:+.1%})")
    assert abs(error) < tolerance
    assert est.fits  # these runs ran: the memory model must not reject them
