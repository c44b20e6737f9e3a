"""Worker for test_hf_zoo.py and benchmarks/hf_matrix.py: many Hugging Face architectures x layouts in one
multi-process launch (one interpreter start and rendezvous for the whole matrix, which is what keeps the
suite inside its time budget on 2 cores).

    python -m torch.distributed.run --nproc-per-node 4 tests/distributed/hf_zoo_worker.py \
        --cases '{"tiny_gpt2": ["tp=2,dp=2", "pp=2,dp=2"], "tiny_mixtral": ["ep=2,tp=2"]}' [--steps 5]

For each architecture (tests/data/hf/<arch>/config.json, built with `from_config`, parameters on meta and
seeded per name as in examples/train.py) rank 0 trains the unsharded model, then every rank trains each
layout; rank 0 prints one JSON line per case: {"arch", "layout", "status": "match" | "differs" | "refused",
"loss_rel", "grad_err", "losses", "reference", "message"}. "refused" is a UserError/ValueError raised on
every rank before any collective; any other exception ends the worker with its traceback (the ranks may no
longer agree on the next collective).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from spawn import MICRO_BATCH, exit_cleanly  # tests/distributed is the script's directory

from autoshard.cost_models.layout import complete, parse_layout
from autoshard.planner.capture.loading import load_model
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.capture.trace import capture
from autoshard.planner.errors import UserError
from autoshard.synthetic import synthetic_batch
from autoshard.transforms.apply import apply_layout
from autoshard.transforms.init import meta_parameters

HF = Path(__file__).resolve().parents[2] / "tests" / "data" / "hf"
SEED, BATCH, SEQ = 7, 8, 32
LOSS_RTOL, GRAD_TOL = 1e-4, 1e-5


def build(arch: str) -> torch.nn.Module:
    import transformers

    config = load_model(HF / arch).module.config
    with meta_parameters():
        return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


def captured(arch: str) -> ModelGraph:
    """The architecture's ModelGraph, captured once on rank 0 (as `plan` captures it: fx, export, hooks) and
    sent to every rank: it does not depend on the layout, and four ranks capturing each case again on two
    cores took half the launch."""
    box = [dataclasses.replace(capture(build(arch), 1, SEQ), gm=None) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(arch: str, graph: ModelGraph, layout_text: str, steps: int,
          world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of `steps` AdamW steps and the whole gradients after the first, under `layout_text` ("" for the
    unsharded model on this rank alone)."""
    model = build(arch)
    partial = parse_layout(layout_text)
    partial.setdefault("zero", 0)
    partial.setdefault("mbs", MICRO_BATCH if partial.get("pp", 1) == 1 else 1)  # pipelines keep 1
    layout = complete(partial, world if layout_text else 1)
    parallel = apply_layout(model, layout, graph=graph, seed=SEED)
    vocab = model.config.vocab_size
    local = sum(getattr(p, "_local_tensor", p).numel() for p in parallel.module.parameters())
    print(json.dumps({"rank": dist.get_rank() if dist.is_initialized() else 0, "arch": arch, "layout": layout_text,
                      "local_params": local}), file=sys.stderr, flush=True)
    losses, grads = [], {}
    for step in range(steps):
        losses.append(parallel.train_step(synthetic_batch(seed=SEED, step=step, batch=BATCH, seq_len=SEQ,
                                                          vocab=vocab)))
        if step == 0:
            grads = parallel.full_gradients()
    return losses, grads


def compare(got: tuple[list[float], dict], want: tuple[list[float], dict]) -> dict:
    (losses, grads), (ref, ref_grads) = got, want
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True))
    if grads.keys() != ref_grads.keys():
        missing = sorted(ref_grads.keys() ^ grads.keys())[:4]
        return {"status": "differs", "loss_rel": loss_rel, "grad_err": None,
                "message": f"gradient names differ: {missing}"}
    # the test's criterion, torch.testing.assert_close(rtol=atol=1e-5): |g - r| <= atol + rtol |r|, as a ratio
    errors = {n: float(((g - ref_grads[n]).abs() / (GRAD_TOL + GRAD_TOL * ref_grads[n].abs())).max()) * GRAD_TOL
              for n, g in grads.items()}
    worst = max(errors, key=errors.__getitem__)
    ok = loss_rel <= LOSS_RTOL and errors[worst] <= GRAD_TOL
    return {"status": "match" if ok else "differs", "loss_rel": loss_rel, "grad_err": errors[worst],
            "message": "" if ok else f"largest gradient error in {worst}"}


def main() -> None:
    warnings.filterwarnings("ignore")  # transformers' deprecation notes; TP's own are recorded per case
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True, help="JSON: {architecture: [layout, ...]}")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for arch, layouts in json.loads(args.cases).items():
        graph = captured(arch)
        box = [train(arch, graph, "", args.steps, 1) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        reference = box[0]
        for layout in layouts:
            start = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    got = train(arch, graph, layout, args.steps, world)
                notes = sorted({str(w.message) for w in caught if "runs replicated" in str(w.message)})
                result = compare(got, reference) | {"losses": got[0], "replicated": notes}
            except (UserError, ValueError) as exc:
                result = {"status": "refused", "message": str(exc)}
            result |= {"arch": arch, "layout": layout, "reference": reference[0], "seconds": time.perf_counter() - start}
            if rank == 0:
                print(json.dumps(result), flush=True)
    exit_cleanly()


if __name__ == "__main__":
    main()
