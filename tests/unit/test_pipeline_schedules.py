"""Zero-bubble pipeline schedules (cost_models/pipeline.py): the bubble and the micro-batches in flight of
zb_interleaved and zbv against a hand computation and against torch's own action order
(torch.distributed.pipelining builds each rank's list of F / I / W actions with no process group), replayed
with each action starting when its rank is free and its input is ready; placement, validity and search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.pipelining import schedules as torch_schedules

from autoshard.cost_models.estimate import assign_stages, estimate
from autoshard.cost_models.layout import Layout, Training, parse_layout
from autoshard.cost_models.pipeline import (
    SPLIT_BACKWARD,
    chunk_stage,
    fill_drain,
    in_flight,
    split_blocks,
    step_time,
)
from autoshard.cost_models.validity import layout_errors, schedule_errors
from autoshard.cost_models.work import model_work
from autoshard.hardware_profiles import load_profile
from autoshard.planner.capture.reference_model import build_reference_model
from autoshard.planner.capture.spec import load_spec
from autoshard.planner.capture.trace import capture
from autoshard.planner.outputs.report import schedule_order, simulate
from autoshard.transforms.pp import SCHEDULES, chunk_specs

ROOT = Path(__file__).resolve().parents[2]
TORCH_CLASS = {"zb_interleaved": ("ScheduleInterleavedZeroBubble", "loop"), "zbv": ("ScheduleZBVZeroBubble", "v")}


class _Stage:
    """What torch's schedule constructors read from a PipelineStage."""

    def __init__(self, index: int, n_stages: int, p: int) -> None:
        self.stage_index, self.num_stages, self.group_size, self.group_rank = index, n_stages, p, 0
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.submod = nn.Linear(1, 1)


def torch_order(schedule: str, p: int, v: int, m: int) -> tuple[dict[int, list], int]:
    """torch's compute actions per pipeline rank (bubbles dropped) and the number of chunks."""
    cls, style = TORCH_CLASS[schedule]
    ranks = torch_schedules.generate_stage_to_rank_mapping(p, p * v, style=style)
    stages = [_Stage(i, p * v, p) for i in range(p * v) if ranks[i] == 0]
    sched = getattr(torch_schedules, cls)(stages, n_microbatches=m, loss_fn=lambda out, target: out)
    return {r: [a for a in acts if a is not None] for r, acts in sched.pipeline_order.items()}, p * v


def replay(orders: dict[int, list], n: int, t_f: float, t_b: float, t_w: float) -> float:
    """Makespan of the actions run in each rank's order: F after the previous chunk's F, I (input gradient)
    after the next chunk's I (the last chunk: after its own F), W after its own I."""
    done: dict[tuple, float] = {}
    pos, free = dict.fromkeys(orders, 0), dict.fromkeys(orders, 0.0)
    length = {"F": t_f, "I": t_b, "W": t_w}
    while any(pos[r] < len(orders[r]) for r in orders):
        moved = False
        for r, acts in orders.items():
            while pos[r] < len(acts):
                a = acts[pos[r]]
                kind, s, mb = a.computation_type.value, a.stage_index, a.microbatch_index
                dep = {"F": ("F", s - 1) if s else None, "W": ("I", s),
                       "I": ("F", s) if s == n - 1 else ("I", s + 1)}[kind]
                if dep is not None and (*dep, mb) not in done:
                    break
                start = max(free[r], done[(*dep, mb)] if dep else 0.0)
                free[r] = done[(kind, s, mb)] = start + length[kind]
                pos[r] += 1
                moved = True
        assert moved, "the replay deadlocked"
    return max(free.values())


def held_peak(actions: list, v: int) -> float:
    """Most micro-batches (chunk forwards / v) whose weight gradient has not run, over one rank's order."""
    live = peak = 0
    for a in actions:
        live += {"F": 1, "W": -1}.get(a.computation_type.value, 0)
        peak = max(peak, live)
    return peak / v


