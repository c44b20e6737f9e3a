"""Accuracy of the cost model on published training runs, with leave-one-group-out cross-validation.

For every calibration run (../shared/calibration/published_runs_dev.yaml, read by calibration_runs.py):
capture the model on meta at the run's sequence length, estimate the run's own layout on its hardware
profile, and compare predicted with measured tokens/s/GPU (and peak memory where the source gives it).

The few global coefficients (GEMM efficiency per GPU family; GEMM half-size, attention efficiency and
network efficiency shared by all) are fitted by minimising the mean absolute log error. Cross-validation refits
them with one source group left out and predicts that group, so every reported CV error is on runs the
coefficients never saw.

    .venv/bin/python benchmarks/accuracy.py [--write docs/accuracy.md] [--no-cv]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
import pickle
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoshard.cost_models.estimate import estimate  # noqa: E402
from autoshard.cost_models.framework import Framework, get_framework, kernel_family  # noqa: E402
from autoshard.cost_models.layout import Layout  # noqa: E402
from autoshard.cost_models.pipeline import split_blocks  # noqa: E402
from autoshard.hardware_profiles import Profile, load_profile  # noqa: E402
from autoshard.planner.capture.loading import LoadedModel, token_inputs  # noqa: E402
from autoshard.planner.capture.model_graph import ModelGraph  # noqa: E402
from autoshard.planner.capture.reference_model import build_reference_model  # noqa: E402
from autoshard.planner.capture.spec import parse_spec  # noqa: E402
from autoshard.planner.capture.trace import capture  # noqa: E402
from autoshard.planner.search.layouts import framework_choices  # noqa: E402
from benchmarks.calibration_runs import VPP_UNSTATED, CalibrationRun, load_runs  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
FAMILY_KEYS = ("gemm_efficiency_max",)
FRAMEWORK_KEY = "kernel_efficiency"
MIN_FRAMEWORK_RUNS = 3
"""A framework's kernel efficiency is fitted only on at least this many runs (else its prior stays);
Megatron + TE is the reference (1 by definition), so it is never fitted."""
GLOBAL_KEYS = ("gemm_half_flops", "attention_efficiency", "network_scale")
BOUNDS = {
    "gemm_efficiency_max": (0.3, 0.95),
    "gemm_half_flops": (1e7, 1e11),
    "attention_efficiency": (0.2, 1.2),
    "network_scale": (0.2, 1.5),
    "kernel_efficiency": (0.5, 1.2),
}
"""network_scale multiplies each profile's own scale-out efficiency (EFA starts lower than InfiniBand)."""


@dataclass(slots=True)
class Case:
    run: CalibrationRun
    graph: ModelGraph
    profile: Profile


def fitting_layout(run: CalibrationRun, graph: ModelGraph, profile: Profile) -> CalibrationRun:
    """A run as it is priced: what its source leaves unstated, filled as an expert would have tuned it.

    An unstated recompute: the run did fit in memory, so the least recompute that fits by our memory model:
    none, then selective, then Megatron's block recompute (full recompute of the first k blocks of every
    model chunk, the least k that fits), full of every block last. An unstated interleaving degree (pp > 1):
    the fastest that fits among the framework's (planner/search/layouts.py framework_choices), each with its
    least recompute. Stated settings are never changed."""
    if not any(a.startswith(VPP_UNSTATED) for a in run.assumptions):
        return _least_recompute(run, graph, profile)
    best, best_step = run, math.inf
    for vpp in framework_choices(graph, run.training, run.layout.pp)[1]:
        schedule = "interleaved_1f1b" if vpp > 1 else "1f1b"
        option = _least_recompute(dataclasses.replace(run, layout=dataclasses.replace(
            run.layout, vpp=vpp, schedule=schedule)), graph, profile)
        est = estimate(graph, option.layout, option.training, profile, recompute=option.recompute_blocks)
        if est.fits and est.step_time_s < best_step:
            best, best_step = option, est.step_time_s
    note = f"vpp={best.layout.vpp}: the fastest that fits by our model (not stated)"
    return dataclasses.replace(best, assumptions=(*best.assumptions, note))


