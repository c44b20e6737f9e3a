"""End-to-end `plan` wall time (capture + search + plan), as a user runs it: a fresh process per case.

    .venv/bin/python benchmarks/search_speed.py

Targets from the planner issue: every case under 10 s on the 2-core machine, Llama-3 8B on 64 GPUs under 3 s.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "specs"
CASES = [
    ("Llama-3 8B", SPECS / "llama3_8b.yaml", 64, 512),
    ("Llama-3 70B", SPECS / "llama3_70b.yaml", 1024, 1024),
    ("Llama-3.1 405B", SPECS / "llama3_405b.yaml", 16384, 2048),
    ("DeepSeek-V3-like 671B MoE", SPECS / "deepseek_v3_like.yaml", 2048, 4096),
]


def main() -> None:
    print(f"{'model':<28}{'GPUs':>7}{'wall s':>9}{'CPU s':>8}{'solve s':>9}  layout")
    for name, spec, gpus, batch in CASES:
        start = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-m", "autoshard.planner.cli", str(spec), "--gpus", str(gpus),
                              "--profile", "h100_ib", "--global-batch", str(batch), "--json"],
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds of the plan process: what it costs on an idle machine, whatever else runs beside it
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        if out.returncode not in (0, 3):
            print(f"{name:<28}{gpus:>7}{wall:>9.1f}  failed: {out.stderr.strip()[:200]}")
            continue
        d = json.loads(out.stdout) if out.returncode == 0 else {}
        lay = d.get("layout", {})
        short = ",".join(f"{k}={lay[k]}" for k in ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "micro_batch",
                                                    "recompute") if k in lay) or "no layout fits"
        print(f"{name:<28}{gpus:>7}{wall:>9.1f}{cpu:>8.1f}{d.get('solve_time_s', 0):>9.1f}  {short}")


if __name__ == "__main__":
    main()
