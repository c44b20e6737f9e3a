"""`apply_plan(model, plan)`: run a Plan on torch.distributed, one transform at a time in a fixed order.

Order (torchtitan's, STYLE.md item 2): PP split -> TP/SP -> CP -> EP -> recompute -> DP/ZeRO. TP must see
the plain modules before recompute wraps them, and FSDP must wrap last so it shards the final parameters.
This version runs TP, recompute and DP/ZeRO; a plan with pp, cp or ep above 1 is refused with a clear
error until those transforms land.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autoshard.planner.capture import capture
from autoshard.planner.errors import UserError
from autoshard.planner.plan import Plan, fingerprint

from .ac import apply_ac
from .dp import apply_dp
from .tp import apply_tp


@dataclass(kw_only=True, slots=True)
class ParallelModel:
    """The sharded model, its optimizer and mesh; `train_step` runs one optimizer step."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    mesh: DeviceMesh | None
    micro_batch: int

    def train_step(self, tokens: torch.Tensor) -> float:
        """One step on this data-parallel rank's share of the global batch of token ids [B, s + 1]; returns
        the global mean next-token loss."""
        dp = self.mesh["dp"].size() if self.mesh is not None else 1
        rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        micro = tokens.chunk(dp)[rank].split(self.micro_batch)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for mb in micro:
            out = self.module(mb[:, :-1])
            logits = getattr(out, "logits", out)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), mb[:, 1:].reshape(-1))
            (loss / len(micro)).backward()
            total += loss.detach() / len(micro)
        self.optimizer.step()
        if dp > 1:
            dist.all_reduce(total, group=self.mesh["dp"].get_group())
            total /= dp
        return total.item()


def apply_plan(model: nn.Module, plan: Plan, mesh: DeviceMesh | None = None, *, lr: float = 1e-3) -> ParallelModel:
    """Shard `model` (real weights, the same on every rank) as `plan` says on the current process group."""
    layout = plan.layout_obj()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if plan.gpus != world:
        raise UserError(f"the plan is for {plan.gpus} GPUs but {world} processes are running; re-plan for "
                        f"{world} or launch {plan.gpus} (torchrun --nproc-per-node ...)")
    graph = capture(model, 1, plan.training["seq_len"])
    if fingerprint(graph) != plan.model["fingerprint"]:
        raise UserError(f"the plan was made for another model ({plan.model['name']}, fingerprint "
                        f"{plan.model['fingerprint']}); this one has fingerprint {fingerprint(graph)}. Re-plan it.")
    not_yet = [k for k in ("pp", "cp", "ep") if getattr(layout, k) > 1]
    if not_yet:
        raise UserError(f"the plan uses {', '.join(f'{k}={getattr(layout, k)}' for k in not_yet)}; this version "
                        "applies tp, dp/zero and recompute only (pipeline, context and expert parallelism come next)")
    if mesh is None and world > 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))  # TP innermost
    blocks = [b.name for b in graph.blocks]
    if layout.tp > 1:
        apply_tp(model, mesh=mesh["tp"], graph=graph)
    modes = {name: layout.recompute for name in blocks}
    for stage in plan.stages:
        modes.update(stage.recompute)
    apply_ac(model, blocks=blocks, modes=modes)
    if layout.dp > 1:
        if layout.tp > 1 and layout.zero < 2:
            raise UserError(f"zero={layout.zero} with tp > 1 needs DDP over DTensor parameters, which PyTorch "
                            "lacks; plan with zero 2 or 3")
        model, optimizer = apply_dp(model, zero=layout.zero, blocks=blocks, lr=lr,
                                    mesh=mesh["dp"] if layout.zero >= 2 else None,
                                    sparse_grads=any(b.moe for b in graph.blocks))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return ParallelModel(module=model, optimizer=optimizer, mesh=mesh, micro_batch=layout.mbs)


def parallelize(model: nn.Module, *, profile: str, global_batch: int, seq_len: int, gpus: int | None = None,
                layout: str | dict | None = None, lr: float = 1e-3) -> ParallelModel:
    """Plan `model` for this job's GPUs (the process group's size unless given) and apply the plan."""
    from autoshard.planner.api import plan as make_plan

    world = dist.get_world_size() if dist.is_initialized() else 1
    chosen = make_plan(model, gpus=gpus or world, profile=profile, global_batch=global_batch, seq_len=seq_len,
                       layout=layout)
    return apply_plan(model, chosen, lr=lr)
