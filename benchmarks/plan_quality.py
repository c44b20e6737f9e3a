"""Plan quality on published training runs: does the planner choose what the experts ran?

For every calibration run (../shared/calibration/published_runs_dev.yaml, read by calibration_runs.py):

1. price the published layout with the cost model on the run's own hardware profile, and note whether it
   fits by our memory model. A run whose source does not state its recompute gets the lightest recompute
   that fits (accuracy.fitting_layout, as docs/accuracy.md prices it);
2. run the planner's search on the same GPUs, model, training (global batch, sequence length, precision
   and attention kernel of the run) and profile, with no layout key fixed;
3. compare: the planner's predicted tokens/s/GPU over the published layout's, whether the published
   (tp, pp, cp, ep) is the one chosen, whether the published layout is within 5% of the planner's
   prediction, and which part of the step time differs most between the two.

The search covers every layout of its space, so a published layout that fits by our model and lies in that
space can never be predicted faster than the planner's choice; such runs are listed prominently as search
bugs, each with what the search finds when its (tp, pp, cp, ep, dp) is fixed (pruning or inner choices).
Published layouts outside the space (tp beyond the NVLink domain, ZeRO-0, a micro-batch or vpp the search
does not try, sequence parallelism off, ...) are named as such.

    .venv/bin/python benchmarks/plan_quality.py [--write docs/plan_quality.md] [--only RUN_ID ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoshard.cost_models.estimate import Estimate, estimate  # noqa: E402
from autoshard.cost_models.layout import Layout  # noqa: E402
from autoshard.cost_models.validity import tp_errors  # noqa: E402
from autoshard.hardware_profiles import Profile, load_profile  # noqa: E402
from autoshard.planner.capture.model_graph import ModelGraph  # noqa: E402
from autoshard.planner.search.layouts import (  # noqa: E402
    MBS_CHOICES,
    ZERO_ORDER,
    Candidate,
    SearchResult,
    framework_choices,
    rank_step,
    search,
)
from benchmarks.accuracy import fitting_layout, graph_for  # noqa: E402
from benchmarks.calibration_runs import CalibrationRun, load_runs  # noqa: E402

WITHIN = 0.05
"""The planner's choice counts as agreeing with the published layout when predicted within 5% of it: at most
1.05 x the published layout's throughput (issue 13: "the published (tp, pp, cp, ep), or one predicted
within 5% of it")."""
TIE = 1e-3
"""Below this relative difference two predictions are the same (the 'why they differ' column)."""
GIB = 2**30
COMMAND = ".venv/bin/python benchmarks/plan_quality.py --write docs/plan_quality.md"


@dataclass(slots=True)
class Row:
    run: CalibrationRun
    published: Estimate
    result: SearchResult
    planned: Candidate | None
    """The planner's best, or when nothing fits its closest candidate (planned_fits False)."""
    planned_fits: bool
    outside: list[str]
    """Why the published layout is outside the search space (empty: inside)."""
    fixed_probe: Candidate | None = None
    """The search's best with the published (tp, pp, cp, ep, dp) fixed: the planner's vpp, ZeRO stage,
    micro-batch and recompute for the experts' degrees."""
    fixed_probe_note: str = ""

    @property
    def pub_tok(self) -> float:
        return self.published.tokens_per_sec_per_gpu

    @property
    def plan_tok(self) -> float | None:
        return self.planned.estimate.tokens_per_sec_per_gpu if self.planned and self.planned_fits else None

    @property
    def ratio(self) -> float | None:
        return self.plan_tok / self.pub_tok if self.plan_tok else None

    @property
    def same_tuple(self) -> bool:
        return self.planned is not None and self.planned_fits and _tuple(self.planned.layout) == _tuple(self.run.layout)

    @property
    def within(self) -> bool:
        return self.plan_tok is not None and self.published.fits and self.plan_tok <= (1 + WITHIN) * self.pub_tok

    @property
    def degrees_tok(self) -> float | None:
        return self.fixed_probe.estimate.tokens_per_sec_per_gpu if self.fixed_probe else None

    @property
    def degrees_within(self) -> bool:
        """The published (tp, pp, cp, ep), the rest searched, within 5% of the planner's free choice."""
        return self.plan_tok is not None and self.degrees_tok is not None and \
            self.plan_tok <= (1 + WITHIN) * self.degrees_tok

    @property
    def published_faster(self) -> bool:
        """The published layout ranks ahead of the planner's choice: a faster step to the 3 significant
        digits the search ranks by (layouts.rank_step; finer differences are ties the search breaks
        towards the simpler layout)."""
        return self.plan_tok is None and self.published.fits or (
            self.planned is not None and self.plan_tok is not None
            and rank_step(self.published.step_time_s) < rank_step(self.planned.estimate.step_time_s))


