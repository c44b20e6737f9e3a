"""Search over layouts: enumerate degree tuples, prune by a time floor, price with the cost model, and
refine the best few with the stage-assignment ILP (planner/search/ilp.py).

1. Degree tuples (tp, cp, pp, dp, ep) with tp x cp x pp x dp = N, any divisors (2,520 = 8 x 35 x 9 is
   real), under the constraints experts apply: tp inside one NVLink domain and dividing the attention
   heads (kv heads divide tp or tp divides them: replicated kv heads), cp dividing seq_len / 2 (two chunks
   per rank for causal balance), pp at most the blocks, ep dividing experts and dp x cp, dp dividing the
   global batch.
2. Floors, visited best first (one heap). A tuple's quick floor: m micro-batches through its slowest stage
   (at least the units' time over pp, and ceil(n / pp) units of each kind) with the least fill and drain,
   no pipeline priced (_quick_floor). When its turn comes, each of its (micro-batch,
   interleaving, schedule) choices gets its own floor: its pipeline time at the lightest recompute at which
   some ZeRO stage could fit in memory, inf when none could (_choice_floors; recompute, ZeRO-3,
   data-parallel traffic and the optimizer only add to a pipeline time). Once the least floor left ranks
   after the layouts a plan shows (the best and ALTERNATIVE_TUPLES more tuples), everything left is pruned
   unpriced, so the plan and its alternatives are exact (tests/planning/test_search_exact.py).
3. A choice's turn: its ZeRO stages and recompute modes from the cheapest up, stopping at the first that fits
   (a heavier one only costs time); memory is asked before time, and an option whose floor ranks after the
   tuple's best or the last layout shown is skipped (_first_fit).
4. The best distinct degree tuples are re-solved by the ILP (stage split and per-block recompute), which
   may recover time the uniform split lost (e.g. less recompute on late 1F1B stages), and ranked again.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any

from autoshard.cost_models import communication as comm
from autoshard.cost_models.estimate import Estimate, estimate, kind_times, peak_memory, pipeline_time
from autoshard.cost_models.framework import get_framework
from autoshard.cost_models.layout import MULTI_CHUNK_SCHEDULES, RECOMPUTE, Layout, Training
from autoshard.cost_models.pipeline import fill_drain
from autoshard.cost_models.validity import TORCH_SCHEDULES, cp_errors, layout_errors, tp_errors
from autoshard.cost_models.work import UnitWork, model_work
from autoshard.hardware_profiles import Profile
from autoshard.planner.capture.model_graph import ModelGraph

MBS_CHOICES = (1, 2, 4, 8)
VPP_CHOICES = (1, 2, 4, 8)
ZERO_ORDER = (0, 1, 2, 3)
"""Every stage: ZeRO-1's reduce-scatter + all-gather move what plain DP's all-reduce moves, but across many
nodes NCCL runs the all-reduce as a tree (log-depth latency) and the other two as rings, so ZeRO-0 can win
where the optimizer state fits unsharded (communication.all_reduce)."""
ILP_CANDIDATES = 2
LARGE_ILP_CHUNKS = 48
"""Past this many model chunks (pp x vpp) a stage ILP takes CBC seconds (Korthikanti's 530B at pp 35 x vpp 2:
4-10 s CPU each): only the best candidate gets one, so that a plan stays under 10 s."""
ALTERNATIVE_TUPLES = 5


@dataclass(kw_only=True, slots=True)
class Candidate:
    layout: Layout
    estimate: Estimate
    split: list[int] | None = None
    recompute: dict[str, str] | None = None


@dataclass(kw_only=True, slots=True)
class SearchResult:
    best: Candidate | None
    ranked: list[Candidate]
    """Distinct layouts, fitting first, fastest first (the best included)."""
    closest: Candidate | None
    """When nothing fits: the layout that misses the memory limit by the least."""
    tuples: int = 0
    priced: int = 0
    pruned: int = 0
    ilp_solved: int = 0
    ilp_skipped: int = 0
    """Candidates the ILP was not run on: nothing recomputed and no split beats the even one (ilp.lower_bound)."""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def search(graph: ModelGraph, gpus: int, training: Training, profile: Profile,
           fixed: dict[str, Any] | None = None) -> SearchResult:
    """Best layout for `gpus` GPUs; `fixed` holds layout keys the user gave (they are kept)."""
    start = time.perf_counter()
    fixed = dict(fixed or {})
    work = model_work(graph)
    memo: dict = {"work": work}  # estimate's: equal stages of different layouts are priced once
    tuples = degree_tuples(graph, gpus, training, profile, fixed)
    result = SearchResult(best=None, ranked=[], closest=None, tuples=len(tuples))
    found: list[Candidate] = []
    shown: dict[tuple[int, int, int, int, int], float] = {}  # degree tuple -> its fastest fitting step time
    # Best first. A tuple waits under its quick floor; its turn prices the floor of each of its (micro-batch,
    # interleaving, schedule) choices (_choice_floors), and each choice waits under its own floor; a choice's
    # turn prices its ZeRO and recompute options (_price_choice). No layout is faster than the floors it sits
    # under, so once the least floor left ranks after the layouts a plan shows, everything left is pruned.
    heap: list[tuple[float, int, tuple[int, int, int, int, int], tuple]] = [
        (_quick_floor(graph, work, d, training, profile, fixed, memo), 0, d, ()) for d in tuples]
    heapq.heapify(heap)
    unfit: set[tuple[int, int, int, int, int]] = set()  # tuples with choices that fit nowhere (floor inf)
    dead: dict[tuple, int] = {}  # (tuple, vpp, schedule) -> least micro-batch at which none of it fits
    visited: set[tuple[int, int, int, int, int]] = set()
    while heap:
        floor, level, degrees, choice = heapq.heappop(heap)
        last = _last_shown(shown)
        if _ranks_after(floor, last):
            break
        if level == 0:
            for choice, choice_floor in _choice_floors(graph, work, degrees, training, profile, fixed, memo):
                if choice_floor == math.inf:
                    unfit.add(degrees)
                else:
                    heapq.heappush(heap, (choice_floor, 1, degrees, choice))
            continue
        mbs, vpp, schedule = choice
        if dead.get((degrees, vpp, schedule), math.inf) <= mbs:
            continue  # a smaller micro-batch fits nowhere: this one holds more (_lightest_fitting)
        visited.add(degrees)
        cand, none_fit = _price_choice(graph, work, degrees, choice, training, profile, fixed, result, memo,
                                       min(shown.get(degrees, math.inf), last))
        if none_fit:
            dead[degrees, vpp, schedule] = min(mbs, dead.get((degrees, vpp, schedule), math.inf))
        if cand is not None:
            found.append(cand)
            if cand.estimate.fits:
                shown[degrees] = min(shown.get(degrees, math.inf), cand.estimate.step_time_s)
    result.pruned = len(set(tuples) - visited)  # neither the plan nor its alternatives
    if not shown:  # nothing fits: price every choice left for the layout closest to fitting
        for degrees in unfit:
            found += _inner(graph, work, degrees, training, profile, fixed, result, memo)
    fits = sorted((c for c in found if c.estimate.fits), key=_rank_key)
    _refine(graph, work, fits, training, profile, result, fixed, memo)
    fits = sorted(fits, key=_rank_key)
    result.ranked = _distinct(fits)
    result.best = result.ranked[0] if result.ranked else None
    if result.best is None and found:
        result.closest = min(found, key=lambda c: c.estimate.peak_memory_bytes - c.estimate.memory_capacity_bytes)
    result.seconds = time.perf_counter() - start
    return result


def _last_shown(fastest: dict[tuple[int, int, int, int, int], float]) -> float:
    """The step time of the last tuple a plan shows (the best and ALTERNATIVE_TUPLES more, one layout per
    tuple) among those priced so far: a candidate that ranks after it is never shown, nor its tuple's best."""
    times = sorted(fastest.values())
    return times[ALTERNATIVE_TUPLES] if len(times) > ALTERNATIVE_TUPLES else math.inf


