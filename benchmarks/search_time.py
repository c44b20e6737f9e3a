"""search() alone, in one process: the examples of search_speed.py captured once, then each searched and timed.

    .venv/bin/python benchmarks/search_time.py [--only NAME] [--save FILE.json]

What search_speed.py's whole `plan` calls hide under their fixed cost (importing torch, capture): the seconds
the search itself takes, the layouts it priced, the tuples it pruned and the plan. Specs' graphs come from
the capture cache `plan` itself uses (planner/capture/cache.py: keyed by the spec and the capture code, so a
graph captured by older code is never read back). `--save` writes each case's ranked layouts with their
step times and peak memories, for checking that a change to the search leaves its results alone. Prints a
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoshard.hardware_profiles import load_profile  # noqa: E402
from autoshard.planner.api import _training  # noqa: E402
from autoshard.planner.capture.cache import captured  # noqa: E402
from autoshard.planner.capture.loading import load_model  # noqa: E402
from autoshard.planner.search.layouts import search  # noqa: E402
from benchmarks.search_speed import CASES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this (case-insensitive)")
    parser.add_argument("--save", help="write each case's ranked layouts to this file")
    args = parser.parse_args()
    profile = load_profile("h100_ib")
    saved = {}
    print(f"{'model':<28}{'search s':>9}{'priced':>8}{'tuples':>8}{'pruned':>8}  plan")
    for name, model, gpus, batch in CASES:
        if args.only and args.only.lower() not in name.lower():
            continue
        loaded = load_model(model)
        training = _training(loaded, batch, None, None, {}, gpus, "torch", None)
        graph = captured(loaded, 1, training.seq_len)
        start = time.perf_counter()
        result = search(graph, gpus, training, profile, {})
        seconds = time.perf_counter() - start
        plan = result.best.layout.to_string() if result.best else "no layout fits"
        print(f"{name:<28}{seconds:>9.2f}{result.priced:>8}{result.tuples:>8}{result.pruned:>8}  {plan}")
        saved[name] = [(c.layout.to_string(), c.estimate.step_time_s, c.estimate.peak_memory_bytes)
                       for c in result.ranked]
    if args.save:
        Path(args.save).write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