def _tuple(lay: Layout) -> tuple[int, int, int, int]:
    return lay.tp, lay.pp, lay.cp, lay.ep


def short(lay: Layout) -> str:
    text = (f"tp{lay.tp} pp{lay.pp} v{lay.vpp} cp{lay.cp} ep{lay.ep} dp{lay.dp} z{lay.zero} mbs{lay.mbs} "
            f"{lay.recompute}")
    if not lay.sequence_parallel and lay.tp > 1:
        text += " no-sp"
    if lay.async_tp:
        text += " async-tp"
    if lay.schedule == "gpipe":
        text += " gpipe"
    return text


def outside_space(run: CalibrationRun, graph: ModelGraph, profile: Profile) -> list[str]:
    """The reasons the published layout is not one the search prices (planner/search/layouts.py's choices)."""
    lay, training = run.layout, run.training
    attn = next((b.attention for b in graph.blocks if b.attention), None)
    per_dp = training.global_batch // lay.dp
    out = []
    if lay.tp > profile.nvlink_domain_gpus:
        out.append(f"tp {lay.tp} > NVLink domain {profile.nvlink_domain_gpus}")
    if attn is not None and tp_errors(graph, lay.tp):
        out.append(f"tp {lay.tp} vs {attn.heads} heads / {attn.kv_heads} kv heads")
    if lay.zero not in ZERO_ORDER:
        out.append(f"ZeRO-{lay.zero} (search tries {', '.join(map(str, ZERO_ORDER))})")
    if lay.mbs not in MBS_CHOICES or per_dp % lay.mbs:
        out.append(f"mbs {lay.mbs} (search tries {', '.join(map(str, MBS_CHOICES))})")
    if lay.vpp not in (vpps := framework_choices(graph, training, lay.pp)[1]):
        out.append(f"vpp {lay.vpp} (search tries {', '.join(map(str, vpps))} at pp {lay.pp})")
    if lay.schedule == "gpipe":
        out.append("gpipe schedule")
    if lay.tp > 1 and not lay.sequence_parallel:
        out.append("sequence parallelism off")
    if lay.async_tp:
        out.append("async TP")
    return out


