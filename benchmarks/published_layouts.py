"""Does `plan --layout` accept every layout that trained in public? One line per calibration run.

Two ways a user gives a published layout, both through the public API that the `plan` command calls:
- **full**: every key (tp, pp, vpp, cp, ep, dp, zero, mbs, recompute), with what the source leaves unstated
  filled by benchmarks/calibration_runs.py's documented rules (an unstated recompute: the lightest that fits,
  as benchmarks/accuracy.py prices it): `plan` only prices it;
- **stated**: only the keys the source states (its nulls left out): `plan` searches the rest.

A run that trained must come out priced and fitting in both. Prints the outcome, predicted memory against
capacity, predicted against measured tokens/s/GPU, and the seconds of each call.

    .venv/bin/python benchmarks/published_layouts.py [--only ID ...] [--mode full|stated|both]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoshard.hardware_profiles import load_profile  # noqa: E402
from autoshard.planner.api import plan  # noqa: E402
from autoshard.planner.errors import UserError  # noqa: E402
from benchmarks.accuracy import fitting_layout, graph_for  # noqa: E402
from benchmarks.calibration_runs import CalibrationRun, load_entries, load_runs  # noqa: E402


def stated_layout(entry: dict[str, Any], run: CalibrationRun) -> dict[str, Any]:
    """The layout keys the source itself states (nulls and derived values left out)."""
    par, tr = entry["parallel"], entry["training"]
    out = {k: par[k] for k in ("tp", "pp", "vpp", "cp", "ep") if par.get(k) is not None}
    if par.get("zero_stage") is not None:
        out["zero"] = par["zero_stage"]
    if tr.get("micro_batch") is not None:
        out["mbs"] = run.layout.mbs  # torchtitan's local batch is split into pp micro-batches
    if str(tr.get("recompute") or "").lower() in ("none", "selective", "full"):
        out["recompute"] = tr["recompute"].lower()
    if out.get("vpp", 1) > 1:
        out["schedule"] = "interleaved_1f1b"
    return out


def price(run: CalibrationRun, layout: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        p = plan(spec_path, gpus=run.layout.gpus, profile=run.profile, global_batch=run.training.global_batch,
                 seq_len=run.training.seq_len, precision=run.training.precision, layout=layout,
                 gpu_memory_gib=run.gpu_memory_gib, framework=run.training.framework,
                 grad_reduce=run.training.grad_reduce)
    except UserError as exc:
        return {"outcome": f"refused (exit {exc.exit_code}): {str(exc)[:160]}", "ok": False,
                "seconds": time.perf_counter() - start}
    pred = p.predicted
    return {"outcome": "fits" if pred["fits"] else "priced, does not fit", "ok": bool(pred["fits"]),
            "seconds": time.perf_counter() - start, "mem": pred["peak_memory_gib"],
            "cap": pred["memory_capacity_gib"], "tok": pred["tokens_per_sec_per_gpu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run ids (substrings)")
    parser.add_argument("--mode", choices=("full", "stated", "both"), default="both")
    args = parser.parse_args()
    runs, skipped = load_runs()
    entries = {e["id"]: e for e in load_entries()}
    modes = ("full", "stated") if args.mode == "both" else (args.mode,)
    bad, slowest = 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            if args.only and not any(s in run.id for s in args.only):
                continue
            spec = Path(tmp) / f"{run.id}.yaml"
            spec.write_text(yaml.safe_dump({"model": run.model}))
            for mode in modes:
                if mode == "full":
                    # what the source leaves unstated filled by calibration_runs.py's rules, recompute as
                    # benchmarks/accuracy.py fills it (the lightest that fits)
                    run = fitting_layout(run, graph_for(run), load_profile(run.profile,
                                                                           gpu_memory_gib=run.gpu_memory_gib))
                    layout = {f: getattr(run.layout, f) for f in ("tp", "pp", "vpp", "cp", "ep", "dp", "zero",
                                                                  "mbs", "recompute", "schedule",
                                                                  "sequence_parallel", "async_tp")}
                    if run.recompute_blocks:
                        # block recompute (the first k blocks of each chunk) has no --layout key: the plan
                        # API gets full recompute, the uniform setting that fits; the search's ILP mixes
                        layout["recompute"] = "full"
                else:
                    layout = stated_layout(entries[run.id], run)
                r = price(run, layout, spec)
                bad += not r["ok"]
                slowest = max(slowest, r["seconds"])
                extra = ""
                if "mem" in r:
                    err = r["tok"] / run.tokens_per_sec_per_gpu - 1
                    meas = f" (measured {run.peak_memory_gib:.1f})" if run.peak_memory_gib else ""
                    extra = (f"  mem {r['mem']:.1f}/{r['cap']:.0f} GiB{meas}  tok/s/GPU {r['tok']:.0f} vs "
                             f"{run.tokens_per_sec_per_gpu:.0f} ({err:+.0%})")
                print(f"{run.id:60s} {mode:6s} {r['seconds']:5.1f}s  {r['outcome']}{extra}", flush=True)
    print(f"\n{bad} not accepted; slowest call {slowest:.1f} s; {len(skipped)} runs without a usable layout: "
          + "; ".join(f"{i} ({why})" for i, why in skipped))


if __name__ == "__main__":
    main()
