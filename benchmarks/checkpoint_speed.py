"""Save and load time and memory of a sharded checkpoint (transforms/checkpoint.py) of a ~1B-parameter model.

    .venv/bin/python benchmarks/checkpoint_speed.py [--layers 22] [--dir /tmp/ckpt_bench]
    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/checkpoint_speed.py   # dp=2,zero=3

The model is TinyLlama-1.1B's shape in autoshard's reference transformer (22 layers, hidden 2048, SwiGLU 5632,
32 heads, 4 kv heads, vocab 32000: 1.10B parameters), fp32, with AdamW's state allocated (what a checkpoint of
a run holds: weights + two moments, 12 bytes per parameter). One process, or one rank per process under
torchrun with ZeRO-3 over them. Each rank prints one JSON line: seconds to save and to load (into the same
model, as a resume does), bytes written, and the peak resident memory during each (VmHWM, reset before each
by /proc/self/clear_refs) next to the resident memory before it, and the seconds of the crc32 checksums that
save writes and load verifies (each rank its share of the files). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoshard.cost_models.layout import complete  # noqa: E402
from autoshard.planner.capture.reference_model import build_reference_model  # noqa: E402
from autoshard.planner.capture.spec import ModelSpec  # noqa: E402
from autoshard.planner.capture.trace import capture  # noqa: E402
from autoshard.transforms.apply import apply_layout  # noqa: E402
from autoshard.transforms.checkpoint import (  # noqa: E402
    ensure_state,
    optimizer_parts,
    read_manifest,
    verify_checksums,
)
from autoshard.transforms.init import meta_parameters  # noqa: E402

GIB = 2**30


def memory_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def timed(fn) -> dict[str, float]:
    """Seconds, RSS before and peak RSS during `fn()`, in GiB."""
    if dist.is_initialized():
        dist.barrier()
    reset_peak()
    before = memory_kib("VmRSS") * 1024 / GIB
    start = time.perf_counter()
    fn()
    return {"s": round(time.perf_counter() - start, 2), "rss_before_gib": round(before, 2),
            "peak_rss_gib": round(memory_kib("VmHWM") * 1024 / GIB, 2)}


def build(layers: int, world: int):
    spec = ModelSpec(name="tinyllama-1.1b-shape", layers=layers, hidden=2048, ffn_hidden=5632, heads=32, kv_heads=4,
                     vocab=32000, seq_len=64)
    with meta_parameters():
        model = build_reference_model(spec)
    params = sum(p.numel() for p in model.parameters())
    layout = complete({"zero": 3 if world > 1 else 0, "mbs": 1}, world)
    parallel = apply_layout(model, layout, graph=capture(model, 1, 64), seed=0)
    for part in optimizer_parts(parallel.optimizer):
        ensure_state(part)  # AdamW's moments, as after the first step
    return parallel, params, layout.to_string()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22, help="blocks (22: 1.10B parameters)")
    p.add_argument("--dir", default="/tmp/autoshard_checkpoint_bench", help="where to write (removed after)")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    start = time.perf_counter()
    parallel, params, layout = build(args.layers, world)
    built = time.perf_counter() - start
    root = Path(args.dir)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    save = timed(lambda: parallel.save(root, step=1))
    folder = root / "step_00000001"
    written = sum(f.stat().st_size for f in folder.iterdir())
    load = timed(lambda: parallel.load(folder))
    manifest = read_manifest(folder)  # the crc32 part of save and of load: each rank checksums its share
    crc = timed(lambda: verify_checksums(folder, manifest, share=True))
    print(json.dumps({"rank": rank, "world": world, "layout": layout, "params": params, "build_s": round(built, 1),
                      "bytes_written": written, "save": save, "load": load, "checksums": crc}), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