def why(row: Row) -> str:
    """One line on what separates the published layout from the planner's choice."""
    pub, lay = row.published, row.run.layout
    if row.planned is None:
        return "the search found no candidate"
    if not row.planned_fits:
        over = (row.planned.estimate.peak_memory_bytes - row.planned.estimate.memory_capacity_bytes) / GIB
        return f"no layout fits by our model (closest {short(row.planned.layout)}, {over:.1f} GiB over)"
    plan = row.planned.estimate
    parts = []
    if not pub.fits:
        parts.append(f"published does not fit by our model ({(pub.peak_memory_bytes - pub.memory_capacity_bytes) / GIB:.1f}"
                     f" GiB over: {pub.peak_memory_bytes / GIB:.1f} of {pub.memory_capacity_bytes / GIB:.1f})")
    pl = row.planned.layout
    if pl == lay and not row.planned.split and not row.planned.recompute:
        return "; ".join(parts + ["same layout"])
    diffs = {k: pub.time_breakdown.get(k, 0.0) - plan.time_breakdown.get(k, 0.0)
             for k in set(pub.time_breakdown) | set(plan.time_breakdown)}
    key = max(diffs, key=lambda k: abs(diffs[k]))
    step_diff = pub.step_time_s - plan.step_time_s
    if abs(diffs[key]) > 0 and abs(step_diff) / plan.step_time_s > TIE:
        parts.append(f"{key} {pub.time_breakdown.get(key, 0.0):.3g} s vs {plan.time_breakdown.get(key, 0.0):.3g} s "
                     f"({diffs[key]:+.3g} of the {step_diff:+.3g} s step difference)")
    elif abs(step_diff) / plan.step_time_s <= TIE:
        parts.append("a tie (within 0.1%)")
    changed = [k for k in ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "mbs", "recompute")
               if getattr(lay, k) != getattr(pl, k)]
    if changed:
        parts.append("differs in " + ", ".join(changed))
    if row.planned.split or row.planned.recompute:
        parts.append("planner uses an ILP stage split / per-block recompute")
    return "; ".join(parts)


