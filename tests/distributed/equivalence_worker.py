"""Worker for the equivalence tests (test_equivalence.py, test_pp.py, test_cp.py, test_ep.py): many
(model, layout) cases in one multi-process launch, one interpreter start, torch import and rendezvous for
all of them (about 3.5 CPU seconds per rank and launch, most of a tiny case's cost on the 2-core CI).

    python tests/distributed/equivalence_worker.py --out DIR [--micro-batch 2] \
        --cases '[["case-id", "examples/specs/tiny_llama.yaml", "tp=2", ["--stage-split", "1,3"]], ...]'

Each case runs as examples/train.py runs it: its argument parser with the test's arguments (--micro-batch
given to every case, a case's own arguments after it), its model builder, capture (once per model and rank),
layout parsing, batch check, apply_layout arguments and synthetic batches. Only the process group is started
once for all cases; train.py's checkpoint, --verify and --grads-out options are not mirrored and are refused.
Rank 0 saves {"losses": [...], "grads": whole gradients after step 1, "dropped": MoE assignments dropped at
capacity on rank 0} to DIR/case-<i>.pt, i the case's index.

For each model among the cases rank 0 first trains the unsharded model the same way on its own (train.py's
reference run: no --layout, one process) into DIR/reference-<j>.pt, the case id "reference:<model>"; cases
that give their own --micro-batch get a reference at it, "reference:<model> --micro-batch <k>" (a MoE's aux
loss is the micro-batch's). Rank 0 prints one JSON line per file written: {"case": id, "file": ...,
"seconds": ...}. A layout refused on every rank before any collective (UserError/ValueError, train.py's exit
2) is printed as {"case": id, "refused": message}; any other exception ends the worker with its traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from spawn import exit_cleanly, own_micro_batch  # tests/distributed is the script's directory

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train", ROOT / "examples" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

BASE = ["--steps", "5", "--seed", "7", "--global-batch", "8", "--seq-len", "32"]
_GRAPHS: dict[tuple[str, int], Any] = {}


def run(model: str, layout: str, extra: list[str], world: int,
        micro_batch: int) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """train.main's body for one case on `world` ranks (1: the unsharded reference on this rank alone); also
    the MoE assignments this rank dropped at capacity (reference_model.MoE.dropped)."""
    args = train._parser().parse_args(["--model", model, *BASE, "--micro-batch", str(micro_batch),
                                       *(["--layout", layout] if layout else []), *extra])
    unmirrored = [f for f in ("checkpoint_dir", "resume", "verify", "grads_out") if getattr(args, f, None)]
    assert not unmirrored, f"equivalence_worker.py does not run train.py's {unmirrored}: launch train.py instead"
    model_, vocab = train._build(args)
    key = (model, args.seq_len)
    if key not in _GRAPHS:  # captured once per model and rank: the graph does not depend on the layout
        _GRAPHS[key] = train.capture(model_, 1, args.seq_len)
    graph = copy.deepcopy(_GRAPHS[key])
    layout_, recompute, split = train._layout(args, world, graph)
    if args.global_batch % (layout_.dp * layout_.mbs):
        raise train.UserError(f"--global-batch {args.global_batch} is not divisible by dp({layout_.dp}) x "
                              f"micro-batch({layout_.mbs})")
    parallel = train.apply_layout(model_, layout_, graph=graph, recompute=recompute, lr=args.lr, seed=args.seed,
                                  split=split, precision=args.precision, cp_attention=args.cp_attention,
                                  grad_reduce=args.grad_reduce)
    parallel.lr_schedule = train._lr_schedule(args)
    losses, grads = [], {}
    for step in range(args.steps):
        losses.append(parallel.train_step(train._batch(args, vocab, step)))
        if step == 0:
            grads = parallel.full_gradients()
    return losses, grads, sum(getattr(m, "dropped", 0) for m in model_.modules())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True, help="JSON: [[case id, model, layout, [extra train.py args]], ...]")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--micro-batch", type=int, default=1, help="train.py's, for every case (a case's own wins)")
    args = p.parse_args()
    cases = json.loads(args.cases)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def save(case: str, name: str, result, start: float) -> None:
        if rank == 0:
            torch.save({"losses": result[0], "grads": result[1], "dropped": result[2]}, args.out / name)
            print(json.dumps({"case": case, "file": name, "seconds": time.perf_counter() - start}), flush=True)

    # one reference per model and micro-batch: a MoE's aux loss is the micro-batch's (its expert counts)
    references = list(dict.fromkeys((model, tuple(own_micro_batch(extra))) for _, model, _, extra in cases))
    if rank == 0:
        for i, (model, own) in enumerate(references):
            start = time.perf_counter()
            save(" ".join([f"reference:{model}", *own]), f"reference-{i}.pt",
                 run(model, "", list(own), 1, args.micro_batch), start)
    dist.barrier()
    for i, (case, model, layout, extra) in enumerate(cases):
        start = time.perf_counter()
        try:
            result = run(model, layout, extra, world, args.micro_batch)
        except (train.UserError, ValueError) as exc:
            if rank == 0:
                print(json.dumps({"case": case, "refused": str(exc)}), flush=True)
            continue
        save(case, f"case-{i}.pt", result, start)
    exit_cleanly()


if __name__ == "__main__":
    main()
