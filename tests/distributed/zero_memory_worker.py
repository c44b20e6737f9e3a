"""Worker for test_zero_memory.py (launched by torchrun): for each layout in argv[1:], in turn (one launch per
world size), apply it to tiny_llama, run one step, print on rank 0 the bytes this rank holds in parameters,
gradients and optimizer state (local shards only) beside the cost model's prediction for the same layout
(cost_models/memory.py, in fp32 terms): one JSON line per layout."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from spawn import exit_cleanly  # tests/distributed is the script's directory

from autoshard.cost_models.layout import complete, parse_layout
from autoshard.cost_models.memory import model_states
from autoshard.planner.capture.reference_model import build_reference_model
from autoshard.planner.capture.spec import load_spec
from autoshard.planner.capture.trace import capture
from autoshard.transforms.apply import apply_layout
from autoshard.transforms.dp import ShardedAdamW, local
from autoshard.transforms.init import meta_parameters

SPEC = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_llama.yaml"


def param_bytes(module: torch.nn.Module) -> int:
    return sum(local(p).numel() * 4 for p in module.parameters())


def held(parallel, at_forward_end: int) -> dict[str, int]:
    """Bytes held, the parameters at their peak: at rest after the step, or at the end of the forward, where
    ZeRO-2 (FSDP2 without resharding after forward) holds every block's weights gathered until its backward."""
    params = list(parallel.module.parameters())
    opt = parallel.optimizer
    states = opt.inner.state if isinstance(opt, ShardedAdamW) else opt.state
    optimizer = sum(local(v).numel() * v.element_size() for s in states.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    if isinstance(opt, ShardedAdamW) and opt.shard:
        optimizer += opt.master.numel() * opt.master.element_size()  # the fp32 master slice ZeRO-1 steps
    return {"params": max(param_bytes(parallel.module), at_forward_end),
            "grads": sum(local(p.grad).numel() * 4 for p in params if p.grad is not None),
            "optimizer": optimizer}


def measure(text: str) -> dict:
    layout = complete(parse_layout(text), dist.get_world_size())
    with meta_parameters():
        model = build_reference_model(load_spec(SPEC)[0])
    graph = capture(model, 1, 32)
    parallel = apply_layout(model, layout, graph=graph, seed=0)
    peak = [0]
    parallel.module.register_forward_hook(lambda m, args, out: peak.__setitem__(0, max(peak[0], param_bytes(m))))
    parallel.train_step(torch.randint(0, 256, (2 * layout.dp, 33), generator=torch.Generator().manual_seed(0)))
    # fp32 training: 4-byte weights and gradients; AdamW's two fp32 moments (8 B), plus ZeRO-1's fp32 master
    # slice (the 4 B a mixed-precision run keeps as its master weights: 12 B, the cost model's default)
    w, g, o = model_states(graph.params / layout.tp, zero=layout.zero, shards=layout.dp, weight_bytes=4,
                           grad_bytes=4, optimizer_bytes=12 if layout.zero == 1 else 8)
    return {"layout": text, "held": held(parallel, peak[0]), "predicted": {"params": w, "grads": g, "optimizer": o}}


dist.init_process_group("gloo")
for text in sys.argv[1:]:
    report = measure(text)
    if dist.get_rank() == 0:  # one writer: two ranks' lines can interleave on the shared stdout
        print(json.dumps(report), flush=True)
exit_cleanly()