def degree_tuples(graph: ModelGraph, gpus: int, training: Training, profile: Profile,
                  fixed: dict[str, Any]) -> list[tuple[int, int, int, int, int]]:
    """(tp, cp, pp, dp, ep) under the constraints of the module docstring, `fixed` keys honoured.

    Preferences (TP inside one NVLink domain) only narrow what the planner chooses itself; a degree the
    user fixed is taken whenever the frameworks accept it. Raises InvalidLayout naming the rules broken
    when the fixed keys leave no valid tuple."""
    blocks = len(graph.blocks)
    moe = next((b.moe for b in graph.blocks if b.moe), None)
    runs = get_framework(training.framework).dims  # a parallelism the framework lacks stays at 1

    def degrees(dim: str, n: int) -> list[int]:
        return _choices(dim, divisors(n) if dim in runs else [1], fixed)

    out, broken = [], []
    for tp in degrees("tp", gpus):
        if "tp" not in fixed and tp > profile.nvlink_domain_gpus:
            continue
        if gpus % tp:
            broken.append(f"degrees multiply to the GPUs: tp({tp}) does not divide the {gpus} GPUs")
            continue
        if tp_errors(graph, tp):
            broken += tp_errors(graph, tp)
            continue
        for cp in degrees("cp", gpus // tp):
            if (gpus // tp) % cp:
                broken.append(f"degrees multiply to the GPUs: tp({tp}) x cp({cp}) does not divide the {gpus} GPUs")
                continue
            if errors := cp_errors(training.seq_len, cp):
                broken += errors
                continue
            for pp in degrees("pp", gpus // (tp * cp)):
                if (gpus // (tp * cp)) % pp:
                    broken.append(f"degrees multiply to the GPUs: tp({tp}) x cp({cp}) x pp({pp}) does not divide "
                                  f"the {gpus} GPUs")
                    continue
                dp = gpus // (tp * cp * pp)
                if "dp" in fixed and fixed["dp"] != dp:
                    broken.append(f"degrees multiply to the GPUs: tp({tp}) x cp({cp}) x pp({pp}) x dp({fixed['dp']}) "
                                  f"!= {gpus}")
                    continue
                if pp * fixed.get("vpp", 1) > blocks or training.global_batch % (dp * fixed.get("mbs", 1)):
                    broken += layout_errors(graph, Layout(tp=tp, cp=cp, pp=pp, dp=dp, vpp=fixed.get("vpp", 1),
                                                          mbs=fixed.get("mbs", 1),
                                                          schedule="interleaved_1f1b"), training)
                    continue
                for ep in degrees("ep", dp * cp) if moe else _choices("ep", [1], fixed):
                    if ep > 1 and (moe is None or moe.num_experts % ep or (dp * cp) % ep):
                        have = f"{moe.num_experts} experts" if moe else "no experts"
                        broken.append(f"whole experts per rank: ep({ep}) must divide the experts ({have}) "
                                      f"and dp x cp ({dp * cp})")
                        continue
                    out.append((tp, cp, pp, dp, ep))
    if not out and fixed:
        given = ",".join(f"{k}={v}" for k, v in fixed.items())
        rules = "; ".join(dict.fromkeys(broken)) or f"tp x cp x pp must divide the {gpus} GPUs"
        raise InvalidLayout(f"--layout {given} cannot run on {gpus} GPUs: {rules}.")
    return out


class InvalidLayout(ValueError):
    """The fixed layout keys break a rule the frameworks enforce (named in the message)."""


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _choices(key: str, values: list[int], fixed: dict[str, Any]) -> list[int]:
    """The fixed value when the user gave one (whatever the planner would have tried), else `values`."""
    return [fixed[key]] if key in fixed else values


def _choice_floors(graph: ModelGraph, work: list[UnitWork], degrees: tuple[int, int, int, int, int],
                   training: Training, profile: Profile, fixed: dict[str, Any],
                   memo: dict) -> list[tuple[tuple[int, int, str], float]]:
    """Each (micro-batch, interleaving, schedule) choice of the tuple (_combos) with the seconds per step no
    layout of it that fits beats: its pipeline time at the lightest recompute that could fit
    (_lightest_fitting); inf when none could. ZeRO-3, the data-parallel traffic and the optimizer only add to
    a pipeline time, heavier recompute too (estimate.pipeline_time)."""
    tp, cp, pp, dp, ep = degrees
    choices = _combos(graph, degrees, training, fixed)
    lightest = _lightest_fitting(graph, work, degrees, choices, training, profile, fixed, memo)
    out = []
    for mbs, vpp, schedule in choices:
        recompute = lightest[mbs, vpp, schedule]
        floor = math.inf if recompute is None else pipeline_time(
            graph, Layout(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, mbs=mbs, vpp=vpp, schedule=schedule, zero=1,
                          recompute=recompute, **_flags(fixed)), training, profile, work=work, memo=memo)
        out.append(((mbs, vpp, schedule), floor))
    return out


def _lightest_fitting(graph: ModelGraph, work: list[UnitWork], degrees: tuple[int, int, int, int, int],
                      choices: list[tuple[int, int, str]], training: Training, profile: Profile,
                      fixed: dict[str, Any], memo: dict) -> dict[tuple[int, int, str], str | None]:
    """Each choice of `choices` -> the lightest recompute at which some layout of the tuple with it could fit
    in memory, None when none could: at the leanest ZeRO stages, the highest below 3 (stages 0-2 differ only
    in what they shard) and 3. A larger micro-batch holds more (model states alike; activations, logits and
    in-flight micro-batches x micro-batch size never shrink: pipeline.in_flight), so its lightest recompute is
    sought from the smaller one's on."""
    tp, cp, pp, dp, ep = degrees
    zeros = _choices("zero", framework_choices(graph, training, pp)[0], fixed)
    below = [z for z in zeros if z < 3]
    lean = ([max(below)] if below else []) + ([3] if 3 in zeros else [])
    modes = _choices("recompute", list(RECOMPUTE), fixed)

    def fits(mbs: int, vpp: int, schedule: str, recompute: str) -> bool:
        return any(peak_memory(graph, Layout(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, mbs=mbs, vpp=vpp, schedule=schedule,
                                             zero=z, recompute=recompute, **_flags(fixed)), training, work=work,
                               memo=memo) <= profile.hbm_bytes for z in lean)

    out: dict[tuple[int, int, str], str | None] = {}
    first = dict.fromkeys(((v, sch) for _, v, sch in choices), 0)  # (vpp, schedule) -> first mode to ask
    for mbs, vpp, schedule in sorted(choices):
        start = first[vpp, schedule]
        at = next((i for i in range(start, len(modes)) if fits(mbs, vpp, schedule, modes[i])), len(modes))
        out[mbs, vpp, schedule] = modes[at] if at < len(modes) else None
        first[vpp, schedule] = at
    return out


def _quick_floor(graph: ModelGraph, work: list[UnitWork], degrees: tuple[int, int, int, int, int],
                 training: Training, profile: Profile, fixed: dict[str, Any], memo: dict) -> float:
    """A floor under the tuple's choice floors that prices no pipeline. A step of m micro-batches takes m
    times the slowest stage and the least fill and drain times the mean one (pipeline.step_time), with no
    recompute; the mean stage holds the units' time over pp, the slowest at least that, and at least
    ceil(n / pp) of the n units of each kind (some stage holds that many, whatever the split); the sends
    between stages are left out."""
    tp, cp, pp, dp, ep = degrees
    choices = _combos(graph, degrees, training, fixed)
    fill = min((fill_drain(pp, vpp, schedule) for _, vpp, schedule in choices), default=0.0)
    out = math.inf
    for mbs in dict.fromkeys(mbs for mbs, _, _ in choices):
        m = training.global_batch // (dp * mbs)
        key = ("quick", tp, cp, ep, mbs)  # one micro-batch at ZeRO-1: no pipeline or data-parallel degree in it
        if key not in memo:
            whole = Layout(tp=tp, cp=cp, pp=1, dp=dp, ep=ep, mbs=mbs, zero=1, recompute="none", **_flags(fixed))
            kinds = kind_times(graph, whole, training, profile, work=work, memo=memo)
            memo[key] = sum(n * t for n, t in kinds), kinds
        total, kinds = memo[key]
        slowest = max([total / pp] + [-(-n // pp) * t for n, t in kinds])
        out = min(out, (m * slowest + fill * total / pp) * (1 - 1e-9))  # sums in another order: rounding
    return out


def _flags(fixed: dict[str, Any]) -> dict[str, Any]:
    """The layout switches the user fixed (sequence parallelism, async TP): every layout tried keeps them."""
    return {k: v for k, v in fixed.items() if k in ("sequence_parallel", "async_tp")}


def _combos(graph: ModelGraph, degrees: tuple[int, int, int, int, int], training: Training,
            fixed: dict[str, Any]) -> list[tuple[int, int, str]]:
    """The (micro-batch, interleaving, schedule) choices of a tuple, micro-batch by micro-batch."""
    pp, dp = degrees[2], degrees[3]
    vpps = _choices("vpp", framework_choices(graph, training, pp)[1], fixed)
    return [(mbs, vpp, schedule) for mbs in _mbs_options(training.global_batch // dp, fixed) for vpp in vpps
            for schedule in _schedules(pp, vpp, training, fixed)]


def _mbs_options(per_dp: int, fixed: dict[str, Any]) -> list[int]:
    return _choices("mbs", [b for b in MBS_CHOICES if per_dp % b == 0], fixed) or [1]


def _inner(graph: ModelGraph, work: list[UnitWork], degrees: tuple[int, int, int, int, int], training: Training,
           profile: Profile, fixed: dict[str, Any], result: SearchResult, memo: dict) -> list[Candidate]:
    """Every micro-batch, interleaving and schedule choice of one tuple, each with the cheapest ZeRO/recompute
    that fits or, where none does, the layout closest to fitting (the search's report when nothing fits)."""
    out = []
    for choice in _combos(graph, degrees, training, fixed):
        cand, _ = _price_choice(graph, work, degrees, choice, training, profile, fixed, result, memo)
        out += [cand] if cand is not None else []
    return out


def _price_choice(graph: ModelGraph, work: list[UnitWork], degrees: tuple[int, int, int, int, int],
                  choice: tuple[int, int, str], training: Training, profile: Profile, fixed: dict[str, Any],
                  result: SearchResult, memo: dict, bar: float = math.inf) -> tuple[Candidate | None, bool]:
    """One (micro-batch, interleaving, schedule) choice of a tuple: its valid ZeRO and recompute options
    (the rules broken by the others noted in `result`) through _first_fit, which skips what ranks after `bar`.
    Returns _first_fit's (candidate, whether none fits)."""
    tp, cp, pp, dp, ep = degrees
    mbs, vpp, schedule = choice
    zeros = framework_choices(graph, training, pp)[0]
    if 0 in zeros and 1 in zeros and comm.domains(comm.Group(size=dp * cp, stride=tp), profile) == 1:
        zeros.remove(0)  # inside one NVLink domain the all-reduce is a ring: ZeRO-1 moves as much, holds less
    layouts = [Layout(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, mbs=mbs, vpp=vpp, schedule=schedule, zero=z, recompute=r,
                      **_flags(fixed))
               for z in _choices("zero", zeros, fixed) for r in _choices("recompute", list(RECOMPUTE), fixed)]
    by_zero: dict[int, list[str]] = {}  # no rule looks at the recompute: one check per ZeRO stage
    for lay in layouts:
        if lay.zero not in by_zero:
            by_zero[lay.zero] = layout_errors(graph, lay, training)
    result.notes += [e for e in dict.fromkeys(e for errs in by_zero.values() for e in errs) if e not in result.notes]
    layouts = [lay for lay in layouts if not by_zero[lay.zero]]
    if not layouts:
        return None, False
    return _first_fit(graph, work, layouts, training, profile, result, memo, bar)


def framework_choices(graph: ModelGraph, training: Training, pp: int) -> tuple[list[int], list[int]]:
    """The ZeRO stages and interleaving degrees to try under the framework (validity.framework_errors):
    ZERO_ORDER's stages it runs, and vpp > 1 only
    where it interleaves (under a framework with even chunks only, every vpp dividing the blocks per stage)."""
    fw = get_framework(training.framework)
    zeros = [z for z in ZERO_ORDER if z in fw.zero_stages and (pp == 1 or z <= fw.zero_with_pp)]
    blocks = sum(u.kind == "block" for u in graph.units)
    if fw.even_stages:  # only even splits run: every vpp that divides the blocks per stage (up to 8)
        vpps = [v for v in range(1, 9) if (v == 1 or (pp > 1 and fw.interleaved)) and blocks % (pp * v) == 0]
    else:
        vpps = [v for v in VPP_CHOICES if (v == 1 or (pp > 1 and fw.interleaved)) and pp * v <= blocks]
    return zeros, vpps or [1]


def _schedules(pp: int, vpp: int, training: Training, fixed: dict[str, Any]) -> list[str]:
    """The pipeline schedules to try at this interleaving: 1F1B (interleaved when vpp > 1), and where the
    framework runs torch's pipelining the zero-bubble ones (zb_interleaved; zbv at vpp = 2); a fixed one only."""
    default = "interleaved_1f1b" if vpp > 1 else "1f1b"
    if "schedule" in fixed:
        return [fixed["schedule"]] if fixed["schedule"] in MULTI_CHUNK_SCHEDULES or vpp == 1 else []
    if pp == 1 or training.framework not in TORCH_SCHEDULES:
        return [default]
    return [default, "zb_interleaved", *(["zbv"] if vpp == 2 else [])]


def _first_fit(graph: ModelGraph, work: list[UnitWork], layouts: list[Layout], training: Training,
               profile: Profile, result: SearchResult, memo: dict,
               fastest: float = math.inf) -> tuple[Candidate | None, bool]:
    """For each ZeRO stage, the lightest recompute that fits (heavier ones only cost time); the fastest of
    those. When none fits, the layout closest to fitting (kept for the no-fit report). Also whether every
    layout was asked and none fits.

    Memory is asked first (peak_memory): a layout that does not fit is not priced further, nor one that
    holds more than another that does not fit (ZeRO 0-2 differ only in sharded model states, so ZeRO-2
    needs the least of them at each recompute: _lean_fits). A layout is
    skipped when it cannot rank ahead of `fastest` (the tuple's fastest so far) or of the one that fits:
    ZeRO stages below 3 share their stage times, ZeRO-3 and recompute only add to them, so the pipeline
    time (the step less the DP traffic and optimizer, which depend on both) of a ZeRO < 3 layout priced at
    the same or a lighter recompute is a floor for it. The tuple's best candidate stays the same."""
    best: Candidate | None = None
    peaks: dict[Layout, float] = {}  # what peak_memory said here
    done: set[int] = set()
    skipped = False
    # recompute mode -> pipeline time of a ZeRO < 3 layout with it; at none, a floor for every layout here
    lightest = dataclasses.replace(layouts[0], zero=1, recompute="none")
    floors = {"none": pipeline_time(graph, lightest, training, profile, work=work, memo=memo)}
    for layout in layouts:  # ordered by ZeRO stage, then recompute from none to full
        if layout.zero in done:
            continue
        heavy = RECOMPUTE.index(layout.recompute)
        floor = max((t for r, t in floors.items() if RECOMPUTE.index(r) <= heavy), default=0.0)
        if _ranks_after(floor, fastest if best is None else min(fastest, best.estimate.step_time_s)):
            skipped = True
            continue
        result.priced += 1
        if not _lean_fits(graph, work, layout, layouts, training, profile, memo, peaks):
            continue
        est = estimate(graph, layout, training, profile, work=work, validate=False, memo=memo)  # _inner validated it
        if not est.fits:  # at the limit, to the last bit
            peaks[layout] = est.peak_memory_bytes
            continue
        if layout.zero < 3:
            floors[layout.recompute] = pipeline_time(graph, layout, training, profile, work=work, memo=memo)
        done.add(layout.zero)
        if best is None or est.step_time_s < best.estimate.step_time_s:
            best = Candidate(layout=layout, estimate=est)
    if best is None and peaks:
        layout = min(peaks, key=peaks.__getitem__)
        return Candidate(layout=layout, estimate=estimate(graph, layout, training, profile, work=work,
                                                          validate=False, memo=memo)), not skipped
    return best, best is None and not skipped


def _lean_fits(graph: ModelGraph, work: list[UnitWork], layout: Layout, layouts: list[Layout],
               training: Training, profile: Profile, memo: dict, peaks: dict[Layout, float]) -> bool:
    """Whether `layout` fits in memory, asking the leanest of its ZeRO 0-2 siblings in `layouts` (same
    recompute) first: when that one does not fit, neither does `layout`, which only holds more model states."""
    lean = max((lay for lay in layouts if lay.zero < 3 and lay.recompute == layout.recompute),
               key=lambda lay: lay.zero, default=layout) if layout.zero < 3 else layout
    for lay in dict.fromkeys((lean, layout)):
        if lay not in peaks:
            peaks[lay] = peak_memory(graph, lay, training, work=work, memo=memo)
        if peaks[lay] > profile.hbm_bytes:
            return False
    return True


def _refine(graph: ModelGraph, work: list[UnitWork], fits: list[Candidate], training: Training,
            profile: Profile, result: SearchResult, fixed: dict[str, Any], memo: dict) -> None:
    """Re-solve the best few distinct layouts with the ILP (and the heavier-recompute ones, whose uniform
    recompute the ILP can relax block by block)."""
    for i, cand in enumerate(_distinct(fits)[:ILP_CANDIDATES]):
        if cand.layout.pp == 1 and cand.layout.recompute == "none":
            continue  # one stage, nothing recomputed: the uniform plan is already the ILP's optimum
        if i > 0 and cand.layout.pp * cand.layout.vpp > LARGE_ILP_CHUNKS:
            continue
        if get_framework(training.framework).even_stages:
            continue  # the ILP's uneven stage split would not run there
        # imported here, not at the top: PuLP takes 0.1-0.25 s to import, and most plans need no ILP
        from autoshard.planner.search.ilp import StageILP

        modes = (fixed["recompute"],) if "recompute" in fixed else RECOMPUTE
        ilp = StageILP(work, dataclasses.replace(cand.layout, recompute="none"), training, profile, modes=modes)
        if cand.layout.recompute == "none" and ilp.even_split_is_optimal():
            result.ilp_skipped += 1  # nothing recomputed and no split beats the even one: nothing to find
            continue
        assignment = ilp.build().solve()
        result.ilp_solved += 1
        if assignment is None:
            continue
        layout = dataclasses.replace(cand.layout, recompute=_dominant(assignment.recompute))
        est = estimate(graph, layout, training, profile, split=assignment.split, recompute=assignment.recompute,
                       work=work, memo=memo)
        if est.fits and est.step_time_s < cand.estimate.step_time_s:
            cand.layout, cand.estimate = layout, est
            cand.split, cand.recompute = assignment.split, assignment.recompute


def _ranks_after(floor: float, step_time_s: float) -> bool:
    """Whether any layout no faster than `floor` ranks after one of `step_time_s` (_rank_key compares step
    times to 3 significant digits, so a near tie may still win on simplicity)."""
    return float(f"{floor:.3g}") > float(f"{step_time_s:.3g}")


def _dominant(modes: dict[str, str]) -> str:
    """The layout-level recompute: the mode most blocks use (per-block exceptions live in the plan)."""
    counts = {m: 0 for m in RECOMPUTE}
    for m in modes.values():
        counts[m] += 1
    return max(RECOMPUTE, key=lambda m: (counts[m], -RECOMPUTE.index(m)))


def rank_step(step_time_s: float) -> float:
    """A step time as the search ranks it: to 3 significant digits, finer than the model can tell apart."""
    return float(f"{step_time_s:.3g}")


def _rank_key(c: Candidate) -> tuple:
    """Fastest first (rank_step); among equals the simpler layout (less CP, then PP, TP, EP), then less
    memory, then the layout string (deterministic)."""
    lay = c.layout
    return (rank_step(c.estimate.step_time_s), lay.cp, lay.pp * lay.vpp, lay.tp, lay.ep,
            round(c.estimate.peak_memory_bytes), lay.to_string())


def _distinct(cands: list[Candidate]) -> list[Candidate]:
    """One candidate per degree tuple (the fastest), so alternatives differ in more than a micro-batch."""
    seen: set[tuple] = set()
    out = []
    for c in cands:
        key = (c.layout.tp, c.layout.cp, c.layout.pp, c.layout.dp, c.layout.ep)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
