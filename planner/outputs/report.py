"""A plan as pictures: one self-contained HTML page (inline SVG, no scripts, nothing fetched) or a PNG.

Sections: the layout and its predictions, the device mesh (one node's ranks and every group's size,
stride and span, since 16,384 boxes help nobody), the pipeline schedule as a timeline (forward and
backward of each micro-batch per stage; idle time is the bubble), memory per stage as stacked bars
against capacity, the step-time breakdown and the alternatives.

The timeline replays the schedule's action order (`schedule_order`) with each stage's time per
micro-batch from the plan, split forward:backward as 1:GEMM_BWD_FACTOR (the cost model's GEMM ratio,
cost_models/compute.py), and each action waiting for the one it depends on (`simulate`). The zero-bubble
schedules run torch's order of F, B (input gradient) and W (weight gradient), split 1:1:1 as the cost model
prices them (cost_models/pipeline.SPLIT_BACKWARD). Rank order is
the cost model's and transforms/apply.py's: axes (pp, dp, cp, tp) outermost to innermost, EP carved
from dp x cp with its ranks consecutive (cost_models/communication.layout_groups).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoshard.cost_models.communication import Group, layout_groups
from autoshard.cost_models.compute import GEMM_BWD_FACTOR
from autoshard.cost_models.pipeline import SPLIT_BACKWARD, V_SHAPED, ZERO_BUBBLE
from autoshard.planner.outputs.plan import Plan, compact_units

FWD_SHARE = 1.0 / (1.0 + GEMM_BWD_FACTOR)
"""Forward share of one micro-batch's forward + backward time."""
MESH_AXES = ("pp", "dp", "cp", "tp")
"""Outermost to innermost (transforms/apply.py MESH_AXES)."""
MEMORY_KINDS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "reserve")
COLORS = {"weights": "#4c72b0", "gradients": "#55a868", "optimizer": "#c44e52", "activations": "#8172b2",
          "logits": "#ccb974", "buffers": "#64b5cd", "reserve": "#a0a0a0", "total": "#7f7f7f",
          "F": "#4c72b0", "B": "#55a868", "W": "#8fbf6f", "idle": "#f4c7c3"}
TIME_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c",
               "#ccb974", "#64b5cd")


# ---------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True, slots=True)
class Action:
    """One forward (F), backward (B; the input gradient under a zero-bubble schedule) or weight gradient (W)
    of one micro-batch through one model chunk on one stage."""

    stage: int
    kind: str
    micro_batch: int
    chunk: int
    start: float
    end: float


