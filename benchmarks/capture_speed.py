"""Capture time and peak memory of `plan MODEL --inspect --json` for published model sizes.

Each model runs in its own process (a fresh interpreter, as a user's command would), so the peak RSS is
that capture's alone. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/capture_speed.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = [
    ("Llama-3.1-405B spec", ROOT / "examples/specs/llama3_405b.yaml", 405.85e9),
    ("GPT-3 175B spec", ROOT / "examples/specs/gpt3_175b.yaml", 174.6e9),
    ("Mixtral-8x7B spec", ROOT / "examples/specs/mixtral_8x7b.yaml", 46.70e9),
    ("DeepSeek-V3-like spec", ROOT / "examples/specs/deepseek_v3_like.yaml", None),
    ("Llama-3.1-405B HF config", ROOT / "tests/data/hf/llama31_405b", 405.85e9),
    ("Mixtral-8x7B HF config", ROOT / "tests/data/hf/mixtral_8x7b", 46.70e9),
    ("GPT-2 small model.py", ROOT / "examples/models/gpt2_small.py", 124.44e6),
]
CHILD = ("import resource, sys; from autoshard.planner.cli import main\n"
         "try:\n    main(sys.argv[1:])\nfinally:\n"
         "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def run(path: Path) -> tuple[dict, float, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "--inspect", "--json"],
                         capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    rss_gib = int(out.stderr.strip().splitlines()[-1]) * 1024 / 2**30  # ru_maxrss is KiB on Linux
    return json.loads(out.stdout), seconds, rss_gib


def main() -> None:
    print(f"{'model':<28}{'params':>14}{'vs published':>14}{'method':>8}{'blocks':>8}{'seconds':>9}{'peak GiB':>10}")
    for name, path, published in MODELS:
        d, seconds, rss = run(path)
        err = f"{d['params'] / published - 1:+.3%}" if published else "-"
        print(f"{name:<28}{d['params']:>14.4e}{err:>14}{d['capture_method']:>8}{d['blocks']:>8}"
              f"{seconds:>9.1f}{rss:>10.2f}")
    print(f"python {sys.version.split()[0]}, {resource.getpagesize()} B pages")


if __name__ == "__main__":
    main()
