"""Bytes per logit at the loss, measured: PyTorch's cross-entropy on 16-bit logits upcast to fp32, as
autoshard (transforms/apply.py) and torchtitan compute it, without TP and under DTensor's `loss_parallel`
(vocabulary-sharded logits, 2 gloo ranks). The cost model's figures are memory.LOGIT_BYTES and
memory.VOCAB_PARALLEL_LOGIT_BYTES.

Measured as the process's peak resident memory above what it held before the loss, per local logit: CPU
tensors this large are mmap'ed by the allocator and returned on free, so the resident set follows the live
tensors. The forward peak is read before the backward starts.

    .venv/bin/python benchmarks/loss_memory.py
"""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from autoshard.cost_models import memory

TOKENS, VOCAB_PER_RANK = 8192, 16384


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(world: int) -> tuple[float, float]:
    """(forward peak, overall peak) bytes per local logit of one forward and backward of the loss."""
    torch.manual_seed(0)
    targets = torch.randint(0, VOCAB_PER_RANK * world, (TOKENS,))
    local = torch.randn(TOKENS, VOCAB_PER_RANK, dtype=torch.bfloat16)
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        logits = DTensor.from_local(local, mesh, [Shard(-1)]).requires_grad_()
    else:
        logits = local.requires_grad_()
    base = _rss()
    if _peak_rss() > base + local.numel():
        raise RuntimeError("the process peaked above its current memory before the loss: cannot measure")
    with loss_parallel() if world > 1 else torch.enable_grad():
        head_out = logits * 1.0  # the head's fresh 16-bit output
        loss = F.cross_entropy(head_out.float(), targets)
        forward = _peak_rss() - base
        del head_out  # as the training step drops its reference before the backward
        loss.backward()
    n = local.numel()
    return forward / n, (_peak_rss() - base) / n


def _rank(rank: int, world: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = measure(world)
    if rank == 0:
        out["result"] = result
    dist.destroy_process_group()


def main() -> None:
    print("| logits | forward peak (B/logit) | backward peak (B/logit) | cost model (B/logit) |")
    print("|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for world, name, model in ((1, "whole vocabulary (tp = 1)", memory.LOGIT_BYTES),
                               (2, "vocabulary-parallel, loss_parallel (tp = 2)", memory.VOCAB_PARALLEL_LOGIT_BYTES)):
        with ctx.Manager() as manager:
            out = manager.dict()
            mp.start_processes(_rank, args=(world, out), nprocs=world, start_method="spawn")
            forward, overall = out["result"]
        print(f"| {name} | {forward:.2f} | {overall:.2f} | {model} |")


if __name__ == "__main__":
    main()