def _least_recompute(run: CalibrationRun, graph: ModelGraph, profile: Profile) -> CalibrationRun:
    """The run with the least recompute that fits when its source does not state one (fitting_layout)."""
    if not any(a.startswith("recompute=") for a in run.assumptions):
        return run
    chunks = run.layout.pp * run.layout.vpp
    options = [(r, 0) for r in ("none", "selective")]
    options += [("none", k) for k in range(1, math.ceil(len(graph.blocks) / chunks))]
    options.append(("full", 0))
    for recompute, k in options:
        layout = dataclasses.replace(run.layout, recompute=recompute)
        blocks = _first_blocks(graph, layout, k) if k else None
        if estimate(graph, layout, run.training, profile, recompute=blocks).fits:
            break
    if layout == run.layout and blocks is None:
        return run
    what = f"full for the first {k} block(s) of each model chunk" if k else recompute
    note = (f"recompute={what}: not stated, and the lighter settings do not fit in memory by our model"
            if what != "none" else "recompute=none: not stated; it fits without recompute by our model")
    return dataclasses.replace(run, layout=layout, recompute_blocks=blocks,
                               assumptions=(*run.assumptions, note))


def _first_blocks(graph: ModelGraph, layout: Layout, k: int) -> dict[str, str]:
    """Full recompute for the first k blocks of each of the pp x vpp model chunks (even split)."""
    names, out, start = [b.name for b in graph.blocks], {}, 0
    for size in split_blocks(len(names), layout.pp * layout.vpp):
        out.update({n: "full" for n in names[start:start + min(k, size)]})
        start += size
    return out


def graph_for(run: CalibrationRun) -> ModelGraph:
    """Capture the run's model at its sequence length, cached on disk by model and capture code."""
    import torch

    code = b"".join((ROOT / f).read_bytes() for f in ("planner/capture/trace.py", "planner/capture/structure.py",
                                                      "planner/capture/reference_model.py", "planner/capture/model_graph.py"))
    key = hashlib.sha1(repr((sorted(run.model.items()), run.training.seq_len)).encode() + code).hexdigest()[:16]
    path = CACHE / f"{key}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    spec, _, _ = parse_spec({"model": {**run.model, "seq_len": max(run.model.get("seq_len") or 0,
                                                                   run.training.seq_len)}})
    with torch.device("meta"):
        module = build_reference_model(spec)
    loaded = LoadedModel(module=module, name=spec.name, example_inputs=token_inputs, seq_len=run.training.seq_len,
                         kind="spec", spec=spec)
    graph = capture(loaded, 1, run.training.seq_len)
    graph.gm = None
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(graph))
    return graph


def with_coefficients(profile: Profile, coeffs: dict[str, float]) -> Profile:
    changes = {k: coeffs[f"{profile.family}:{k}"] for k in FAMILY_KEYS if f"{profile.family}:{k}" in coeffs}
    changes.update({k: coeffs[k] for k in GLOBAL_KEYS if k in coeffs and k != "network_scale"})
    if "network_scale" in coeffs:
        prior = prior_of(profile, "collective_efficiency_inter")
        changes["collective_efficiency_inter"] = min(1.0, prior * coeffs["network_scale"])
    return profile.replace(**changes)


def framework_of(case: Case, coeffs: dict[str, float]) -> Framework:
    fw = get_framework(case.run.training.framework)
    key = f"fw:{kernel_family(fw)}:{FRAMEWORK_KEY}"
    return dataclasses.replace(fw, kernel_efficiency=coeffs[key]) if key in coeffs else fw


def predict(case: Case, coeffs: dict[str, float]) -> tuple[float, float]:
    """(tokens/s/GPU, peak memory GiB) predicted for the run's own layout."""
    est = estimate(case.graph, case.run.layout, case.run.training, with_coefficients(case.profile, coeffs),
                   framework=framework_of(case, coeffs), recompute=case.run.recompute_blocks)
    return est.tokens_per_sec_per_gpu, est.peak_memory_bytes / 2**30


def log_error(case: Case, coeffs: dict[str, float]) -> float:
    return math.log(predict(case, coeffs)[0] / case.run.tokens_per_sec_per_gpu)