def test_hand_computation():
    """p = 4, v = 2, m = 8, a stage time of 3 s per micro-batch: 1F1B-interleaved fills and drains for
    (p-1)/v = 1.5 stage times; zero bubble with T_F = T_B = T_W = 1 s for (p-1)(T_F + T_B - T_W)/v = 1.5 s."""
    assert SPLIT_BACKWARD == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert fill_drain(4, 2, "interleaved_1f1b") == 1.5
    assert fill_drain(4, 2, "zb_interleaved") == pytest.approx(0.5)
    assert fill_drain(4, 1, "zb_interleaved") == pytest.approx(1.0)
    assert fill_drain(4, 2, "zbv") == pytest.approx(0.5)
    assert step_time([3.0] * 4, 8, 2, "interleaved_1f1b") == pytest.approx(24 + 4.5)
    assert step_time([3.0] * 4, 8, 2, "zbv") == pytest.approx(24 + 1.5)
    # ZB-V: rank r holds min(m, 2p-r-1) + min(m, r+1) chunk forwards; ZB-H1 p on every rank
    assert [in_flight(r, 4, 4, 2, "zbv") for r in range(4)] == [2.5, 3.0, 3.5, 4.0]
    assert [in_flight(r, 4, 16, 2, "zbv") for r in range(4)] == [4.0] * 4
    assert [in_flight(r, 4, 8, 1, "zb_interleaved") for r in range(4)] == [4.0] * 4
    assert in_flight(0, 2, 3, 2, "zb_interleaved") == 2.5  # one round of 3: 3 + 2 chunk forwards


@pytest.mark.parametrize(("schedule", "v"), [("zb_interleaved", 1), ("zb_interleaved", 2), ("zbv", 2)])
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_bubble_and_peak_of_torchs_own_order(schedule, p, v, rounds):
    """Replaying torch's action order with T_F = T_B = T_W (a third of the stage time, split over the v
    chunks) gives the priced bubble exactly, and each rank's peak of un-finished micro-batches is in_flight.
    zbv exists only at v = 2 (two chunks per rank)."""
    m = rounds * p if schedule != "zbv" else max(rounds * p, 2 * p - 1)  # torch's ZB-V order is built for 2p-1
    orders, n = torch_order(schedule, p, v, m)
    third = 1 / (3 * v)  # one chunk's F (and B, and W) with a stage time of 1 per micro-batch
    bubble = replay(orders, n, third, third, third) - m
    assert bubble == pytest.approx(fill_drain(p, v, schedule))
    assert [held_peak(orders[r], v) for r in range(p)] == [in_flight(r, p, m, v, schedule) for r in range(p)]
    assert bubble < fill_drain(p, v, "interleaved_1f1b" if v > 1 else "1f1b") / 2


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_zbv_with_few_micro_batches(m):
    """Fewer than 2p-1 micro-batches leave holes in torch's ZB-V order (it is built for max(2p-1, m) and
    drops the extra ones): the peak is still in_flight's, the bubble larger than priced (not modelled)."""
    orders, n = torch_order("zbv", 4, 2, m)
    assert [held_peak(orders[r], 2) for r in range(4)] == [in_flight(r, 4, m, 2, "zbv") for r in range(4)]
    assert replay(orders, n, 1 / 6, 1 / 6, 1 / 6) - m >= fill_drain(4, 2, "zbv") - 1e-9


@pytest.mark.parametrize(("schedule", "v"), [("zb_interleaved", 1), ("zb_interleaved", 2), ("zb_interleaved", 3),
                                         ("zbv", 2)])
