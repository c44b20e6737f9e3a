"""Worker for test_zero_memory.py (launched by torchrun): after one step at ZeRO stage argv[1], print the
bytes this rank holds in parameters, gradients and optimizer state (local shards only)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autoshard.planner import structure
from autoshard.planner.reference_model import build_reference_model
from autoshard.planner.spec import load_spec
from autoshard.transforms.dp import apply_dp

SPEC = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_llama.yaml"


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


dist.init_process_group("gloo")
torch.manual_seed(0)
model = build_reference_model(load_spec(SPEC)[0])
blocks = structure.find_block_container(model)[1]
model, optimizer = apply_dp(model, zero=int(sys.argv[1]), blocks=blocks)
tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(dist.get_rank()))
logits = model(tokens[:, :-1])
F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
optimizer.step()
params = list(model.parameters())
held = {
    "params": sum(local(p).numel() * 4 for p in params),
    "grads": sum(local(p.grad).numel() * 4 for p in params if p.grad is not None),
    "optimizer": sum(local(v).numel() * v.element_size() for s in optimizer.state.values()
                     for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
}
if hasattr(optimizer, "optim"):  # ZeroRedundancyOptimizer keeps its shard's state in the wrapped optimizer
    held["optimizer"] = sum(v.numel() * v.element_size() for s in optimizer.optim.state.values()
                            for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
if dist.get_rank() == 0:  # one writer: two ranks' lines can interleave on the shared stdout
    print(json.dumps(held), flush=True)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called without an active exception")
