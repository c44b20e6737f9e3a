"""`autoshard.plan(model, gpus=64, profile="h100_ib")`: capture, search, and the Plan, in one call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoshard.cost_models.estimate import estimate
from autoshard.cost_models.layout import Training, complete, parse_layout
from autoshard.hardware_profiles import Profile, UnknownProfileError, load_profile
from autoshard.planner.capture.cache import captured
from autoshard.planner.capture.loading import LoadedModel, load_model
from autoshard.planner.errors import UserError
from autoshard.planner.outputs.plan import Plan, build_plan
from autoshard.planner.search.layouts import InvalidLayout, SearchResult, search

if TYPE_CHECKING:
    from torch import nn

FULL_LAYOUT = ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "mbs", "recompute")
ALTERNATIVES = 5


class NoFitError(UserError):
    """No layout fits in memory: the message gives the smallest shortfall and what would fit."""

    exit_code = 3


def plan(model: nn.Module | str | Path, *, gpus: int, profile: str | Path | Profile,
         global_batch: int | None = None, seq_len: int | None = None, micro_batch: int | None = None,
         precision: str | None = None, layout: str | dict[str, Any] | None = None,
         gpu_memory_gib: float | None = None, framework: str = "torch", grad_reduce: str | None = None,
         cache: bool = True) -> Plan:
    """The best layout of `model` on `gpus` GPUs of `profile`, as a Plan.

    `layout` fixes some keys (a layout string or dict) and the planner chooses the rest; with every key
    given it only estimates. `framework` is what will run the plan (cost_models/framework.py: torch, the
    default, is apply_plan itself; torchtitan, megatron, deepspeed, nanotron); `grad_reduce` (fp32 or bf16)
    overrides its gradient buffer and reduction dtype. `cache` False captures a spec again rather than read
    its graph from the capture cache (planner/capture/cache.py). Raises UserError on bad input
    and NoFitError when nothing fits.
    """
    if gpus < 1:
        raise UserError(f"gpus must be a positive integer, got {gpus}")
    prof = _profile(profile, gpu_memory_gib)
    loaded = load_model(model)
    fixed = _fixed(layout, micro_batch)
    training = _training(loaded, global_batch, seq_len, precision, fixed, gpus, framework, grad_reduce)
    graph = captured(loaded, 1, training.seq_len, cache=cache)  # a spec planned before is read back
    start = time.perf_counter()
    if all(k in fixed for k in FULL_LAYOUT):
        return _estimate_only(graph, fixed, gpus, training, prof, start)
    try:
        result = search(graph, gpus, training, prof, fixed)
    except InvalidLayout as exc:
        raise UserError(str(exc)) from exc
    if result.best is None and result.closest is None and result.notes:
        raise UserError(f"--layout {layout}: no layout with these keys can run on {gpus} GPUs: "
                        f"{'; '.join(result.notes)}.")
    if result.best is None:
        raise NoFitError(_no_fit_message(graph, gpus, training, prof, fixed, result))
    best = result.best
    alternatives = [c.estimate for c in result.ranked[1:1 + ALTERNATIVES]]
    return build_plan(graph, best.estimate, prof, alternatives=alternatives, solver=_solver_name(result),
                      solve_time_s=round(time.perf_counter() - start, 3), split=best.split, recompute=best.recompute)


def _profile(profile: str | Path | Profile, gpu_memory_gib: float | None) -> Profile:
    if isinstance(profile, Profile):
        return profile if gpu_memory_gib is None else profile.replace(hbm_bytes=gpu_memory_gib * 2**30)
    try:
        return load_profile(profile, gpu_memory_gib=gpu_memory_gib)
    except (UnknownProfileError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def _fixed(layout: str | dict[str, Any] | None, micro_batch: int | None) -> dict[str, Any]:
    try:
        fixed = parse_layout(layout) if isinstance(layout, str) else dict(layout or {})
    except ValueError as exc:
        raise UserError(f"--layout: {exc}.") from exc
    if "micro_batch" in fixed:
        fixed["mbs"] = fixed.pop("micro_batch")
    if micro_batch is not None:
        fixed.setdefault("mbs", micro_batch)
    return fixed


def _training(loaded: LoadedModel, global_batch: int | None, seq_len: int | None, precision: str | None,
              fixed: dict[str, Any], gpus: int, framework: str = "torch", grad_reduce: str | None = None) -> Training:
    spec = loaded.training
    batch = global_batch or getattr(spec, "global_batch_sequences", None)
    if batch is None:
        raise UserError(f"give the global batch (--global-batch, sequences per optimizer step), e.g. "
                        f"--global-batch {max(gpus, 8) * 4}; the model names none.")
    try:
        return Training(global_batch=batch, seq_len=seq_len or loaded.seq_len,
                        precision=precision or getattr(spec, "precision", None) or "bf16", framework=framework,
                        grad_reduce=grad_reduce)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _estimate_only(graph: Any, fixed: dict[str, Any], gpus: int, training: Training, prof: Profile,
                   start: float) -> Plan:
    try:
        layout = complete(fixed, gpus)
        est = estimate(graph, layout, training, prof)
    except ValueError as exc:
        raise UserError(f"--layout {fixed}: {exc}.") from exc
    return build_plan(graph, est, prof, solver="none (layout given)",
                      solve_time_s=round(time.perf_counter() - start, 3))


def _solver_name(result: SearchResult) -> str:
    return (f"enumeration of {result.tuples} degree tuples ({result.pruned} pruned by bound, {result.priced} "
            f"layouts priced) + stage ILP on {result.ilp_solved} (PuLP)"
            + (f", {result.ilp_skipped} with no split better than the even one" if result.ilp_skipped else ""))


def _no_fit_message(graph: Any, gpus: int, training: Training, prof: Profile, fixed: dict[str, Any],
                    result: SearchResult) -> str:
    """The smallest shortfall, and what would fit: more GPUs (searched), ZeRO-3 / full recompute (already
    in the search unless fixed), a shorter sequence."""
    lines = [f"no layout of {graph.name} fits on {gpus} GPUs of {prof.name} "
             f"({prof.hbm_bytes / 2**30:.1f} GiB each)."]
    closest = result.closest
    if closest is not None:
        est = closest.estimate
        over = (est.peak_memory_bytes - est.memory_capacity_bytes) / 2**30
        lines.append(f"The closest, {closest.layout.to_string()}, needs {est.peak_memory_bytes / 2**30:.1f} GiB "
                     f"per GPU: {over:.1f} GiB over.")
    for factor in (2, 4, 8):
        try:
            more = search(graph, gpus * factor, training, prof, {k: v for k, v in fixed.items() if k != "dp"})
        except InvalidLayout:
            continue
        if more.best is not None:
            lines.append(f"It fits on {gpus * factor} GPUs: {more.best.layout.to_string()}.")
            break
    if "zero" in fixed or "recompute" in fixed:
        lines.append("ZeRO-3 and full recompute would cut memory; the fixed layout keys exclude them.")
    else:
        lines.append("ZeRO-3 and full recompute were already searched.")
    lines.append(f"A shorter sequence than {training.seq_len} (--seq-len) cuts activation memory.")
    return " ".join(lines)
