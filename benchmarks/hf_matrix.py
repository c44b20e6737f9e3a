"""Every tiny Hugging Face architecture (tests/data/hf/tiny_*) under every layout against the unsharded model,
on 4 CPU ranks (gloo), and the table of docs/transforms.md ("Hugging Face architectures") from the results.

    .venv/bin/python benchmarks/hf_matrix.py [--write-docs] [--archs tiny_gpt2,tiny_phi3]

One launch of tests/distributed/hf_zoo_worker.py per architecture (its unsharded reference is trained once);
prints one line per case and, with --write-docs, replaces the table between the markers in docs/transforms.md.
The suite (tests/distributed/test_hf_zoo.py) runs a representative subset of the same cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from spawn import spawn  # noqa: E402

DENSE = ["tp=2,dp=2", "pp=2,dp=2", "cp=2,dp=2"]
MOE = [*DENSE, "ep=2", "ep=2,tp=2"]
DOCS = ROOT / "docs" / "transforms.md"
BEGIN, END = "<!-- hf-matrix:begin -->", "<!-- hf-matrix:end -->"


def is_moe(arch: str) -> bool:
    config = json.loads((ROOT / "tests" / "data" / "hf" / arch / "config.json").read_text())
    return any(k in config for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def run(arch: str, layouts: list[str]) -> list[dict]:
    worker = ROOT / "tests" / "distributed" / "hf_zoo_worker.py"
    out = spawn([str(worker), "--cases", json.dumps({arch: layouts})], 4, timeout=1200)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode:
        done = {r["layout"] for r in rows}
        tail = out.stderr.strip().splitlines()[-1:] or [""]
        rows += [{"arch": arch, "layout": lay, "status": "crashed", "message": tail[0]} for lay in layouts
                 if lay not in done]
    return rows


def cell(r: dict) -> str:
    if r["status"] == "match":
        note = " (attention replicated)" if any("attention" in n or "attn" in n for n in r.get("replicated", [])) else ""
        return f"matches{note}, {r['loss_rel']:.0e}"
    if r["status"] == "refused":
        return f"refused: {r['message'][:110]}"
    return f"**{r['status']}**: {r.get('message', '')[:80]}"


def table(rows: list[dict]) -> str:
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    by = {(r["arch"], r["layout"]): r for r in rows}
    lines = ["| architecture | " + " | ".join(MOE) + " |", "|---" * (len(MOE) + 1) + "|"]
    for arch in archs:
        cells = [cell(by[(arch, lay)]) if (arch, lay) in by else "n/a (dense)" for lay in MOE]
        lines.append(f"| {arch.removeprefix('tiny_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", help="comma-separated tests/data/hf folders (default: every tiny_*)")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    archs = args.archs.split(",") if args.archs else sorted(d.name for d in (ROOT / "tests/data/hf").glob("tiny_*"))
    rows, start = [], time.perf_counter()
    for arch in archs:
        for r in run(arch, MOE if is_moe(arch) else DENSE):
            print(json.dumps({k: r.get(k) for k in ("arch", "layout", "status", "loss_rel", "grad_err", "message")}),
                  flush=True)
            rows.append(r)
    print(f"{len(rows)} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.write_docs:
        doc = DOCS.read_text()
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