def schedule_order(p: int, m: int, v: int, schedule: str, stage: int) -> list[tuple[str, int, int]]:
    """(kind, micro-batch, chunk) in the order `stage` runs them.

    GPipe: all forwards, then all backwards. 1F1B (Narayanan et al. SC'21, Sec. 2.2.1): p - stage forwards
    before the first backward, then one backward after each forward, then the remaining backwards.
    Interleaved 1F1B (Sec. 2.2.2, Megatron-LM's schedule): forwards in groups of p micro-batches through
    chunk 0, 1, ..., v-1, backwards through the chunks in reverse; (p - stage - 1) x 2 + (v - 1) x p warm-up
    forwards, then one forward and one backward alternately. Zero bubble: `zero_bubble_order`.
    """
    if schedule in ZERO_BUBBLE:
        return zero_bubble_order(p, m, v, schedule, stage)
    if schedule == "gpipe":
        return [("F", mb, c) for c in range(v) for mb in range(m)] + \
               [("B", mb, c) for c in reversed(range(v)) for mb in range(m)]
    pairs = [(mb, c) for mb in range(m) for c in range(v)]
    fwd = sorted(pairs, key=lambda t: (t[0] // p, t[1], t[0] % p))
    bwd = sorted(pairs, key=lambda t: (t[0] // p, v - 1 - t[1], t[0] % p))
    warm = min(p - stage - 1 if v == 1 else (p - stage - 1) * 2 + (v - 1) * p, m * v)
    order = [("F", *fwd[i]) for i in range(warm)]
    for i in range(warm, m * v):
        order += [("F", *fwd[i]), ("B", *bwd[i - warm])]
    order += [("B", *bwd[i]) for i in range(m * v - warm, m * v)]
    return order


def zero_bubble_order(p: int, m: int, v: int, schedule: str, stage: int) -> list[tuple[str, int, int]]:
    """(kind, micro-batch, chunk) in the order `stage` runs them under torch's zero-bubble schedules (the
    orders of torch.distributed.pipelining, checked action by action in tests/unit/test_pipeline_schedules.py).

    zb_interleaved (ZB-H1, Qi et al. arXiv:2401.10241 Sec. 3.1, over v chunks in rounds of r = m / max(1, m // p)
    micro-batches): (v-1) r + p-1-stage warm-up forwards, then a forward and an input backward alternately,
    from the stage-th pair on each followed by the weight pass of the oldest backward, then the weight passes
    left. zbv (Sec. 6, chunk 0 going down the ranks and chunk 1 up): 2(p-s)-1 forwards of chunk 0, s pairs
    (chunk 1, chunk 0), p-s chunk-1 F B W, then F B W of chunk 0 and chunk 1 in turn, then the backwards left
    with their weight passes, built for max(m, 2p-1) micro-batches and the extra ones dropped."""
    if schedule in V_SHAPED:
        return _zbv_order(p, m, stage)
    per_round = m // max(1, m // p)
    fwd = [(mb, i // per_round % v) for i, mb in enumerate(_chunk_counts(m, v, per_round, reverse=False))]
    bwd = [(mb, v - 1 - i // per_round % v) for i, mb in enumerate(_chunk_counts(m, v, per_round, reverse=True))]
    warm = min((v - 1) * per_round + p - 1 - stage, m * v)
    order = [("F", *fwd[i]) for i in range(warm)]
    weights = 0
    for i in range(warm, m * v + warm):
        if i < m * v:
            order.append(("F", *fwd[i]))
        order.append(("B", *bwd[i - warm]))
        if i - warm >= stage:  # the stage-th backward on: the oldest weight pass fills what was the bubble
            order.append(("W", *bwd[weights]))
            weights += 1
    return order + [("W", *bwd[i]) for i in range(weights, m * v)]


def _chunk_counts(m: int, v: int, per_round: int, *, reverse: bool) -> list[int]:
    """Micro-batch index of each of the m v forwards (or backwards) visiting the chunks a round at a time."""
    seen = [0] * v
    out = []
    for i in range(m * v):
        c = v - 1 - i // per_round % v if reverse else i // per_round % v
        out.append(seen[c])
        seen[c] += 1
    return out


def _zbv_order(p: int, m: int, s: int) -> list[tuple[str, int, int]]:
    n = max(m, 2 * p - 1)
    count = {(k, c): 0 for k in "FBW" for c in (0, 1)}
    order: list[tuple[str, int, int]] = []

    def run(*actions: tuple[str, int]) -> None:
        for kind, c in actions:
            order.append((kind, count[kind, c], c))
            count[kind, c] += 1

    run(*[("F", 0)] * (2 * (p - s) - 1))
    for _ in range(s):
        run(("F", 1), ("F", 0))
    for _ in range(p - s):
        run(("F", 1), ("B", 1), ("W", 1))
    while count["F", 1] < count["F", 0] or count["F", 0] < n:
        run(*([("F", 0)] if count["F", 0] < n else []), ("B", 0), ("W", 0), ("F", 1), ("B", 1), ("W", 1))
    for _ in range(s):
        run(("B", 0), ("B", 1))
    for _ in range(p - s):
        run(("B", 0), ("W", 0))
    run(*[("W", 1)] * (count["B", 1] - count["W", 1]), *[("W", 0)] * (count["B", 0] - count["W", 0]))
    return [a for a in order if a[1] < m]


def simulate(p: int, m: int, v: int, schedule: str, fwd_s: list[float], bwd_s: list[float]) -> list[list[Action]]:
    """Each stage runs its `schedule_order`; an action starts when its stage is free and its input is
    ready: the forward of virtual stage k (chunk c on stage s is k = c p + s; under zbv chunk 1 is
    k = 2p - 1 - s) after the forward of k - 1, the backward of k after the backward of k + 1 (the last one
    after its own forward), a weight pass after its own backward. `fwd_s[s]` and `bwd_s[s]` are one chunk's
    times on stage s; under a zero-bubble schedule the backward's time is split between B and W as
    SPLIT_BACKWARD."""
    orders = [schedule_order(p, m, v, schedule, s) for s in range(p)]
    b_share = SPLIT_BACKWARD[1] / (SPLIT_BACKWARD[1] + SPLIT_BACKWARD[2]) if schedule in ZERO_BUBBLE else 1.0
    done: dict[tuple[str, int, int], float] = {}
    free, pos = [0.0] * p, [0] * p
    out: list[list[Action]] = [[] for _ in range(p)]
    left = sum(len(o) for o in orders)
    while left:
        moved = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                kind, mb, c = orders[s][pos[s]]
                k = c * p + (p - 1 - s if schedule in V_SHAPED and c % 2 else s)
                dep = {"F": ("F", mb, k - 1) if k > 0 else None, "W": ("B", mb, k),
                       "B": ("B", mb, k + 1) if k < p * v - 1 else ("F", mb, k)}[kind]
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done[dep] if dep else 0.0)
                length = {"F": fwd_s[s], "B": bwd_s[s] * b_share, "W": bwd_s[s] * (1 - b_share)}[kind]
                done[(kind, mb, k)] = free[s] = start + length
                out[s].append(Action(stage=s, kind=kind, micro_batch=mb, chunk=c, start=start, end=start + length))
                pos[s] += 1
                left -= 1
                moved = True
        if not moved:
            raise RuntimeError(f"the {schedule} order deadlocks for p={p}, m={m}, v={v}")
    return out


def plan_timeline(plan: Plan) -> list[list[Action]]:
    """The plan's pipeline schedule with its per-stage times (one chunk = the stage's time / vpp)."""
    lay = plan.layout
    p, v, m = lay["pp"], lay["vpp"], plan.predicted["micro_batches"]
    per_chunk = [s.predicted_time_s / v for s in plan.stages]
    fwd_share = SPLIT_BACKWARD[0] if lay["schedule"] in ZERO_BUBBLE else FWD_SHARE
    return simulate(p, m, v, lay["schedule"], [t * fwd_share for t in per_chunk],
                    [t * (1 - fwd_share) for t in per_chunk])


def idle_fraction(timeline: list[list[Action]]) -> float:
    """Idle stage-time over all stage-time until the last action ends (the bubble)."""
    end = max(a.end for row in timeline for a in row)
    busy = sum(a.end - a.start for row in timeline for a in row)
    return 1.0 - busy / (end * len(timeline))


# ---------------------------------------------------------------------------------------------- mesh


def rank_coords(rank: int, layout: dict[str, Any]) -> dict[str, int]:
    """Coordinates of a global rank on the (pp, dp, cp, tp) mesh, tp fastest."""
    out = {}
    for axis in reversed(MESH_AXES):
        rank, out[axis] = divmod(rank, layout[axis])
    return {a: out[a] for a in MESH_AXES}


def group_members(rank: int, group: Group) -> list[int]:
    """The ranks of `group`'s instance holding `rank` (groups are (size, stride) in the rank order)."""
    base = rank - ((rank // group.stride) % group.size) * group.stride
    return [base + i * group.stride for i in range(group.size)]


def mesh_rows(plan: Plan, gpus_per_node: int) -> list[dict[str, Any]]:
    """Per group kind: size, stride, rank 0's members (abbreviated) and how many nodes one group spans."""
    groups = layout_groups(plan.layout_obj())
    what = {"tp": "tensor parallel (+SP)", "cp": "context parallel", "dp": "data parallel replicas",
            "dp_cp": "ZeRO shards / gradient reduction", "ep": "expert parallel (inside dp x cp)",
            "edp": "replicas of one expert shard", "pp": "pipeline stages"}
    rows = []
    for name in ("tp", "cp", "ep", "dp", "dp_cp", "edp", "pp"):
        g = groups[name]
        members = group_members(0, g)
        nodes = len({r // gpus_per_node for r in members})
        shown = ", ".join(map(str, members)) if len(members) <= 8 else \
            ", ".join(map(str, members[:4])) + f", ..., {members[-1]}"
        rows.append({"group": name, "role": what[name], "size": g.size, "stride": g.stride,
                     "count": plan.gpus // g.size, "rank0": shown, "nodes": nodes})
    return rows


# ---------------------------------------------------------------------------------------------- HTML


def render_html(plan: Plan, *, gpus_per_node: int) -> str:
    """The whole report as one HTML page with inline SVG and CSS (no scripts, no network)."""
    timeline = plan_timeline(plan)
    sections = [
        _section("Layout and predictions", _overview(plan)),
        _section("Device mesh", _mesh_html(plan, gpus_per_node)),
        _section("Pipeline schedule", _timeline_svg(plan, timeline)),
        _section("Memory per stage (one GPU)", _memory_svg(plan)),
        _section("Step time breakdown", _time_html(plan)),
        _section("Alternatives", _alternatives_html(plan)),
    ]
    title = html.escape(f"autoshard plan: {plan.model['name']} on {plan.gpus} GPUs ({plan.profile})")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            f"<style>{_CSS}</style></head>\n<body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n")


_CSS = ("body{font-family:sans-serif;margin:24px;color:#222;max-width:1300px}h2{border-bottom:1px solid #ccc}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}"
        "th{background:#f2f2f2}td.n{text-align:right}svg{display:block;margin:8px 0}.note{color:#555;font-size:13px}"
        "code{background:#f5f5f5;padding:1px 4px}")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return f"<td class=\"n\">{x:,.4g}</td>" if isinstance(x, float) else f"<td class=\"n\">{x:,}</td>"
        return f"<td>{html.escape(str(x))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(map(cell, r)) + "</tr>" for r in rows) + "</table>"


def _overview(plan: Plan) -> str:
    p, t = plan.predicted, plan.training
    rows = [
        ["model", f"{plan.model['name']} ({plan.model['params']:,} params, {plan.model['blocks']} blocks)"],
        ["training", f"{t['global_batch']} sequences x {t['seq_len']} tokens per step, {t['precision']}"],
        ["layout", plan.layout_obj().to_string()],
        ["step time", f"{p['step_time_s']:.4g} s ({p['micro_batches']} micro-batches per replica)"],
        ["throughput", f"{p['tokens_per_sec_per_gpu']:,.0f} tokens/s/GPU, MFU {p['mfu']:.1%}, HFU {p['hfu']:.1%}"],
        ["memory", f"{p['peak_memory_gib']:.3g} of {p['memory_capacity_gib']:.3g} GiB per GPU "
                   f"({'fits' if p['fits'] else 'DOES NOT FIT'})"],
        ["binding constraint", p["binding_constraint"]],
        ["provenance", ", ".join(f"{k}: {v}" for k, v in plan.provenance.items())],
    ]
    return _table(["", ""], rows)


def _mesh_html(plan: Plan, gpus_per_node: int) -> str:
    lay = plan.layout
    formula = "rank = ((pp_i &times; dp + dp_i) &times; cp + cp_i) &times; tp + tp_i"
    rows = [[r["group"], r["role"], r["size"], r["stride"], r["count"], r["rank0"], r["nodes"]]
            for r in mesh_rows(plan, gpus_per_node)]
    table = _table(["group", "what", "size", "rank stride", "groups", "rank 0's group", "nodes it spans"], rows)
    nodes = -(-plan.gpus // gpus_per_node)
    note = (f"<p class=\"note\">{plan.gpus:,} ranks on {nodes:,} nodes of {gpus_per_node} GPUs. Mesh axes outermost "
            f"to innermost: pp={lay['pp']}, dp={lay['dp']}, cp={lay['cp']}, tp={lay['tp']}; {formula}; ep={lay['ep']} "
            "groups are consecutive ranks (stride tp) inside dp &times; cp. Node 0 below; every node looks alike "
            "up to the coordinates.</p>")
    return note + _node_svg(plan, gpus_per_node) + table


def _node_svg(plan: Plan, gpus_per_node: int) -> str:
    lay = plan.layout
    shown = min(gpus_per_node, plan.gpus, 72)
    cols = min(shown, 8)
    w, h = 150, 64
    boxes = []
    for r in range(shown):
        c = rank_coords(r, lay)
        x, y = 10 + (r % cols) * (w + 8), 10 + (r // cols) * (h + 8)
        color = TIME_COLORS[(r // lay["tp"]) % len(TIME_COLORS)]
        ep = (r // lay["tp"]) % (lay["dp"] * lay["cp"]) % lay["ep"]
        label = f"tp{c['tp']} cp{c['cp']} dp{c['dp']} pp{c['pp']}" + (f" ep{ep}" if lay["ep"] > 1 else "")
        boxes.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{color}" fill-opacity="0.25" '
                     f'stroke="{color}" stroke-width="2"/><text x="{x + 8}" y="{y + 22}" font-size="14" '
                     f'font-weight="bold">rank {r}</text><text x="{x + 8}" y="{y + 44}" font-size="11">{label}</text>')
    rows = -(-shown // cols)
    width, height = 20 + cols * (w + 8), 20 + rows * (h + 8)
    caption = (f'<text x="10" y="{height + 4}" font-size="12">boxes of one colour form one TP group '
               f'(tp={lay["tp"]} consecutive ranks)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 12}" '
            f'viewBox="0 0 {width} {height + 12}" role="img" aria-label="node 0 ranks">{"".join(boxes)}{caption}</svg>')


def _timeline_svg(plan: Plan, timeline: list[list[Action]]) -> str:
    lay = plan.layout
    end = max(a.end for row in timeline for a in row)
    width, left, row_h = 1200, 70, 20
    scale = (width - left - 10) / end
    parts = []
    for s, row in enumerate(timeline):
        y = 24 + s * row_h
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">stage {s}</text>'
                     f'<rect x="{left}" y="{y}" width="{end * scale:.1f}" height="{row_h - 3}" fill="{COLORS["idle"]}"/>')
        for a in row:
            x, w = left + a.start * scale, max((a.end - a.start) * scale, 0.5)
            shade = 1.0 - 0.45 * a.chunk / max(1, lay["vpp"] - 1) if lay["vpp"] > 1 else 1.0
            parts.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{row_h - 3}" fill="{COLORS[a.kind]}" '
                         f'fill-opacity="{shade:.2f}" stroke="#fff" stroke-width="0.3"/>')
            if w > 16:
                parts.append(f'<text x="{x + w / 2:.1f}" y="{y + 13}" font-size="9" fill="#fff" '
                             f'text-anchor="middle">{a.micro_batch}</text>')
    height = 24 + len(timeline) * row_h + 40
    axis_y = 24 + len(timeline) * row_h + 14
    ticks = "".join(f'<text x="{left + f * end * scale:.1f}" y="{axis_y}" font-size="11" text-anchor="middle">'
                    f'{f * end:.3g} s</text>' for f in (0, 0.25, 0.5, 0.75, 1.0))
    zero_bubble = lay["schedule"] in ZERO_BUBBLE
    kinds = ((("F", "forward (label: micro-batch)"), ("B", "input gradient"), ("W", "weight gradient"))
             if zero_bubble else (("F", "forward (label: micro-batch)"), ("B", "backward")))
    legend = "".join(f'<rect x="{left + i * 190}" y="4" width="14" height="12" fill="{COLORS[k]}"/>'
                     f'<text x="{left + i * 190 + 20}" y="14" font-size="12">{label}</text>'
                     for i, (k, label) in enumerate((*kinds, ("idle", "idle: the pipeline bubble"))))
    idle = idle_fraction(timeline)
    split = ("forward : input gradient : weight gradient " + ":".join(f"{x / SPLIT_BACKWARD[0]:g}" for x in SPLIT_BACKWARD)
             if zero_bubble else f"1:{GEMM_BWD_FACTOR:g}")
    note = (f"<p class=\"note\">{lay['schedule']} with pp={lay['pp']}, vpp={lay['vpp']}, "
            f"{plan.predicted['micro_batches']} micro-batches; each stage's forward + backward time per micro-batch "
            f"from the plan, split {split}" + (", later chunks lighter" if lay["vpp"] > 1 else "") +
            f". Pipeline span {end:.4g} s, idle {idle:.1%} of stage time (the cost model's bubble: "
            f"{plan.predicted['time_breakdown_s'].get('bubble', 0.0):.3g} s per step). Communication between stages "
            "is not drawn.</p>")
    return note + (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                   f'viewBox="0 0 {width} {height}" role="img" aria-label="pipeline timeline">'
                   f'{legend}{"".join(parts)}{ticks}</svg>')


def stage_memory(plan: Plan) -> tuple[list[dict[str, float]], bool]:
    """GiB by kind per stage, and whether the breakdown is complete (a plan read from YAML keeps only the
    peak stage's breakdown: the others show their total)."""
    if plan.stage_memory_gib:
        return [dict(m) for m in plan.stage_memory_gib], True
    peak = max(range(len(plan.stages)), key=lambda i: plan.stages[i].predicted_memory_gib)
    out = [{"total": s.predicted_memory_gib} for s in plan.stages]
    out[peak] = dict(plan.predicted["memory_breakdown_gib"])
    return out, False


def _memory_svg(plan: Plan) -> str:
    mems, complete = stage_memory(plan)
    cap = plan.predicted["memory_capacity_gib"]
    top = max(cap, *(sum(m.values()) for m in mems)) * 1.05
    n = len(mems)
    bar = max(6, min(48, 1000 // n))
    left, height, base = 60, 300, 320
    width = left + n * (bar + 4) + 260
    parts = []
    for i, mem in enumerate(mems):
        x, y = left + i * (bar + 4), base
        for kind in (*MEMORY_KINDS, "total"):
            value = mem.get(kind, 0.0)
            if value <= 0:
                continue
            h = value / top * height
            y -= h
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{COLORS[kind]}">'
                         f"<title>stage {i} ({compact_units(plan.stages[i].units)}) {kind}: {value:.3g} GiB</title></rect>")
        if n <= 32 or i % max(1, n // 16) == 0:
            parts.append(f'<text x="{x + bar / 2}" y="{base + 14}" font-size="10" text-anchor="middle">{i}</text>')
    cap_y = base - cap / top * height
    parts.append(f'<line x1="{left}" x2="{left + n * (bar + 4)}" y1="{cap_y:.1f}" y2="{cap_y:.1f}" stroke="#d62728" '
                 f'stroke-width="2" stroke-dasharray="6 3"/><text x="{left + n * (bar + 4) + 4}" y="{cap_y + 4:.1f}" '
                 f'font-size="11" fill="#d62728">capacity {cap:.3g} GiB</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = base - frac * height
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{frac * top:.3g}</text>')
    kinds = [k for k in (*MEMORY_KINDS, "total") if any(m.get(k, 0) > 0 for m in mems)]
    legend = "".join(f'<rect x="{width - 110}" y="{20 + i * 18}" width="12" height="12" fill="{COLORS[k]}"/>'
                     f'<text x="{width - 92}" y="{30 + i * 18}" font-size="12">{k}</text>' for i, k in enumerate(kinds))
    note = "" if complete else ("<p class=\"note\">This plan was read from YAML, which keeps the breakdown of the "
                                "peak stage only; the other stages show their total. A report made while planning "
                                "(<code>plan MODEL ... --report</code>) breaks down every stage.</p>")
    return note + (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{base + 24}" '
                   f'viewBox="0 0 {width} {base + 24}" role="img" aria-label="memory per stage">'
                   f'<text x="4" y="14" font-size="11">GiB</text>{"".join(parts)}{legend}'
                   f'<text x="{left}" y="{base + 24}" font-size="11">pipeline stage</text></svg>')


def _time_html(plan: Plan) -> str:
    breakdown = {k: v for k, v in plan.predicted["time_breakdown_s"].items() if v > 0}
    total = sum(breakdown.values())
    width, left = 1000, 10
    x, parts, rows = float(left), [], []
    for i, (k, v) in enumerate(breakdown.items()):
        w = v / total * (width - 2 * left)
        color = TIME_COLORS[i % len(TIME_COLORS)]
        parts.append(f'<rect x="{x:.1f}" y="10" width="{w:.1f}" height="36" fill="{color}"><title>{k}: {v:.4g} s'
                     f'</title></rect>')
        if w > 60:
            parts.append(f'<text x="{x + 4:.1f}" y="33" font-size="12" fill="#fff">{k}</text>')
        x += w
        rows.append([f"■ {k}", v, f"{v / plan.predicted['step_time_s']:.1%}"])
    colors = "".join(f"#tb tr:nth-child({i + 2}) td:first-child{{color:{TIME_COLORS[i % len(TIME_COLORS)]}}}"
                     for i in range(len(rows)))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="56" viewBox="0 0 {width} 56" '
           f'role="img" aria-label="step time breakdown">{"".join(parts)}</svg>')
    return (f"<style>{colors}</style><p class=\"note\">Seconds per step on the slowest stage: compute and "
            f"each exposed overhead (step {plan.predicted['step_time_s']:.4g} s).</p>{svg}<div id=\"tb\">"
            + _table(["part", "seconds", "share of step"], rows) + "</div>")


def _alternatives_html(plan: Plan) -> str:
    if not plan.alternatives:
        return "<p>none priced (the layout was given)</p>"
    rows = [[plan.layout_obj().to_string() + "  (chosen)", plan.predicted["step_time_s"],
             plan.predicted["tokens_per_sec_per_gpu"], plan.predicted["peak_memory_gib"], "yes", ""]]
    from autoshard.planner.outputs.plan import _layout_obj

    rows += [[_layout_obj(a.layout).to_string(), a.step_time_s, a.tokens_per_sec_per_gpu, a.peak_memory_gib,
              "yes" if a.fits else "no", a.why_not] for a in plan.alternatives]
    return _table(["layout", "step s", "tokens/s/GPU", "GiB/GPU", "fits", "why not"], rows)


# ---------------------------------------------------------------------------------------------- PNG


def render_png(plan: Plan, path: str | Path, *, gpus_per_node: int) -> None:
    """The same charts as one matplotlib figure (timeline, memory, time breakdown, mesh, alternatives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = plan_timeline(plan)
    fig = plt.figure(figsize=(16, 13), dpi=100)
    grid = fig.add_gridspec(3, 2, height_ratios=[1.3, 1, 0.9])
    _png_timeline(fig.add_subplot(grid[0, :]), plan, timeline)
    _png_memory(fig.add_subplot(grid[1, 0]), plan)
    _png_time(fig.add_subplot(grid[1, 1]), plan)
    text = fig.add_subplot(grid[2, :])
    text.axis("off")
    mesh = [f"{r['group']:<6} size {r['size']:>5}  stride {r['stride']:>5}  spans {r['nodes']:>4} node(s)  "
            f"rank 0's group: {r['rank0']}" for r in mesh_rows(plan, gpus_per_node)]
    alts = [f"{a.step_time_s:>8.4g} s  {a.peak_memory_gib:>6.3g} GiB  {_short(a.layout)}  {a.why_not}"
            for a in plan.alternatives[:5]]
    text.text(0, 1, "\n".join(["device mesh (pp, dp, cp, tp; tp innermost)", *mesh, "", "alternatives", *alts]),
              va="top", family="monospace", fontsize=9)
    p = plan.predicted
    fig.suptitle(f"{plan.model['name']} on {plan.gpus} GPUs ({plan.profile}): {plan.layout_obj().to_string()}\n"
                 f"step {p['step_time_s']:.4g} s, MFU {p['mfu']:.1%}, {p['peak_memory_gib']:.3g} of "
                 f"{p['memory_capacity_gib']:.3g} GiB", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _short(layout: dict[str, Any]) -> str:
    return ",".join(f"{k}={layout[k]}" for k in ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "micro_batch", "recompute"))


def _png_timeline(ax: Any, plan: Plan, timeline: list[list[Action]]) -> None:
    for s, row in enumerate(timeline):
        for kind in ("F", "B", "W"):
            bars = [(a.start, a.end - a.start) for a in row if a.kind == kind]
            ax.broken_barh(bars, (s - 0.4, 0.8), facecolors=COLORS[kind], edgecolors="white", linewidth=0.2)
    end = max(a.end for row in timeline for a in row)
    ax.set_facecolor(COLORS["idle"])
    ax.set_xlim(0, end)
    ax.set_ylim(len(timeline) - 0.5, -0.5)
    ax.set_xlabel("seconds")
    ax.set_ylabel("pipeline stage")
    backward = ("input gradient green, weight gradient light green" if plan.layout["schedule"] in ZERO_BUBBLE
                else "backward green")
    ax.set_title(f"{plan.layout['schedule']} (pp={plan.layout['pp']}, vpp={plan.layout['vpp']}, "
                 f"{plan.predicted['micro_batches']} micro-batches): forward blue, {backward}, "
                 f"idle (bubble) pink, {idle_fraction(timeline):.1%} idle", fontsize=10)


def _png_memory(ax: Any, plan: Plan) -> None:
    mems, _ = stage_memory(plan)
    bottom = [0.0] * len(mems)
    for kind in (*MEMORY_KINDS, "total"):
        values = [m.get(kind, 0.0) for m in mems]
        if any(values):
            ax.bar(range(len(mems)), values, bottom=bottom, color=COLORS[kind], label=kind)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(plan.predicted["memory_capacity_gib"], color="#d62728", linestyle="--", label="capacity")
    ax.set_xlabel("pipeline stage")
    ax.set_ylabel("GiB per GPU")
    ax.set_title("memory per stage", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _png_time(ax: Any, plan: Plan) -> None:
    items = [(k, v) for k, v in plan.predicted["time_breakdown_s"].items() if v > 0]
    ax.barh([k for k, _ in items], [v for _, v in items], color=TIME_COLORS[: len(items)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step")
    ax.set_title(f"step time breakdown (step {plan.predicted['step_time_s']:.4g} s)", fontsize=10)


def write_report(plan: Plan, path: str | Path, *, gpus_per_node: int) -> None:
    """HTML or PNG by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        Path(path).write_text(render_html(plan, gpus_per_node=gpus_per_node))
    elif suffix == ".png":
        render_png(plan, path, gpus_per_node=gpus_per_node)
    else:
        raise ValueError(f"--report {path}: the file must end in .html or .png")


__all__ = ["Action", "plan_timeline", "render_html", "render_png", "schedule_order", "simulate",
           "write_report"]
