"""Property tests over random model shapes and GPU counts: every plan satisfies the search's constraints,
fits by its own model (or nothing fits and the error says so), and its YAML round-trips."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoshard.cost_models.layout import Training
from autoshard.hardware_profiles import load_profile
from autoshard.planner.api import NoFitError, plan
from autoshard.planner.outputs.plan import Plan

H100 = load_profile("h100_ib")


@st.composite
def models(draw) -> dict:
    heads = draw(st.sampled_from([2, 4, 8]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    hidden = heads * head_dim
    model = {"name": "random", "layers": draw(st.integers(1, 6)), "hidden": hidden,
             "ffn_hidden": draw(st.sampled_from([2 * hidden, 4 * hidden])), "heads": heads, "kv_heads": kv,
             "vocab": draw(st.sampled_from([64, 256])), "seq_len": 32}
    if draw(st.booleans()):
        experts = draw(st.sampled_from([2, 4]))
        model["moe"] = {"experts": experts, "top_k": draw(st.integers(1, experts)), "expert_ffn_hidden": hidden}
    return model


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models(), gpus=st.integers(1, 96), batch_per_gpu=st.sampled_from([1, 2, 4]))
def test_random_plans_hold_their_constraints(tmp_path_factory, model, gpus, batch_per_gpu):
    import yaml

    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    batch = gpus * batch_per_gpu
    try:
        p = plan(path, gpus=gpus, profile=H100, global_batch=batch)
    except NoFitError as exc:  # tiny models always fit on H100s: this would be a search bug
        pytest.fail(f"no plan for a tiny model: {exc}")
    lay = p.layout_obj()
    assert lay.tp * lay.pp * lay.cp * lay.dp == gpus
    assert model["heads"] % lay.tp == 0 and lay.tp <= H100.nvlink_domain_gpus
    assert lay.pp * lay.vpp <= model["layers"]
    assert lay.cp == 1 or 32 % (2 * lay.cp) == 0
    assert batch % (lay.dp * lay.mbs) == 0
    if "moe" in model:
        assert model["moe"]["experts"] % lay.ep == 0 and (lay.dp * lay.cp) % lay.ep == 0
    else:
        assert lay.ep == 1
    assert p.predicted["fits"]
    assert Plan.from_yaml(p.to_yaml()) == p
    assert Training(global_batch=batch, seq_len=32).tokens == p.training["global_batch"] * p.training["seq_len"]