def fit(cases: list[Case], start: dict[str, float], sweeps: int = 3, points: int = 9,
        frozen: tuple[str, ...] = ()) -> dict[str, float]:
    """Coordinate descent on the mean absolute log error (robust to the few runs no layout-level model
    explains), each coordinate over a shrinking geometric grid; `frozen` keys keep their start (prior)."""
    coeffs = dict(start)
    families = {c.profile.family for c in cases}
    keys = [f"{f}:{k}" for f in sorted(families) for k in FAMILY_KEYS] + list(GLOBAL_KEYS)
    runs_per_fw: dict[str, int] = {}
    for c in cases:
        family = kernel_family(get_framework(c.run.training.framework))
        runs_per_fw[family] = runs_per_fw.get(family, 0) + 1
    keys += [f"fw:{f}:{FRAMEWORK_KEY}" for f, n in sorted(runs_per_fw.items())
             if n >= MIN_FRAMEWORK_RUNS and f != "megatron"]
    keys = [k for k in keys if k.split(":")[-1] not in frozen]

    def loss(cf: dict[str, float]) -> float:
        return statistics.fmean(abs(log_error(c, cf)) for c in cases)

    best = loss(coeffs)
    span = 2.0
    for _ in range(sweeps):
        for key in keys:
            lo, hi = BOUNDS[key.split(":")[-1]]
            centre = coeffs[key]
            for i in range(points):
                value = min(hi, max(lo, centre * span ** (2 * i / (points - 1) - 1)))
                trial = {**coeffs, key: value}
                err = loss(trial)
                if err < best:
                    best, coeffs = err, trial
        span = math.sqrt(span)
    return coeffs


def prior_of(profile: Profile, key: str) -> float:
    """The coefficient's prior as its YAML records it (`prior:` beside `value:`), so refits start afresh."""
    return _prior(profile.name, key)


@functools.cache
def _prior(profile_name: str, key: str) -> float:
    """prior_of, read once per profile and key: the fit asks for it on every prediction."""
    import yaml

    from autoshard.hardware_profiles import HERE

    entry = yaml.safe_load((HERE / f"{profile_name}.yaml").read_text())["fitted"][key]
    return float(entry.get("prior", entry["value"]))


def initial(cases: list[Case]) -> dict[str, float]:
    start: dict[str, float] = {}
    for c in cases:
        for k in FAMILY_KEYS:
            start.setdefault(f"{c.profile.family}:{k}", prior_of(c.profile, k))
        for k in GLOBAL_KEYS:
            start.setdefault(k, 1.0 if k == "network_scale" else prior_of(c.profile, k))
        fw = get_framework(c.run.training.framework)
        start.setdefault(f"fw:{kernel_family(fw)}:{FRAMEWORK_KEY}", fw.prior)
    return start


def summarise(errors: list[float]) -> str:
    a = sorted(abs(e) for e in errors)
    if not a:
        return "no runs"
    p90 = a[min(len(a) - 1, math.ceil(0.9 * len(a)) - 1)]
    within = sum(e <= 0.10 for e in a) / len(a)
    return f"median {statistics.median(a):.1%}, p90 {p90:.1%}, within 10%: {within:.0%} (n={len(a)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the report (markdown) to this file")
    parser.add_argument("--no-cv", action="store_true", help="skip cross-validation (fit on all runs only)")
    parser.add_argument("--freeze", nargs="*", default=[], choices=GLOBAL_KEYS,
                        help="global coefficients kept at their prior (not fitted)")
    parser.add_argument("--write-profiles", action="store_true",
                        help="store the all-runs fit in hardware_profiles/*.yaml (fitted section)")
    parser.add_argument("--holdout", type=Path,
                        help="runs in the calibration schema never fitted: predicted with the all-runs fit")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cases, skipped = load_cases()
    print(f"{len(cases)} runs captured in {time.perf_counter() - t0:.0f} s; {len(skipped)} skipped", file=sys.stderr)
    prior = initial(cases)
    fitted = fit(cases, prior, frozen=tuple(args.freeze))
    rows = []
    cv_pred: dict[str, float] = {}
    if not args.no_cv:
        for group in sorted({c.run.group for c in cases}):
            train = [c for c in cases if c.run.group != group]
            coeffs = fit(train, prior, frozen=tuple(args.freeze))
            for c in cases:
                if c.run.group == group:
                    cv_pred[c.run.id] = predict(c, coeffs)[0]
    for c in cases:
        tok, mem = predict(c, fitted)
        prior_tok, _ = predict(c, prior)
        rows.append((c, prior_tok, tok, cv_pred.get(c.run.id), mem))
    report = render(rows, fitted, prior, skipped, time.perf_counter() - t0)
    if args.holdout:
        report += "\n" + held_out(args.holdout, fitted)
    print(report)
    if args.write:
        args.write.write_text(report)
    if args.write_profiles:
        write_profiles(fitted, cases, tuple(args.freeze))


