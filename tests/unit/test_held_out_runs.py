"""benchmarks/held_out_runs.yaml (Llama 3 405B, never fitted) through calibration_runs.py's rules for what a
source leaves unstated: the framework of an unseen source family, the interleaving degree."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
cr = importlib.import_module("benchmarks.calibration_runs")
HELD_OUT = REPO / "benchmarks" / "held_out_runs.yaml"
ENTRY = cr.load_entries(HELD_OUT)[1]  # 405B, 8K tokens, 16,384 GPUs: tp 8, pp 16, vpp not stated


def _run(**changes) -> cr.CalibrationRun:
    entry = copy.deepcopy(ENTRY)
    for path, value in changes.items():
        *outer, key = path.split("__")
        node = entry
        for k in outer:
            node = node[k]
        node[key] = value
    return cr.build_run(entry)


def test_an_unseen_source_family_runs_the_framework_it_names_else_megatron_core():
    run = _run()
    assert run.training.framework == "megatron"
    assert any(a.startswith("framework=megatron: the source does not name") for a in run.assumptions)
    assert _run(source__title="pytorch/torchtitan benchmarks").training.framework == "torchtitan"
    assert _run(notes="trained with DeepSpeed ZeRO").training.framework == "deepspeed"


def test_an_unstated_interleaving_degree_is_priced_at_the_fastest_that_fits():
    from autoshard.cost_models.estimate import estimate
    from autoshard.hardware_profiles import load_profile
    from autoshard.planner.search.layouts import framework_choices
    from benchmarks.accuracy import fitting_layout, graph_for

    run = _run()
    assert run.layout.vpp == 1 and any(a.startswith(cr.VPP_UNSTATED) for a in run.assumptions)
    named = _run(parallel__pp_schedule="1F1B")  # a named non-interleaved schedule states one chunk
    assert not any(a.startswith(cr.VPP_UNSTATED) for a in named.assumptions)

    graph, profile = graph_for(run), load_profile(run.profile)
    priced = fitting_layout(run, graph, profile)
    chosen = estimate(graph, priced.layout, priced.training, profile, recompute=priced.recompute_blocks)
    assert chosen.fits and priced.layout.vpp > 1 and priced.layout.schedule == "interleaved_1f1b"
    for vpp in framework_choices(graph, run.training, run.layout.pp)[1]:
        other = fitting_layout(dataclasses.replace(run, layout=dataclasses.replace(
            run.layout, vpp=vpp, schedule="interleaved_1f1b" if vpp > 1 else "1f1b"),
            assumptions=tuple(a for a in run.assumptions if not a.startswith(cr.VPP_UNSTATED))), graph, profile)
        est = estimate(graph, other.layout, other.training, profile, recompute=other.recompute_blocks)
        assert not est.fits or est.step_time_s >= chosen.step_time_s


def test_numbers_written_as_text_and_recompute_in_words_are_read():
    run = _run(parallel__tp="8", parallel__zero_stage="ZeRO-1", model__hidden=16384.0, hardware__num_gpus="16,384",
               training__recompute="selective (attention only)")
    assert (run.layout.tp, run.layout.zero, run.layout.dp, run.layout.recompute) == (8, 1, 128, "selective")
    assert _run(training__recompute=True).layout.recompute == "full"
    assert _run(hardware__gpu="A100 40GB").gpu_memory_gib == 40.0


def test_an_unreadable_entry_is_skipped_with_its_reason_and_the_rest_still_load(tmp_path):
    import yaml

    bad = copy.deepcopy(ENTRY)
    bad["id"], bad["parallel"]["cp"] = "bad", "sixteen"
    path = tmp_path / "runs.yaml"
    path.write_text(yaml.safe_dump({"runs": [ENTRY, bad]}))
    runs, skipped = cr.load_runs(path)
    assert [r.id for r in runs] == [ENTRY["id"]]
    assert skipped[0][0] == "bad" and "sixteen" in skipped[0][1]


def test_an_interleaved_schedule_without_a_degree_is_torchtitans_two_chunks_or_else_unstated():
    megatron = _run(parallel__pp_schedule="interleaved 1F1B")
    assert megatron.layout.vpp == 1 and any(a.startswith(cr.VPP_UNSTATED) for a in megatron.assumptions)
    titan = _run(parallel__pp_schedule="Interleaved 1F1B", source__title="pytorch/torchtitan benchmarks")
    assert (titan.layout.vpp, titan.layout.schedule) == (2, "interleaved_1f1b")