def evaluate(run: CalibrationRun) -> Row:
    graph = graph_for(run)
    profile = load_profile(run.profile, gpu_memory_gib=run.gpu_memory_gib)
    run = fitting_layout(run, graph, profile)
    published = estimate(graph, run.layout, run.training, profile, recompute=run.recompute_blocks)
    # async TP is a runtime feature the search does not try on its own: where the run had it, both the
    # planner's search and the published degrees' get it
    features = {"async_tp": True} if run.layout.async_tp else {}
    result = search(graph, run.layout.gpus, run.training, profile, fixed=features or None)
    planned = result.best or result.closest
    row = Row(run=run, published=published, result=result, planned=planned, planned_fits=result.best is not None,
              outside=outside_space(run, graph, profile))
    lay = run.layout
    if row.same_tuple:
        row.fixed_probe, row.fixed_probe_note = planned, "the planner's own choice"
    else:
        fixed = {"tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "ep": lay.ep, "dp": lay.dp, **features}
        probe = search(graph, lay.gpus, run.training, profile, fixed=fixed)
        row.fixed_probe = probe.best
        row.fixed_probe_note = (f"{probe.tuples} tuple(s), {probe.priced} priced, {probe.pruned} pruned, "
                                f"best fitting {probe.best is not None}")
    return row


def render(rows: list[Row], skipped: list[tuple[str, str]], seconds: float) -> str:
    table = ["| run | GPUs | profile | prec | published layout | pub tok/s/GPU | pub fits | planner layout | "
             "planner tok/s/GPU | planner / pub | same (tp,pp,cp,ep) | pub within 5% | pub degrees, rest searched | "
             "degrees within 5% | why they differ | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lay = r.run.layout
        pub_mem = f"yes ({r.published.peak_memory_bytes / GIB:.0f}/{r.published.memory_capacity_bytes / GIB:.0f} GiB)" \
            if r.published.fits else f"**no** ({r.published.peak_memory_bytes / GIB:.0f}/" \
                                     f"{r.published.memory_capacity_bytes / GIB:.0f} GiB)"
        if r.outside:
            pub_mem += "; outside search space: " + ", ".join(r.outside)
        plan_lay = short(r.planned.layout) if r.planned else "-"
        if r.planned and not r.planned_fits:
            plan_lay = f"nothing fits (closest {plan_lay})"
        plan_tok = f"{r.plan_tok:,.0f}" if r.plan_tok else "-"
        ratio = f"{r.ratio:.3f}" if r.ratio else "-"
        flag = " **PUBLISHED FASTER**" if r.published_faster else ""
        mark = "*" if any(a.startswith("recompute=") for a in r.run.assumptions) else ""
        degrees = f"{short(r.fixed_probe.layout)} {r.degrees_tok:,.0f}" if r.fixed_probe else "nothing fits"
        table.append(
            f"| {r.run.id} | {lay.gpus} | {r.run.profile} | {r.run.training.precision} | {short(lay)}{mark} | "
            f"{r.pub_tok:,.0f} | {pub_mem} | {plan_lay} | {plan_tok} | {ratio}{flag} | "
            f"{'yes' if r.same_tuple else 'no'} | {'yes' if r.within else 'no'} | {degrees} | "
            f"{'yes' if r.degrees_within else 'no'} | {why(r)} | "
            f"{r.result.seconds:.2f} |")
    lines = ["# Plan quality on published training runs", "",
             "What the planner chooses for each published run (same GPUs, model, global batch, sequence length,",
             "precision and hardware profile, nothing fixed), against the layout the run used, both priced by our",
             "cost model. Throughputs are predictions, not measurements (docs/accuracy.md gives the model's error",
             "against the measured numbers). A run whose source does not state its recompute is priced with the",
             "lightest recompute that fits by our memory model, as in docs/accuracy.md.", "",
             "Command:", "", "```", COMMAND, "```", "",
             "## Summary", "", *summary_lines(rows), "", "## Per run", "",
             "`*`: recompute not stated by the source; the lightest that fits by our memory model. \"why they differ\"",
             "names the step-time component (seconds per step, the slowest stage's) that differs most.", "",
             *table, ""]
    bad = [r for r in rows if r.published_faster and r.published.fits]
    if bad:
        lines += ["## Published layout predicted faster than the planner's choice", ""]
        for r in bad:
            lines += probe_lines(r)
        lines.append("")
    if skipped:
        lines += ["Skipped runs:", "", *[f"- {rid}: {reason}" for rid, reason in skipped], ""]
    lines.append(f"({len(rows)} runs, {seconds:.0f} s in all)")
    return "\n".join(lines) + "\n"


def probe_lines(r: Row) -> list[str]:
    pub = r.published
    out = [f"- **{r.run.id}**: published {short(r.run.layout)} {r.pub_tok:,.0f} tok/s/GPU "
           f"(step {pub.step_time_s:.4g} s); planner "
           + (f"{short(r.planned.layout)} {r.plan_tok:,.0f} tok/s/GPU (step {r.planned.estimate.step_time_s:.4g} s)"
              if r.plan_tok else "found nothing that fits")
           + (f"; published layout is outside the search space ({', '.join(r.outside)})" if r.outside
              else "; published layout is inside the search space: SEARCH BUG")]
    if r.fixed_probe is not None:
        p = r.fixed_probe
        out.append(f"  - search with the published (tp, pp, cp, ep, dp) fixed: {short(p.layout)} "
                   f"{p.estimate.tokens_per_sec_per_gpu:,.0f} tok/s/GPU ({r.fixed_probe_note})")
    elif r.fixed_probe_note:
        out.append(f"  - search with the published (tp, pp, cp, ep, dp) fixed: {r.fixed_probe_note}")
    return out


def summary_lines(rows: list[Row]) -> list[str]:
    n = len(rows)
    fit = [r for r in rows if r.published.fits]
    same = sum(r.same_tuple for r in rows)
    within = sum(r.within for r in rows)
    degrees = sum(r.degrees_within for r in rows)
    agree = sum(r.same_tuple or r.degrees_within for r in rows)
    faster = [r for r in rows if r.published_faster]
    faster_fit = [r for r in faster if r.published.fits]
    bugs = [r for r in faster_fit if not r.outside]
    none_fit = [r for r in rows if not r.planned_fits]
    times = [r.result.seconds for r in rows]
    slowest = max(rows, key=lambda r: r.result.seconds)
    ratios = [r.ratio for r in rows if r.ratio and r.published.fits]
    near = sorted((r for r in rows if r.plan_tok and r.degrees_tok and not r.degrees_within
                   and r.plan_tok <= 1.08 * r.degrees_tok), key=lambda r: r.plan_tok / r.degrees_tok)
    out = [
        f"- published (tp, pp, cp, ep) chosen exactly: {same} of {n} runs ({same / n:.0%})",
        f"- published layout as run (every key) within 5% of the planner's predicted tokens/s/GPU (and fitting): "
        f"{within} of {n} ({within / n:.0%})",
        f"- published (tp, pp, cp, ep) with the planner's vpp, ZeRO stage, micro-batch and recompute within 5% of "
        f"the planner's choice: {degrees} of {n} ({degrees / n:.0%})",
        f"- **the planner picks the published (tp, pp, cp, ep) or one predicted within 5% of it: {agree} of {n} "
        f"({agree / n:.1%})** (issue 13's target: at least 60%, {math.ceil(0.6 * n)} of {n}); the closest "
        f"misses, planner / published degrees: " + (", ".join(f"{r.run.id} {r.plan_tok / r.degrees_tok:.3f}" for r in near)
                                                    or "none"),
        f"- published layout fits by our memory model: {len(fit)} of {n}; the planner finds no fitting layout "
        f"for {len(none_fit)}" + (f" ({', '.join(r.run.id for r in none_fit)})" if none_fit else ""),
        f"- published layout predicted FASTER than the planner's choice (its step ranks ahead at the search's 3 significant digits): {len(faster)} "
        f"of {n}; among runs whose published layout fits: **{len(faster_fit)}**"
        + (f" ({', '.join(r.run.id for r in faster_fit)})" if faster_fit else ""),
    ]
    if faster_fit:
        out.append(f"  - of which inside the search space (search bugs): **{len(bugs)}**"
                   + (f" ({', '.join(r.run.id for r in bugs)})" if bugs else ""))
    if ratios:
        out.append(f"- planner / published predicted throughput where the published fits: median "
                   f"{statistics.median(ratios):.3f}, max {max(ratios):.3f}")
    out.append(f"- search time: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
               f"({slowest.run.id}, {slowest.run.layout.gpus} GPUs, {slowest.result.tuples} tuples, "
               f"{slowest.result.priced} priced, {slowest.result.pruned} pruned)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the report (markdown) to this file")
    parser.add_argument("--only", nargs="*", help="only these run ids")
    args = parser.parse_args()
    t0 = time.perf_counter()
    runs, skipped = load_runs()
    if args.only:
        runs = [r for r in runs if r.id in set(args.only)]
    rows = []
    for run in runs:
        try:
            row = evaluate(run)
        except Exception as exc:  # noqa: BLE001 - report and go on: one bad run must not hide the rest
            skipped.append((run.id, f"failed: {type(exc).__name__}: {exc}"))
            print(f"{run.id}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        rows.append(row)
        print(f"{run.id}: published {short(row.run.layout)} {row.pub_tok:,.0f} (fits {row.published.fits}); "
              f"planner {short(row.planned.layout) if row.planned else '-'} "
              f"{row.plan_tok or 0:,.0f}; search {row.result.seconds:.2f} s"
              + ("  <-- PUBLISHED FASTER" if row.published_faster else ""), file=sys.stderr, flush=True)
    report = render(rows, skipped, time.perf_counter() - t0)
    bad = [r for r in rows if r.published_faster and r.published.fits]
    if bad:
        banner = "!" * 100
        print(banner, file=sys.stderr)
        print("PUBLISHED LAYOUT PREDICTED FASTER THAN THE PLANNER'S CHOICE (it fits by our model):", file=sys.stderr)
        for r in bad:
            print("\n".join(probe_lines(r)), file=sys.stderr)
        print(banner, file=sys.stderr)
    print(report)
    if args.write:
        args.write.write_text(report)


if __name__ == "__main__":
    main()
