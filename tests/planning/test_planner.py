"""Whole plans from 7 to 16,384 GPUs: constraints hold, plans fit, YAML round-trips, the search covers the
published layouts, long sequences pick CP, and a model that fits nowhere says by how much."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autoshard.cost_models.estimate import estimate
from autoshard.cost_models.layout import Layout, Training
from autoshard.hardware_profiles import load_profile
from autoshard.planner.api import NoFitError, plan
from autoshard.planner.capture.trace import capture
from autoshard.planner.outputs.plan import Plan
from autoshard.planner.search.layouts import search

SPECS = Path(__file__).resolve().parents[2] / "examples" / "specs"
H100 = load_profile("h100_ib")


@pytest.fixture(scope="module")
def llama8b():
    return capture(SPECS / "llama3_8b.yaml", 1, 8192)


@pytest.fixture(scope="module")
def llama405b():
    return capture(SPECS / "llama3_405b.yaml", 1, 8192)


def check_plan(graph, result, gpus: int, training: Training) -> None:
    """Every constraint of the search space holds for the chosen layout and it fits by its own model."""
    best = result.best
    assert best is not None
    lay = best.layout
    assert lay.tp * lay.pp * lay.cp * lay.dp == gpus
    attn = graph.blocks[0].attention
    assert lay.tp <= H100.nvlink_domain_gpus and attn.heads % lay.tp == 0
    assert lay.pp * lay.vpp <= len(graph.blocks)
    assert lay.cp == 1 or training.seq_len % (2 * lay.cp) == 0
    assert training.global_batch % (lay.dp * lay.mbs) == 0
    assert (lay.dp * lay.cp) % lay.ep == 0
    assert best.estimate.fits


@pytest.mark.parametrize(("gpus", "batch"), [(8, 64), (64, 256), (96, 192), (7, 14), (2520, 5040)])
def test_llama8b_plans(llama8b, gpus, batch):
    training = Training(global_batch=batch, seq_len=8192)
    result = search(llama8b, gpus, training, H100)
    check_plan(llama8b, result, gpus, training)


def test_llama405b_on_16384_gpus_covers_the_published_layout(llama405b):
    """Llama 3 (arXiv:2407.21783, Table 4): 16,384 H100s, TP 8, CP 1, PP 16, DP 128, 16M-token batches."""
    training = Training(global_batch=2048, seq_len=8192)
    result = search(llama405b, 16384, training, H100)
    check_plan(llama405b, result, 16384, training)
    for recompute in ("none", "selective", "full"):
        published = estimate(llama405b, Layout(tp=8, pp=16, dp=128, recompute=recompute), training, H100)
        if published.fits:
            assert result.best.estimate.step_time_s <= published.step_time_s * (1 + 1e-9)


def test_nothing_fits_says_by_how_much():
    with pytest.raises(NoFitError) as info:
        plan(SPECS / "llama3_405b.yaml", gpus=8, profile="h100_ib", global_batch=16)
    message = str(info.value)
    assert info.value.exit_code == 3
    assert "GiB over" in message and "fits on" in message


def test_long_sequences_choose_context_parallelism():
    """Llama-3 8B at 128K tokens on 64 GPUs under Megatron-Core (TE's overlapped ring): activations need the
    sequence split. autoshard's ring CP (its default, transforms/cp.py) is priced as such a ring and chosen
    too; its all-gather CP (cp_attention=allgather: a masked kernel that skips no causal work) doubles the
    attention that dominates at 128K, and the planner prices exactly that: it splits heads instead."""
    graph = capture(SPECS / "llama3_8b.yaml", 1, 131072)
    training = Training(global_batch=64, seq_len=131072, framework="megatron")
    result = search(graph, 64, training, H100)
    check_plan(graph, result, 64, training)
    assert result.best.layout.cp > 1
    ring = search(graph, 64, Training(global_batch=64, seq_len=131072), H100)
    assert ring.best.layout.cp > 1
    allgather = search(graph, 64, Training(global_batch=64, seq_len=131072, cp_attention="allgather"), H100)
    assert allgather.best.layout.cp < result.best.layout.cp


def test_moe_plan_uses_expert_parallelism():
    graph = capture(SPECS / "mixtral_8x7b.yaml", 1, 4096)
    training = Training(global_batch=512, seq_len=4096)
    result = search(graph, 64, training, H100)
    check_plan(graph, result, 64, training)
    moe = next(b.moe for b in graph.blocks if b.moe)
    assert moe.num_experts % result.best.layout.ep == 0


def test_fixed_keys_are_kept(llama8b):
    training = Training(global_batch=256, seq_len=8192)
    result = search(llama8b, 64, training, H100, fixed={"tp": 4, "recompute": "full"})
    assert result.best.layout.tp == 4 and result.best.layout.recompute == "full"


def test_plan_yaml_is_deterministic_and_round_trips(tmp_path):
    kwargs = dict(gpus=64, profile="h100_ib", global_batch=256)
    a = plan(SPECS / "llama3_8b.yaml", **kwargs)
    b = plan(SPECS / "llama3_8b.yaml", **kwargs)
    assert a.to_yaml() == b.to_yaml()
    assert Plan.from_yaml(a.to_yaml()) == a
    assert len(a.alternatives) == 5


def test_full_layout_only_estimates():
    p = plan(SPECS / "llama3_8b.yaml", gpus=64, profile="h100_ib", global_batch=256,
             layout="tp=8,pp=1,vpp=1,cp=1,ep=1,dp=8,zero=1,mbs=1,recompute=selective")
    assert p.layout["tp"] == 8 and p.provenance["solver"].startswith("none")


def test_ilp_split_is_priced_like_estimate(llama405b):
    """The ILP's objective and estimate() agree on the chosen split (DP traffic and optimizer aside)."""
    from autoshard.cost_models.work import model_work
    from autoshard.planner.search.ilp import StageILP

    training = Training(global_batch=2048, seq_len=8192)
    layout = Layout(tp=8, pp=16, dp=128)
    work = model_work(llama405b)
    assignment = StageILP(work, layout, training, H100).build().solve()
    est = estimate(llama405b, dataclasses.replace(layout), training, H100, split=assignment.split,
                   recompute=assignment.recompute, work=work)
    assert est.fits
    assert sum(assignment.split) == len(llama405b.blocks)
    extra = est.time_breakdown["dp_exposed"] + est.time_breakdown["optimizer"]
    assert est.step_time_s - extra == pytest.approx(assignment.objective_s, rel=1e-3)


def test_least_bottleneck_by_hand():
    """3 blocks of 1 s over stages holding 0 s and 1 s of fixed work: two on the first, one on the second."""
    from autoshard.planner.search.ilp import _least_bottleneck

    assert _least_bottleneck([0.0, 1.0], 3, 1.0) == 2.0
    assert _least_bottleneck([0.0, 0.0, 5.0], 4, 1.0) == 2.0  # the loaded stage takes none
    assert _least_bottleneck([0.5], 2, 1.0) == 2.5


@pytest.mark.parametrize(("spec", "layout"), [
    ("llama3_405b.yaml", Layout(tp=8, pp=16, dp=128)),
    ("llama3_405b.yaml", Layout(tp=8, pp=8, vpp=2, dp=256, schedule="interleaved_1f1b")),  # 126 blocks: uneven
    ("deepseek_v3_like.yaml", Layout(tp=1, pp=16, vpp=2, cp=4, ep=16, dp=32, schedule="zbv")),  # two runs
    ("gpt3_175b.yaml", Layout(tp=8, pp=12, vpp=2, dp=16, schedule="zb_interleaved")),
])
def test_the_ilp_lower_bound_is_under_every_split(spec, layout):
    """The bound _refine skips the ILP by (no split beats the even one) is under the solved optimum and the
    even split, and the even split's objective is the ILP's price of it (estimate's pipeline time)."""
    from autoshard.cost_models.estimate import pipeline_time
    from autoshard.cost_models.pipeline import split_blocks
    from autoshard.cost_models.work import model_work
    from autoshard.planner.search.ilp import StageILP

    graph = capture(SPECS / spec, 1, 4096)
    training = Training(global_batch=2048, seq_len=4096)
    work = model_work(graph)
    ilp = StageILP(work, layout, training, H100.replace(hbm_bytes=10**15), modes=("none",))
    even = split_blocks(len(graph.blocks), layout.pp * layout.vpp)
    assert ilp.objective(even, "none") == pytest.approx(pipeline_time(graph, layout, training, H100, work=work),
                                                       rel=1e-9)
    bound = ilp.lower_bound()
    assert bound <= ilp.objective(even, "none") * (1 + 1e-12)
    solved = ilp.build().solve()
    assert bound <= solved.objective_s * (1 + 1e-6)  # the solver rounds its objective (2e-8 seen)
    assert ilp.objective(solved.split, "none") == pytest.approx(solved.objective_s, rel=1e-6)


@pytest.mark.parametrize(("spec", "gpus", "batch"), [("deepseek_v3_like.yaml", 2048, 4096), ("llama3_70b.yaml", 1024, 1024)])
def test_a_tuples_quick_floor_is_under_its_pipeline_times(spec, gpus, batch):
    """The floor a degree tuple waits under (layouts._quick_floor: per-kind unit times, some stage holding
    ceil(n / pp) of each kind) is under the pipeline time of every (micro-batch, interleaving, schedule)
    choice of the tuple, the lightest recompute's; and the kinds add up to the one-stage pipeline time."""
    from autoshard.cost_models.estimate import kind_times, pipeline_time
    from autoshard.cost_models.work import model_work
    from autoshard.planner.search import layouts

    graph = capture(SPECS / spec, 1, 4096)
    training = Training(global_batch=batch, seq_len=4096)
    work, memo = model_work(graph), {}
    tuples = layouts.degree_tuples(graph, gpus, training, H100, {})
    for tp, cp, pp, dp, ep in tuples[:: max(1, len(tuples) // 40)]:
        floor = layouts._quick_floor(graph, work, (tp, cp, pp, dp, ep), training, H100, {}, memo)
        for mbs, vpp, schedule in layouts._combos(graph, (tp, cp, pp, dp, ep), training, {}):
            lay = Layout(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, mbs=mbs, vpp=vpp, schedule=schedule, zero=1)
            assert floor <= pipeline_time(graph, lay, training, H100, work=work), lay.to_string()
        one = Layout(tp=tp, cp=cp, pp=1, dp=dp * pp, ep=ep, mbs=1, zero=1)
        m = training.global_batch // one.dp
        assert sum(n * t for n, t in kind_times(graph, one, training, H100, work=work)) == pytest.approx(
            pipeline_time(graph, one, training, H100, work=work) / m, rel=1e-12)