def load_cases(path: Path | None = None) -> tuple[list[Case], list[tuple[str, str]]]:
    """The runs of a calibration file (the shared one by default) as priced: captured, unstated settings
    filled (fitting_layout); (id, reason) for each one skipped."""
    runs, skipped = load_runs(path)
    cases = []
    for run in runs:
        try:
            graph = graph_for(run)
            profile = load_profile(run.profile, gpu_memory_gib=run.gpu_memory_gib)
            cases.append(Case(run=fitting_layout(run, graph, profile), graph=graph, profile=profile))
        except Exception as exc:  # noqa: BLE001 - report and go on: one bad run must not hide the rest
            skipped.append((run.id, f"capture/estimate failed: {type(exc).__name__}: {exc}"))
    return cases, skipped


def held_out(path: Path, fitted: dict[str, float]) -> str:
    """Markdown: each run of `path` (never fitted) predicted with the all-runs coefficients (a coefficient
    they need that the fit has not seen stays at its prior)."""
    cases, skipped = load_cases(path)
    coeffs = {**initial(cases), **fitted}
    out = ["## Held-out runs (never fitted)", "", f"`{path.name}`, predicted with the coefficients above.", "",
           "| run | profile | framework | layout | measured tok/s/GPU | predicted | error |", "|---|---|---|---|---|---|---|"]
    errors = []
    for c in cases:
        tok, meas = predict(c, coeffs)[0], c.run.tokens_per_sec_per_gpu
        errors.append(tok / meas - 1)
        out.append(f"| {c.run.id} | {c.run.profile} | {c.run.training.framework} | {short_layout(c.run.layout)} | "
                   f"{meas:,.1f} | {tok:,.0f} | {errors[-1]:+.1%} |")
    out += ["", f"- {summarise(errors)}"] + [f"- skipped {i}: {why}" for i, why in skipped]
    return "\n".join(out) + "\n"


def write_profiles(fitted: dict[str, float], cases: list[Case], frozen: tuple[str, ...] = ()) -> None:
    """Replace the fitted coefficients in every GPU profile YAML of a fitted family (text edit: the
    comments and sources stay)."""
    from autoshard.hardware_profiles import HERE, profile_names

    counts: dict[str, int] = {}
    for c in cases:
        counts[c.profile.family] = counts.get(c.profile.family, 0) + 1
    for name in profile_names():
        profile = load_profile(name)
        if profile.family not in counts:
            continue
        new = with_coefficients(profile, fitted)
        path = HERE / f"{name}.yaml"
        text = path.read_text()
        for key in (*FAMILY_KEYS, *GLOBAL_KEYS):
            field = "collective_efficiency_inter" if key == "network_scale" else key
            text = re.sub(rf"(\n  {field}:\n    value: )[^\n]+", rf"\g<1>{yaml_number(getattr(new, field))}", text)
            said = f"prior, not fitted (benchmarks/accuracy.py --freeze {key}): " if key in frozen else \
                "fitted by benchmarks/accuracy.py on the calibration runs; prior: "
            text = re.sub(rf'(\n  {field}:\n    value: [^\n]+\n(?:    prior: [^\n]+\n)?    source: )"(?:fitted [^"]*?; prior: |prior, not fitted \([^)]*\): |prior: )?',
                          rf'\g<1>"{said}', text)
        note = (f"benchmarks/accuracy.py on calibration/published_runs_dev.yaml: {len(cases)} runs "
                f"({counts[profile.family]} of family {profile.family}); GEMM efficiency per family, the rest "
                "shared; leave-one-group-out error in docs/accuracy.md")
        text = re.sub(r'(\n  fitted_on: )[^\n]+', lambda m, note=note: f'{m.group(1)}"{note}"', text)
        path.write_text(text)
    write_kernel_efficiencies(fitted)


