"""Plan: YAML round trip and determinism, schema checks, sharding from structure, diff, explain, summary."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml

from autoshard.cost_models.estimate import estimate
from autoshard.cost_models.layout import Layout, Training
from autoshard.hardware_profiles import load_profile
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.capture.trace import capture
from autoshard.planner.outputs.plan import (
    SCHEMA_VERSION,
    Plan,
    build_plan,
    compact_units,
    diff,
    fingerprint,
    load_plan,
    sharding_for,
)

SPECS = Path(__file__).resolve().parents[3] / "examples" / "specs"
TRAINING = Training(global_batch=8, seq_len=32)
BEST = Layout(tp=2, pp=2, dp=2, recompute="selective")
ALTERNATIVES = (Layout(tp=1, pp=2, dp=4), Layout(tp=4, pp=1, dp=2, zero=3), Layout(tp=2, pp=1, dp=4))


@cache
def graph(name: str) -> ModelGraph:
    return capture(str(SPECS / f"{name}.yaml"), 1, 32)


def make_plan(layout: Layout = BEST, model: str = "tiny_llama") -> Plan:
    profile = load_profile("h100_ib")
    g = graph(model)
    alts = [estimate(g, a, TRAINING, profile) for a in ALTERNATIVES if a != layout]
    return build_plan(g, estimate(g, layout, TRAINING, profile), profile, alternatives=alts,
                      solver="test", solve_time_s=0.123456789)


def test_yaml_round_trip_is_exact() -> None:
    plan = make_plan()
    assert Plan.from_yaml(plan.to_yaml()) == plan


def test_yaml_is_byte_identical_across_builds() -> None:
    first, second = make_plan().to_yaml(), make_plan().to_yaml()
    assert first == second
    keys = list(yaml.safe_load(first))
    assert keys[:6] == ["schema_version", "model", "gpus", "profile", "training", "layout"]
    assert keys[-1] == "provenance"


def test_save_and_load(tmp_path) -> None:
    plan = make_plan()
    plan.save(tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan


def test_bad_schema_version_is_named() -> None:
    data = yaml.safe_load(make_plan().to_yaml())
    data["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version 99"):
        Plan.from_yaml(yaml.safe_dump(data))
    del data["schema_version"]
    with pytest.raises(ValueError, match="schema_version None"):
        Plan.from_yaml(yaml.safe_dump(data))


def test_missing_key_is_named() -> None:
    data = yaml.safe_load(make_plan().to_yaml())
    del data["sharding"]
    with pytest.raises(ValueError, match="sharding"):
        Plan.from_yaml(yaml.safe_dump(data))


def test_inconsistent_gpus_rejected() -> None:
    data = yaml.safe_load(make_plan().to_yaml())
    data["gpus"] = 16
    with pytest.raises(ValueError, match=r"tp\(2\) x pp\(2\) x cp\(1\) x dp\(2\) = 8 != gpus\(16\)"):
        Plan.from_yaml(yaml.safe_dump(data))


def test_layout_obj_rebuilds_the_layout() -> None:
    assert make_plan().layout_obj() == BEST
    assert make_plan(Layout(tp=1, pp=2, dp=4)).layout_obj() == Layout(tp=1, pp=2, dp=4)


def test_stages_and_json() -> None:
    plan = make_plan()
    assert [s.units for s in plan.stages] == [["tok_embeddings", "layers.0", "layers.1"],
                                              ["layers.2", "layers.3", "norm", "output"]]
    out = plan.to_json()
    assert {"layout", "predicted", "solve_time_s", "stages", "alternatives"} <= set(out)
    assert out["layout"]["micro_batch"] == 1 and out["predicted"]["fits"] is True
    assert out["stages"][0]["units"] == "tok_embeddings + layers.0-1 (2 blocks)"


def test_compact_units_interleaved() -> None:
    units = ["tok_embeddings", "layers.0", "layers.1", "layers.4", "layers.5"]
    assert compact_units(units) == "tok_embeddings + layers.0-1 + layers.4-5 (4 blocks)"


def test_sharding_dense_tp2() -> None:
    sharding = sharding_for(graph("tiny_llama"), Layout(tp=2, dp=4))
    for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
        s = sharding[f"layers.*.{name}"]
        assert (s.style, s.axis, s.weight_dim) == ("colwise", "tp", 0)
    for name in ("attention.wo", "feed_forward.w2"):
        s = sharding[f"layers.*.{name}"]
        assert (s.style, s.axis, s.weight_dim) == ("rowwise", "tp", 1)
    assert sharding["tok_embeddings"].style == sharding["output"].style == "vocab"
    for norm in ("layers.*.attention_norm", "layers.*.ffn_norm", "norm"):
        assert sharding[norm].style == "sequence_parallel"
    assert list(sharding) == sorted(sharding)


def test_sharding_tp1_is_all_replicate() -> None:
    sharding = sharding_for(graph("tiny_llama"), Layout(dp=8))
    assert "layers.*.attention.wq" in sharding
    assert {s.style for s in sharding.values()} == {"replicate"}


def test_sharding_moe_ep2() -> None:
    sharding = sharding_for(graph("tiny_moe"), Layout(tp=2, dp=4, ep=2))
    experts = sharding["layers.*.moe.experts"]
    assert (experts.style, experts.axis, experts.weight_dim) == ("expert", "ep", None)
    assert sharding["layers.*.moe.router"].style == "replicate"
    assert sharding["layers.*.feed_forward.w1"].style == "colwise"  # the dense first layer


def test_sharding_learned_positions_replicate() -> None:
    sharding = sharding_for(graph("tiny_gpt"), Layout(tp=2, dp=4))
    assert sharding["tok_embeddings"].style == "vocab"
    assert sharding["pos_embeddings"].style == "replicate"


def test_diff() -> None:
    a, b = make_plan(), make_plan(Layout(tp=1, pp=2, dp=4))
    assert diff(a, make_plan()) == "identical"
    text = diff(a, b)
    assert "layout.tp: 2 -> 1" in text
    assert "predicted.step_time_s" in text and "%" in text


def test_explain_mentions_every_degree_above_one() -> None:
    plan = make_plan()
    text = plan.explain()
    for key in ("tp", "pp", "dp"):
        assert f"{key}={plan.layout[key]}" in text
    assert "bubble" in text
    moe = make_plan(Layout(tp=2, dp=4, ep=2, zero=3), "tiny_moe").explain()
    assert "ep=2" in moe and "zero=3" in moe


def test_summary() -> None:
    plan = make_plan()
    text = plan.summary()
    assert BEST.to_string() in text
    assert "GiB per GPU" in text and "memory" in text
    assert "stage 1: layers.2-3 + norm + output (2 blocks)" in text
    assert "why not" in text


def test_fingerprint() -> None:
    llama = fingerprint(graph("tiny_llama"))
    assert llama == fingerprint(capture(str(SPECS / "tiny_llama.yaml"), 1, 32))
    assert len(llama) == 16 and llama != fingerprint(graph("tiny_moe"))


def test_schema_version_constant() -> None:
    assert make_plan().schema_version == SCHEMA_VERSION == 1