@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_report_draws_torchs_order(schedule, v, p):
    """The report's timeline (planner/outputs/report.py) runs torch's F / I / W order action by action, for m up
    to 3p + 1 (zb_interleaved: those torch takes, multiples of its rounds), and its replay gives the priced
    bubble."""
    for m in range(1, 3 * p + 2):
        if schedule == "zb_interleaved" and m % max(1, m // p):
            continue
        orders, _ = torch_order(schedule, p, v, m)
        for r in range(p):
            want = [({"I": "B"}.get(a.computation_type.value, a.computation_type.value), a.microbatch_index,
                     a.stage_index // p) for a in orders[r]]
            assert schedule_order(p, m, v, schedule, r) == want, (m, r)
    m = 2 * p
    timeline = simulate(p, m, v, schedule, [1 / (3 * v)] * p, [2 / (3 * v)] * p)
    assert max(a.end for row in timeline for a in row) - m == pytest.approx(fill_drain(p, v, schedule))
    assert {a.kind for row in timeline for a in row} == {"F", "B", "W"}


def test_zero_bubble_with_unequal_backward_halves():
    """W fills no more than the B it follows: (p-1)(T_F + max(0, T_B - T_W))/v on torch's ZB-H1 order."""
    for t_b, t_w, want in [(1.5, 0.5, 2.0), (1.2, 0.8, 1.4), (0.8, 1.2, 1.0)]:
        orders, n = torch_order("zb_interleaved", 4, 1, 16)
        assert replay(orders, n, 1.0, t_b, t_w) - 16 * (1 + t_b + t_w) == pytest.approx(3 * want)


def test_v_placement_is_torchs():
    for p in (2, 4, 8):
        want = torch_schedules.generate_stage_to_rank_mapping(p, 2 * p, style="v")
        assert {c: chunk_stage(c, p, "zbv") for c in range(2 * p)} == want
        assert {c: chunk_stage(c, p, "zb_interleaved") for c in range(2 * p)} == {c: c % p for c in range(2 * p)}
    specs = chunk_specs(8, [2, 2, 2, 2], 0, 2, "zbv")
    assert [(s.index, s.first, s.last) for s in specs] == [(0, True, False), (3, False, True)]
    assert set(SCHEDULES) >= {"zb_interleaved", "zbv"}


def test_layout_strings():
    assert parse_layout("pp=2,schedule=zbv") == {"pp": 2, "schedule": "zbv", "vpp": 2}
    assert Layout(pp=2, vpp=4, schedule="zb_interleaved").schedule == "zb_interleaved"
    with pytest.raises(ValueError, match="needs schedule"):
        Layout(pp=2, vpp=2, schedule="1f1b")


@pytest.fixture(scope="module")
def tiny():
    with torch.device("meta"):
        model = build_reference_model(load_spec(ROOT / "examples" / "specs" / "tiny_llama.yaml")[0])
    return capture(model, 1, 32)


def test_validity_rules_are_named(tiny):
    train = Training(global_batch=8, seq_len=32)
    assert any("zbv's V" in e for e in layout_errors(tiny, Layout(pp=2, schedule="zbv", zero=0), train))
    megatron = Training(global_batch=8, seq_len=32, framework="megatron")
    assert any("zero-bubble schedules are torch" in e
               for e in layout_errors(tiny, Layout(pp=2, vpp=2, schedule="zbv", zero=1), megatron))
    assert any("ZeRO-3" in e for e in schedule_errors(Layout(pp=2, dp=2, vpp=2, schedule="zbv", zero=3), "torch"))
    assert not schedule_errors(Layout(pp=2, dp=2, vpp=2, schedule="zbv", zero=3), "torchtitan")
    rounds = schedule_errors(Layout(pp=4, schedule="zb_interleaved"), "torch", m=9)
    assert rounds and "ScheduleInterleavedZeroBubble" in rounds[0]
    assert not layout_errors(tiny, Layout(pp=2, vpp=2, schedule="zbv", zero=1), train)


def test_zbv_stages_and_price(tiny):
    """Under zbv rank 0 holds the first chunk (embedding) and the last (norm, head); its bubble is priced a
    third of interleaved 1F1B's."""
    work = model_work(tiny)
    lay = Layout(pp=2, vpp=2, schedule="zbv", zero=1)
    stages = assign_stages(work, lay)
    kinds = [{w.kind for w in s.units} for s in stages]
    assert "head" in kinds[0] and "head" not in kinds[1]
    assert split_blocks(4, 4) == [1, 1, 1, 1]
    train, profile = Training(global_batch=8, seq_len=32), load_profile("h100_ib")
    est = {s: estimate(tiny, Layout(pp=2, vpp=2, schedule=s, zero=1), train, profile)
           for s in ("interleaved_1f1b", "zb_interleaved", "zbv")}
    inter = est["interleaved_1f1b"].time_breakdown["bubble"]
    assert est["zb_interleaved"].time_breakdown["bubble"] == pytest.approx(inter / 3, rel=0.02)
    assert est["zbv"].step_time_s < est["interleaved_1f1b"].step_time_s