def yaml_number(value: float) -> str:
    """4 significant digits that YAML reads as a number: PyYAML (YAML 1.1) takes `1e+09` for a string, so an
    exponent gets a decimal point (`1.0e+09`)."""
    text = f"{value:.4g}"
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}" if exponent else text


def write_kernel_efficiencies(fitted: dict[str, float]) -> None:
    """Replace each fitted framework's `kernel_efficiency=` in cost_models/framework.py (the first one after
    its `name="..."`)."""
    path = ROOT / "cost_models" / "framework.py"
    text = path.read_text()
    for key, value in fitted.items():
        if key.startswith("fw:") and key.endswith(f":{FRAMEWORK_KEY}"):
            name = key.split(":")[1]
            text = re.sub(rf'(name="{name}",.*?kernel_efficiency=)[0-9.]+', rf"\g<1>{value:.3g}", text, count=1,
                          flags=re.S)
    path.write_text(text)


def short_layout(lay: Layout) -> str:
    return f"tp{lay.tp} pp{lay.pp} v{lay.vpp} cp{lay.cp} ep{lay.ep} dp{lay.dp} z{lay.zero} mbs{lay.mbs} {lay.recompute}"


def render(rows, fitted, prior, skipped, seconds) -> str:
    out = ["| run | profile | layout | measured tok/s/GPU | prior | fitted | CV | CV error | mem GiB pred / meas |",
           "|---|---|---|---|---|---|---|---|---|"]
    prior_err, fit_err, cv_err, mem_err, floor_err = [], [], [], [], []
    for c, p_tok, f_tok, cv_tok, mem in rows:
        meas = c.run.tokens_per_sec_per_gpu
        prior_err.append(p_tok / meas - 1)
        fit_err.append(f_tok / meas - 1)
        if cv_tok is not None:
            cv_err.append(cv_tok / meas - 1)
        floor_err.append(_floor(c) / meas - 1)
        mm = c.run.peak_memory_gib
        if mm:
            mem_err.append(mem / mm - 1)
        short = short_layout(c.run.layout)
        cv = f"{cv_tok:,.0f} | {cv_tok / meas - 1:+.1%}" if cv_tok is not None else "- | -"
        memtxt = f"{mem:.1f} / {mm:.1f}" if mm else f"{mem:.1f} / -"
        out.append(f"| {c.run.id} | {c.profile.name} | {short} | {meas:,.1f} | {p_tok:,.0f} | {f_tok:,.0f} | {cv} | {memtxt} |")
    lines = [
        "## Summary (absolute relative error of tokens/s/GPU)",
        "",
        f"- cross-validated (leave one source group out): {summarise(cv_err)}",
        f"- fitted on all runs (in-sample): {summarise(fit_err)}",
        f"- prior coefficients, before any fit: {summarise(prior_err)}",
        f"- floor, 37% of the datasheet peak for every run: {summarise(floor_err)}",
        f"- peak memory against the sources that report it: {summarise(mem_err)}",
        "",
        "Fitted coefficients (all runs): " + ", ".join(f"{k} = {v:.4g}" for k, v in sorted(fitted.items())),
        "",
        "Priors: " + ", ".join(f"{k} = {v:.4g}" for k, v in sorted(prior.items())),
        "",
        *out,
        "",
        "Skipped runs:",
        *[f"- {rid}: {why}" for rid, why in skipped],
        "",
        f"({seconds:.0f} s)",
    ]
    return "\n".join(lines)


def _floor(case: Case) -> float:
    """The naive predictor: 37% of the dtype peak, divided by the model's FLOPs per token."""
    g = case.graph
    per_token = (g.fwd_flops + g.bwd_flops) / g.tokens
    return 0.37 * case.profile.peak_flops(case.run.training.precision) / per_token


if __name__ == "__main__":
    main()
