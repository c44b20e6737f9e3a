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
    # A100, TP8 PP8 VPP6 (MegaScale Table 2): the Megatron-LM baseline rows are the model's worst A100 rows,
    # +17% in-sample since Megatron's overlapped backward TP collectives are priced, +21% since the refit with
    # NCCL's tree all-reduce (docs/accuracy.md)
    ("megascale_t2_megatronlm_175b_512gpu", 0.22),
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


def _stated_and_search(run_id):
    from autoshard.cost_models.layout import Training
    from autoshard.hardware_profiles import load_profile
    from autoshard.planner.search import search
    from benchmarks.accuracy import graph_for
    from benchmarks.published_layouts import stated_layout

    run = RUNS[run_id]
    entry = next(e for e in calibration.load_entries() if e["id"] == run_id)
    fixed = stated_layout(entry, run)
    profile = load_profile(run.profile, gpu_memory_gib=run.gpu_memory_gib)
    training = Training(global_batch=run.training.global_batch, seq_len=run.training.seq_len,
                        precision=run.training.precision, attention=run.training.attention,
                        framework=run.training.framework)
    return search(graph_for(run), run.layout.gpus, training, profile, fixed), fixed


@pytest.mark.parametrize("run_id", sorted(RUNS))
def test_every_published_layout_prices_and_fits(run_id):
    """A layout that trained in public is valid and fits: priced whole (unstated values filled by
    calibration_runs.py, an unstated recompute the lightest that fits) and searched from the keys the
    source states, it must come out fitting on its own GPU."""
    from autoshard.cost_models.estimate import estimate
    from autoshard.hardware_profiles import load_profile
    from benchmarks.accuracy import fitting_layout, graph_for

    run = RUNS[run_id]
    graph, profile = graph_for(run), load_profile(run.profile, gpu_memory_gib=run.gpu_memory_gib)
    run = fitting_layout(run, graph, profile)
    est = estimate(graph, run.layout, run.training, profile, recompute=run.recompute_blocks)
    assert est.fits, f"{run.layout.to_string()}: {est.peak_memory_bytes / 2**30:.1f} GiB on stage {est.peak_stage}"
    result, fixed = _stated_and_search(run_id)
    assert result.best is not None, f"stated layout {fixed} refused"
    for key, value in fixed.items():
        assert getattr(result.best.layout, key) == value


@pytest.mark.parametrize("run_id", [r for r in sorted(RUNS) if RUNS[r].peak_memory_gib])
def test_peak_memory_within_ten_percent_of_reported(run_id):
    """Every run that reports its peak memory (torchtitan's, all FSDP2) is predicted within 10%."""
    from autoshard.cost_models.estimate import estimate
    from autoshard.hardware_profiles import load_profile
    from benchmarks.accuracy import graph_for

    run = RUNS[run_id]
    est = estimate(graph_for(run), run.layout, run.training,
                   load_profile(run.profile, gpu_memory_gib=run.gpu_memory_gib))
    error = est.peak_memory_bytes / 2**30 / run.peak_memory_gib - 1
    print(f"{run_id}: predicted {est.peak_memory_bytes / 2**30:.1f} GiB, reported {run.peak_memory_gib} ({error:+.1%})")
    assert abs(error) <= 0.10
