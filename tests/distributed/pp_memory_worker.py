"""Worker for test_pp.py's memory test (launched by torchrun): for each pipeline layout in argv[1:], in turn
(one launch per world size), apply it to tiny_llama, run one step with m micro-batches while tracking every
tensor saved for backward, and print, per pipeline rank, the peak bytes held against the bytes one
micro-batch saves: the micro-batches in flight, beside the cost model's `in_flight()` for the schedule
(cost_models/pipeline.py), and what is still held after the step, in the same unit; one JSON line per
layout: {"layout": ..., "rows": [...]}."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from spawn import exit_cleanly  # tests/distributed is the script's directory
from torch.autograd.graph import saved_tensors_hooks

from autoshard.cost_models.layout import complete, parse_layout
from autoshard.cost_models.pipeline import in_flight
from autoshard.planner.capture.reference_model import build_reference_model
from autoshard.planner.capture.spec import load_spec
from autoshard.planner.capture.trace import capture
from autoshard.synthetic import synthetic_batch
from autoshard.transforms.apply import apply_layout
from autoshard.transforms.init import meta_parameters

SPEC = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_llama.yaml"
M, SEQ = 8, 32


class Held:
    """Bytes of the saved tensors alive now and at the peak (a saved tensor dies with its graph node)."""

    def __init__(self) -> None:
        self.live = self.peak = self.total = 0

    def pack(self, t: torch.Tensor) -> "Saved":
        return Saved(t, self)


class Saved:
    """One saved tensor, held detached: a pack hook that keeps the tensor itself makes a cycle when the tensor
    is its node's output (node -> packed object -> tensor -> grad_fn; the warning in torch's
    `saved_tensors_hooks`). Running a node in a backward without retain_graph releases its saved tensors and
    breaks the cycle. Under the zero-bubble schedules no backward does that for most nodes: the input pass
    (torch's `stage_backward_input`) runs with retain_graph=True and the weight pass only runs the nodes that
    lead to a weight, not attention, RoPE or the norms' inputs. With the tensor itself held, those nodes
    leaked (up to 2.7 micro-batches a step on the last stage) and the peaks read 4.67 for 4."""

    def __init__(self, t: torch.Tensor, held: Held) -> None:
        self.t, self.held, self.nbytes = t.detach(), held, t.numel() * t.element_size()
        held.live += self.nbytes
        held.total += self.nbytes
        held.peak = max(held.peak, held.live)

    def __del__(self) -> None:
        self.held.live -= self.nbytes


def measure(text: str) -> list[dict]:
    layout = complete(parse_layout(text), dist.get_world_size())
    with meta_parameters():
        model = build_reference_model(load_spec(SPEC)[0])
    graph = capture(model, 1, SEQ)
    parallel = apply_layout(model, layout, graph=graph, seed=0)
    tokens = synthetic_batch(seed=0, step=0, batch=M * layout.dp, seq_len=SEQ, vocab=256)
    parallel.train_step(tokens)  # the first step also infers the stages' shapes
    held = Held()
    with saved_tensors_hooks(held.pack, lambda saved: saved.t):
        parallel.train_step(tokens)
    stage = parallel.mesh["pp"].get_local_rank()
    row = {"stage": stage, "measured": held.peak / (held.total / M), "left": held.live / (held.total / M),
           "predicted": in_flight(stage, layout.pp, M, layout.vpp, layout.schedule)}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return sorted({r["stage"]: r for r in rows}.values(), key=lambda r: r["stage"])


dist.init_process_group("gloo")
for text in sys.argv[1:]:
    rows = measure(text)
    if dist.get_rank() == 0:
        print(json.dumps({"layout": text, "rows": rows}), flush=True)
exit_cleanly()
