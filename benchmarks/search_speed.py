"""End-to-end `plan` time (capture + search + plan), as a user runs it: a fresh process per case.

    .venv/bin/python benchmarks/search_speed.py [--only NAME] [--repeat N] [--save FILE.json]

Two figures per case: `cold` is a call that captures the model (`--no-cache`: the first time a model is
planned; the figure the target is about), `warm` one that reads the capture back from the capture cache
(planner/capture/cache.py: a spec planned before, so no torch import and no capture; model.py files are
never cached, so theirs equals cold). The cache lives in a temporary folder, never the user's.

Target from the planner issue (16): every example under 5 CPU seconds on the 2-core development machine.
CPU s is the plan process's user + system time (and its solver subprocesses'): unlike the wall time it does
not grow when other work shares the cores. `step s` is the predicted step time of the chosen layout, so a
faster search that picks a worse plan shows. `--save` writes each case's `plan --json` output, for
comparing plans before and after a change. `--repeat N` runs each case N times and prints the least and the
median CPU s (the development VM's speed drifts by up to 30% between minutes: the least is the machine
undisturbed). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "specs"
CASES = [  # (name, model, GPUs, global batch in sequences); None: the spec's own batch
    ("Llama-3 8B", SPECS / "llama3_8b.yaml", 64, 512),
    ("Llama-3 70B", SPECS / "llama3_70b.yaml", 1024, 1024),
    ("Llama-3.1 405B", SPECS / "llama3_405b.yaml", 16384, 2048),
    ("DeepSeek-V3-like 671B MoE", SPECS / "deepseek_v3_like.yaml", 2048, 4096),
    ("GPT-3 175B", SPECS / "gpt3_175b.yaml", 1024, None),
    ("Mixtral 8x7B", SPECS / "mixtral_8x7b.yaml", 256, 1024),
    ("tiny-gpt", SPECS / "tiny_gpt.yaml", 8, None),
    ("tiny-llama", SPECS / "tiny_llama.yaml", 8, None),
    ("tiny-moe", SPECS / "tiny_moe.yaml", 8, None),
    ("tiny-moe-top1", SPECS / "tiny_moe_top1.yaml", 8, None),
    ("GPT-2 small model.py", ROOT / "examples" / "models" / "gpt2_small.py", 8, 64),
]
LAYOUT_KEYS = ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "micro_batch", "recompute")


def run(model: Path, gpus: int, batch: int | None, cache: bool) -> tuple[subprocess.CompletedProcess, float, float]:
    """One `plan --json` process: (its output, wall seconds, CPU seconds)."""
    cmd = [sys.executable, "-m", "autoshard.planner.cli", str(model), "--gpus", str(gpus), "--profile", "h100_ib",
           "--json", "--quiet"] + (["--global-batch", str(batch)] if batch else []) + ([] if cache else ["--no-cache"])
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the plan process: what it costs on an idle machine, whatever else runs beside it
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return out, wall, cpu


def torch_import_cpu(repeat: int) -> float:
    """Least CPU seconds of `python -c "import torch"`: what the machine's speed is this minute."""
    least = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        least = min(least, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this (case-insensitive)")
    parser.add_argument("--save", help="write every case's plan --json output to this file")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (least and median CPU s)")
    args = parser.parse_args()
    saved = {}
    os.environ["AUTOSHARD_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoshard-bench-cache-")
    print(f"CPU s: least of {max(1, args.repeat)} (median); `import torch` alone on this machine now: "
          f"{torch_import_cpu(max(1, args.repeat)):.1f} CPU s (the floor under every cold call)")
    print(f"{'model':<28}{'GPUs':>7}{'cold CPU s':>11}{'median':>7}{'warm CPU s':>11}{'solve s':>8}{'step s':>10}  "
          "layout")
    for name, model, gpus, batch in CASES:
        if args.only and args.only.lower() not in name.lower():
            continue
        runs = sorted((run(model, gpus, batch, cache=False) for _ in range(max(1, args.repeat))), key=lambda r: r[2])
        out, _, cpu = runs[0]
        median = statistics.median(r[2] for r in runs)
        if out.returncode not in (0, 3):
            print(f"{name:<28}{gpus:>7}{cpu:>11.1f}{median:>7.1f}  failed: {out.stderr.strip()[:200]}")
            continue
        run(model, gpus, batch, cache=True)  # fills the cache
        warm = min(run(model, gpus, batch, cache=True)[2] for _ in range(max(1, args.repeat)))
        d = json.loads(out.stdout) if out.returncode == 0 else {}
        saved[name] = d
        lay = d.get("layout", {})
        short = ",".join(f"{k}={lay[k]}" for k in LAYOUT_KEYS if k in lay) or "no layout fits"
        step = d.get("predicted", {}).get("step_time_s", float("nan"))
        print(f"{name:<28}{gpus:>7}{cpu:>11.1f}{median:>7.1f}{warm:>11.1f}{d.get('solve_time_s', 0):>8.1f}"
              f"{step:>10.4g}  {short}")
    if args.save:
        Path(args.save).write_text(json.dumps(saved, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
