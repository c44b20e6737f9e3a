"""The report's pipeline schedule against hand computations, the mesh arithmetic, and the pages it draws."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoshard.cost_models.communication import Group
from autoshard.planner.outputs.report import (
    group_members,
    idle_fraction,
    rank_coords,
    render_html,
    schedule_order,
    simulate,
    write_report,
)


def first_backward(order: list[tuple[str, int, int]]) -> int:
    return next(i for i, a in enumerate(order) if a[0] == "B")


@pytest.mark.parametrize(("p", "m"), [(4, 8), (8, 3), (2, 2)])
def test_1f1b_warmup_and_order(p, m):
    for s in range(p):
        order = schedule_order(p, m, 1, "1f1b", s)
        assert first_backward(order) == min(p - s, m)  # stage s runs p - s forwards before its first backward
        assert sorted(order) == sorted([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)])
        steady = order[first_backward(order):first_backward(order) + 2 * (m - min(p - s, m))]
        assert [a[0] for a in steady] == ["B", "F"] * (m - min(p - s, m))  # one forward, one backward


def test_1f1b_order_by_hand():
    # p=4, m=6, stage 1: 3 warm-up forwards, then B0 F3 B1 F4 B2 F5, then B3 B4 B5
    assert [f"{k}{mb}" for k, mb, _ in schedule_order(4, 6, 1, "1f1b", 1)] == \
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5".split()


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize(("p", "m", "f", "b"), [(4, 8, 1.0, 2.0), (8, 16, 0.5, 1.5), (3, 1, 1.0, 2.0)])
def test_makespan_uniform_stages(schedule, p, m, f, b):
    timeline = simulate(p, m, 1, schedule, [f] * p, [b] * p)
    assert max(a.end for a in timeline[0]) == pytest.approx((m + p - 1) * (f + b))
    assert idle_fraction(timeline) == pytest.approx((p - 1) / (m + p - 1))  # the bubble: (p-1)/(m+p-1) of the span


@pytest.mark.parametrize(("p", "m", "v"), [(4, 8, 2), (4, 8, 4), (16, 64, 4)])
def test_interleaved_makespan(p, m, v):
    """Narayanan et al. SC'21 Sec. 2.2.2: the bubble shrinks to (p-1)/v of a micro-batch's time."""
    f, b = 1.0, 2.0
    timeline = simulate(p, m, v, "interleaved_1f1b", [f / v] * p, [b / v] * p)
    assert max(a.end for row in timeline for a in row) == pytest.approx((m + (p - 1) / v) * (f + b))
    order = schedule_order(p, m, v, "interleaved_1f1b", 0)
    assert first_backward(order) == (p - 1) * 2 + (v - 1) * p + 1
    assert [c for k, _, c in order if k == "F"][: 2 * p] == [0] * p + [1] * p  # p micro-batches per chunk


def test_slow_stage_paces_the_pipeline():
    timeline = simulate(3, 6, 1, "1f1b", [1.0, 2.0, 1.0], [2.0, 4.0, 2.0])
    end = max(a.end for row in timeline for a in row)
    assert end >= 6 * 6.0  # m x the slowest stage's f + b


def test_mesh_coordinates_and_groups():
    layout = {"pp": 2, "dp": 2, "cp": 2, "tp": 2}
    assert rank_coords(0, layout) == {"pp": 0, "dp": 0, "cp": 0, "tp": 0}
    assert rank_coords(1, layout) == {"pp": 0, "dp": 0, "cp": 0, "tp": 1}  # TP on consecutive ranks
    assert rank_coords(2, layout) == {"pp": 0, "dp": 0, "cp": 1, "tp": 0}
    assert rank_coords(13, layout) == {"pp": 1, "dp": 1, "cp": 0, "tp": 1}
    assert group_members(5, Group(size=2, stride=1)) == [4, 5]
    assert group_members(5, Group(size=2, stride=4)) == [1, 5]  # dp: stride tp x cp
    assert group_members(13, Group(size=2, stride=8)) == [5, 13]  # pp: outermost


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    from autoshard.planner.api import plan

    spec = Path(__file__).resolve().parents[3] / "examples" / "specs" / "tiny_llama.yaml"
    return plan(spec, gpus=8, profile="h100_ib", global_batch=16,
                layout="tp=2,pp=2,vpp=1,cp=1,ep=1,dp=2,zero=1,mbs=1,recompute=selective")


def test_html_is_self_contained(tiny_plan):
    page = render_html(tiny_plan, gpus_per_node=8)
    for needle in ("Device mesh", "Pipeline schedule", "Memory per stage", "Step time breakdown", "Alternatives",
                   "<svg", "rank 7", "tp=2,pp=2"):
        assert needle in page
    for banned in ("<script", "http://", "https://", "<link", "@import"):
        assert banned not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_reads_a_plan_from_yaml(tiny_plan, tmp_path):
    from autoshard.planner.outputs.plan import Plan

    reloaded = Plan.from_yaml(tiny_plan.to_yaml())
    assert reloaded.stage_memory_gib == [] and tiny_plan.stage_memory_gib  # not part of the YAML
    assert "keeps the breakdown of the peak stage only" in render_html(reloaded, gpus_per_node=8)


def test_png_report(tiny_plan, tmp_path):
    from matplotlib import image

    write_report(tiny_plan, tmp_path / "plan.png", gpus_per_node=8)
    pixels = image.imread(tmp_path / "plan.png")
    assert pixels.shape[0] > 500 and (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.05
    with pytest.raises(ValueError, match=".html or .png"):
        write_report(tiny_plan, tmp_path / "plan.pdf", gpus_per_node=8)


def test_zero_bubble_timeline_draws_weight_passes():
    """A zbv plan's timeline runs torch's F / B / W order (tests/unit/test_pipeline_schedules.py checks it action
    by action), not 1F1B's, and says so."""
    from autoshard.planner.api import plan
    from autoshard.planner.outputs.report import plan_timeline

    spec = Path(__file__).resolve().parents[3] / "examples" / "specs" / "tiny_llama.yaml"
    zbv = plan(spec, gpus=2, profile="h100_ib", global_batch=8,
               layout="tp=1,pp=2,vpp=2,cp=1,ep=1,dp=1,zero=1,mbs=1,recompute=none,schedule=zbv")
    timeline = plan_timeline(zbv)
    assert [a.kind for a in timeline[0]].count("W") == 2 * 8
    assert [a.chunk for a in timeline[0] if a.kind == "F"][:3] == [0, 0, 0]  # 2p - 1 forwards of chunk 0 first
    page = render_html(zbv, gpus_per_node=8)
    assert "weight gradient" in page and "input gradient : weight gradient 1:1:1" in page
