"""`apply_plan(model, plan)`: run a Plan on torch.distributed, one transform at a time in a fixed order.

Order (torchtitan's, STYLE.md item 2): PP split -> TP/SP -> CP -> EP -> recompute -> DP/ZeRO -> weights.
TP must see the plain modules before recompute wraps them, FSDP must wrap last so it shards the final
parameters, and a model built on meta gets its weights last, so each rank allocates only its shards (for
zero 0 and 1, where every data-parallel rank holds all of its TP shard anyway, before DDP, which needs
them). Each transform receives only its part of the layout and its axis of the mesh.

The DeviceMesh has named axes ("pp", "dp", "cp", "tp"), TP innermost (consecutive ranks, one NVLink
domain), as the cost model assumes (cost_models/layout.py), plus "dp_cp" (dp x cp flattened) over which
ZeRO shards and the loss is averaged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from autoshard.cost_models.layout import Layout
from autoshard.cost_models.pipeline import chunk_stage as pipeline_chunk_stage
from autoshard.cost_models.pipeline import split_blocks as pipeline_split_blocks
from autoshard.cost_models.validity import schedule_errors
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.capture.reference_model import pop_aux_losses, set_aux_loss_scale
from autoshard.planner.capture.trace import capture
from autoshard.planner.errors import UserError
from autoshard.planner.outputs.plan import Plan, fingerprint

from .ac import apply_ac
from .checkpoint import Resumed, fingerprint_of, load_checkpoint, load_weights, save_checkpoint
from .cp import apply_cp, check_cp
from .dp import ShardedAdamW, apply_dp, apply_dp_to_chunks
from .ep import ExpertShards, apply_ep, check_ep, merge_expert_shards
from .init import clean_fqn, is_meta, materialize, tied_aliases, unregrouped
from .lr_schedule import WarmupCosine
from .pp import PipelineChunk, TiedGradients, build_schedule, chunk_specs, split_from_units, split_model
from .precision import cast_forward_inputs, check_precision, mixed_precision_policy
from .tp import apply_tp, check_tp

BatchSplit = Callable[[Tensor, Tensor], tuple[tuple, dict, Tensor]]
"""(inputs [b, s], targets [b, s]) -> (model args, model kwargs, this rank's targets). The identity for
most layouts; context parallelism (transforms/cp.py) keeps this rank's sequence chunks and their positions."""


def whole_batch(inputs: Tensor, targets: Tensor) -> tuple[tuple, dict, Tensor]:
    return (inputs,), {}, targets


@dataclass(kw_only=True, slots=True)
class ParallelModel:
    """The sharded model, its optimizer and mesh; `train_step` runs one optimizer step."""

    module: nn.Module
    optimizer: object
    mesh: Meshes | None
    micro_batch: int
    device: torch.device
    split_batch: BatchSplit = whole_batch
    experts: ExpertShards | None = None
    """This rank's experts under expert parallelism (their gradients are gathered from their owners)."""
    fingerprint: str = ""
    """Names and shapes of the unsharded model's parameters, hashed (transforms/checkpoint.py)."""
    layout: str = ""
    """The layout this model runs (`Layout.to_string()`)."""
    lr_schedule: WarmupCosine | None = None
    """Sets the learning rate before each optimizer step (transforms/lr_schedule.py); saved in checkpoints."""

    def save(self, path: str | os.PathLike, *, step: int, extra: dict | None = None,
             keep: int | None = None) -> Path:
        """Save model, optimizer and RNG as `path/step_{step}`, each rank its own shards, under the unsharded
        model's names (loads under any layout); `extra`: the caller's JSON state (data position); `keep`: how
        many checkpoints to keep in `path`. A collective (transforms/checkpoint.py)."""
        return save_checkpoint(self, path, step=step, extra=extra, keep=keep)

    def load(self, path: str | os.PathLike) -> Resumed:
        """Load a checkpoint saved under any layout: `path` is one, or a folder of them (the newest is loaded).
        A missing, partial, damaged or foreign checkpoint raises CheckpointError on every rank before any
        collective. Returns the step and extra state saved."""
        return load_checkpoint(self, path)

    def load_weights(self, source: str | os.PathLike | dict[str, Tensor]) -> None:
        """Copy the unsharded model's weights (a state dict or a .safetensors file, e.g. a Hugging Face
        model's) into this rank's shards; each rank reads only its part of a file. No collective."""
        load_weights(self, source if isinstance(source, dict) else Path(source))

    def train_step(self, tokens: Tensor, *, update: bool = True) -> float:
        """One step on this data-parallel rank's share of the global batch of token ids [B, s + 1]; returns
        the global mean next-token loss. `update=False` runs forward and backward only (the gradients are
        dropped, the weights and optimizer state unchanged): the equivalence check of train.py --verify."""
        dp = self.mesh["dp"].size() if self.mesh is not None else 1
        rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        micro = tokens.chunk(dp)[rank].to(self.device).split(self.micro_batch)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        set_aux_loss_scale(self.module, 1 / len(micro))  # the MoE aux losses' share of the step loss
        for mb in micro:
            loss = self._loss_backward(mb, scale=1 / len(micro))
            total += loss / len(micro)
        aux = pop_aux_losses(self.module, len(micro))  # sum over layers and micro-batches, trained by their gradients
        if aux is not None:
            total += aux / len(micro)
        self._finish(update)
        return self._mean_over_replicas(total)

    def _finish(self, update: bool) -> None:
        if update:
            if self.lr_schedule is not None:
                self.lr_schedule.apply(self.optimizer)
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _mean_over_replicas(self, loss: Tensor) -> float:
        """The mean of this rank's loss over dp x cp (every cp rank's mean is over as many tokens)."""
        if self.mesh is not None and self.mesh["dp_cp"].size() > 1:
            dist.all_reduce(loss, group=self.mesh["dp_cp"].get_group())
            loss /= self.mesh["dp_cp"].size()
        return loss.item()

    def _loss_backward(self, mb: Tensor, scale: float) -> Tensor:
        args, kwargs, targets = self.split_batch(mb[:, :-1], mb[:, 1:])
        out = self.module(*args, **kwargs)
        logits = getattr(out, "logits", out)
        vocab_parallel = isinstance(logits, DTensor)
        with loss_parallel() if vocab_parallel else contextlib.nullcontext():
            loss = next_token_loss(logits, targets)
            if getattr(out, "aux_loss", None) is not None:  # Hugging Face MoE with output_router_logits
                loss = loss + hf_aux_loss_coef(self.module) * out.aux_loss
            (loss * scale).backward()
        return _plain(loss.detach())

    def full_gradients(self) -> dict[str, Tensor]:
        """Every parameter's whole gradient by its unwrapped name (a collective: call it on every rank)."""
        grads = whole_gradients(self.module)
        return self.experts.gather(grads) if self.experts is not None else grads


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


MESH_AXES = ("pp", "dp", "cp", "tp")
"""Outermost to innermost, the rank order the cost model assumes (cost_models/layout.py): TP on consecutive
ranks (one NVLink domain), then CP, DP, and PP across the slowest links. EP is carved out of dp x cp
(transforms/ep.py), and ZeRO shards over dp x cp (the "dp_cp" axis), as in torchtitan."""


Meshes = dict[str, DeviceMesh]
"""The 1-D mesh of each axis of MESH_AXES, and "dp_cp"."""


def build_mesh(layout: Layout) -> Meshes:
    """The job's DeviceMesh with axes MESH_AXES (size-1 axes included), as one 1-D mesh per axis."""
    world = dist.get_world_size()
    if layout.gpus != world:
        raise UserError(f"the layout needs pp({layout.pp}) x dp({layout.dp}) x cp({layout.cp}) x tp({layout.tp}) "
                        f"= {layout.gpus} ranks but {world} processes run")
    return axis_meshes(init_device_mesh(device_for_rank().type, tuple(getattr(layout, a) for a in MESH_AXES),
                                        mesh_dim_names=MESH_AXES))


def axis_meshes(root: DeviceMesh) -> Meshes:
    """Split a DeviceMesh with the axes MESH_AXES into its 1-D meshes, plus dp x cp flattened. The flattened
    mesh is kept as `_flatten` returns it (slicing it back out of the root is deprecated in torch)."""
    if root.mesh_dim_names != MESH_AXES:
        raise UserError(f"the mesh must have the axes {MESH_AXES} (outermost first), got {root.mesh_dim_names}")
    return {axis: root[axis] for axis in MESH_AXES} | {"dp_cp": root["dp", "cp"]._flatten("dp_cp")}


def apply_layout(model: nn.Module, layout: Layout, *, graph: ModelGraph, mesh: Meshes | DeviceMesh | None = None,
                 recompute: dict[str, str] | None = None, lr: float = 1e-3, seed: int | None = None,
                 split: list[int] | None = None, precision: str = "fp32", cp_attention: str = "ring",
                 grad_reduce: str | None = None) -> ParallelModel:
    """Shard `model` as `layout` says. A model with real weights must hold the same on every rank; a model
    with meta parameters (transforms/init.py) gets its shards allocated and initialised from `seed`.
    `recompute`: per-block overrides of `layout.recompute` (the plan's per-stage choices).
    `split`: blocks per pipeline chunk (pp x vpp of them; the plan's stage split), even when None.
    `precision`: "fp32", or "bf16": bf16 compute and fp32 master weights (transforms/precision.py);
    `grad_reduce`: the gradient buffer and reduction dtype under bf16, "fp32" or "bf16" (None: the cost
    model's torch default, bf16 under zero 0-1, fp32 under FSDP2's zero 2-3).
    `cp_attention`: how context-parallel attention runs, "ring" (overlapped ring attention) or "allgather"
    (all-gathered keys and values; transforms/cp.py)."""
    meta = is_meta(model)
    if meta and seed is None:
        raise UserError("the model's parameters are on the meta device: pass a seed to initialise its shards")
    check_apply(model, layout, graph=graph, split=split, precision=precision, grad_reduce=grad_reduce,
                cp_attention=cp_attention)
    mp_policy = mixed_precision_policy(precision, zero=layout.zero, grad_reduce=grad_reduce)
    identity = {"fingerprint": fingerprint_of(model), "layout": layout.to_string()}
    if mesh is None and layout.gpus > 1:
        mesh = build_mesh(layout)
    elif isinstance(mesh, DeviceMesh):
        mesh = axis_meshes(mesh)
    if layout.pp > 1:
        return apply_pipeline(model, layout, graph=graph, mesh=mesh, recompute=recompute, lr=lr, seed=seed,
                              split=split, identity=identity, mp_policy=mp_policy, cp_attention=cp_attention)
    device = device_for_rank()
    if not meta:
        model.to(device)
    blocks = [b.name for b in graph.blocks]
    split_batch, experts = shard_model_parallel(model, layout, graph=graph, mesh=mesh, mp_policy=mp_policy,
                                                cp_attention=cp_attention)
    modes = dict.fromkeys(blocks, layout.recompute) | (recompute or {})
    replicas = layout.dp * layout.cp  # ZeRO shards over dp x cp; the cp ranks hold the same weights
    if mp_policy is not None and (replicas == 1 or layout.zero < 2):  # bf16 without FSDP2 to cast the inputs
        cast_forward_inputs([model.get_submodule(b) for b in blocks], mp_policy.param_dtype)
    apply_ac(model, blocks=blocks, modes=modes)
    if meta and (replicas == 1 or layout.zero < 2):
        materialize(model, device, seed)
    if replicas > 1:
        model, optimizer = apply_dp(model, zero=layout.zero, blocks=blocks, lr=lr, mesh=mesh["dp_cp"],
                                    sparse_grads=any(b.moe for b in graph.blocks), mp_policy=mp_policy,
                                    exclude=experts.names if experts is not None else frozenset())
        if experts is not None:  # reduced over the ranks holding the same experts only (transforms/ep.py)
            optimizer = experts.optimizer(optimizer, lr=lr)
    else:
        optimizer = single_replica_optimizer(list(model.parameters()), lr=lr, mp_policy=mp_policy)
    if is_meta(model):
        materialize(model, device, seed)
    return ParallelModel(module=model, optimizer=optimizer, mesh=mesh, micro_batch=layout.mbs, device=device,
                         split_batch=split_batch, experts=experts, **identity)


def single_replica_optimizer(params: list[nn.Parameter], *, lr: float, mp_policy=None) -> object:
    """AdamW for one data-parallel replica; under bf16, `ShardedAdamW` with no group: bf16 parameters, their
    fp32 master in the optimizer (transforms/precision.py)."""
    if mp_policy is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return ShardedAdamW(params, group=None, reduce_grads=False, shard=False, lr=lr, weight_decay=0.0,
                        mp_policy=mp_policy)


def check_apply(model: nn.Module, layout: Layout, *, graph: ModelGraph, split: list[int] | None = None,
                precision: str = "fp32", grad_reduce: str | None = None, cp_attention: str = "ring") -> None:
    """Every refusal apply_layout makes, none of which needs a process group: the layout (check_layout), the
    precision and the stage split. A launcher calls it before init_process_group: a rank that refuses after
    joining can tear the group down while a slower rank is still connecting, whose init then fails with a
    traceback instead of the refusal."""
    check_layout(model, layout, graph=graph, cp_attention=cp_attention)
    try:
        check_precision(precision, layout, grad_reduce)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if layout.pp > 1 and split is not None:
        chunk_specs(len(graph.blocks), split, 0, layout.pp, layout.schedule)  # raises on a split that cannot run


def check_layout(model: nn.Module, layout: Layout, *, graph: ModelGraph, cp_attention: str = "ring") -> None:
    """Refuse, on every rank and before any collective, a layout the model cannot take exactly: each module
    TP or EP would shard must be a pattern they know (transforms/tp.py check_tp, transforms/ep.py check_ep);
    a silently different model is never the result. Modules TP runs replicated instead are named in a
    warning."""
    errors = schedule_errors(layout, "torch")  # zbv's two chunks per rank (micro-batch rules: torch's, at step)
    if errors:
        raise UserError("; ".join(errors))
    try:
        if layout.tp > 1:
            check_tp(model, graph, tp=layout.tp, sp=layout.sp)
        if layout.cp > 1:
            check_cp(model, graph, cp=layout.cp, attention=cp_attention)
        if layout.ep > 1:
            check_ep(model, graph, ep=layout.ep, replicas=layout.dp * layout.cp, zero=layout.zero)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def shard_model_parallel(model: nn.Module, layout: Layout, *, graph: ModelGraph, mesh: Meshes | None,
                         mp_policy=None, cp_attention: str = "ring") -> tuple[BatchSplit, ExpertShards | None]:
    """TP/SP -> CP -> EP on `model` (the whole model, or a pipeline chunk's cut-down copy); returns the batch
    split (CP's) and this rank's experts (EP's)."""
    split_batch: BatchSplit = whole_batch
    experts: ExpertShards | None = None
    try:
        if layout.tp > 1:
            apply_tp(model, mesh=mesh["tp"], graph=graph, sp=layout.sp)
        if layout.cp > 1:  # after TP: the attention modules keep their names, their k/v are this rank's heads
            split_batch = apply_cp(model, mesh=mesh["cp"], graph=graph, attention=cp_attention)
        if layout.ep > 1:  # before recompute and DP: those wrap and shard the final (local) experts
            experts = apply_ep(model, mesh=mesh["dp_cp"], graph=graph, ep=layout.ep, zero=layout.zero,
                               mp_policy=mp_policy)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return split_batch, experts


@dataclass(kw_only=True, slots=True)
class PipelineParallelModel(ParallelModel):
    """A pipeline rank's chunks (`module` is them as an nn.ModuleList) driven by torch's schedule."""

    chunks: list[PipelineChunk]
    schedule_name: str
    stage_indices: list[int]
    n_stages: int
    tied: TiedGradients | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied parameters' names on this rank -> their names in the unsharded model."""
    _schedules: dict[int, object] = field(default_factory=dict)

    def train_step(self, tokens: Tensor, *, update: bool = True) -> float:
        dp = self.mesh["dp"].size()
        local = tokens.chunk(dp)[self.mesh["dp"].get_local_rank()].to(self.device)
        args, kwargs, targets = self.split_batch(local[:, :-1], local[:, 1:])
        inputs = args[0]
        for chunk in self.chunks:  # every stage runs the model's forward on this rank's tokens (CP: a part)
            chunk.seq_len, chunk.model_kwargs = inputs.shape[1], kwargs
        first, last = self.chunks[0].first, self.chunks[-1].last
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[Tensor] = []
        with loss_parallel() if self.mesh["tp"].size() > 1 else contextlib.nullcontext():
            self._schedule(len(local) // self.micro_batch).step(
                *((inputs,) if first else ()), **({"target": targets, "losses": losses} if last else {}))
        if hasattr(self.optimizer, "scale_main_grads"):  # torch's schedule scaled .grad, not bf16's fp32 buffers
            self.optimizer.scale_main_grads(1 / (len(local) // self.micro_batch))
        if self.tied is not None:
            self.tied.sum_gradients()
        self._finish(update)
        total = torch.zeros((), device=self.device)
        if last:
            total += torch.stack([_plain(x).detach() for x in losses]).mean()
        n_micro = len(local) // self.micro_batch
        aux = pop_aux_losses(self.module, n_micro)  # this stage's MoE layers (their gradients: schedule-scaled)
        if aux is not None:
            total += aux / n_micro
        dist.all_reduce(total, group=self.mesh["pp"].get_group())  # only the last stage holds the loss
        return self._mean_over_replicas(total)

    def _schedule(self, n_microbatches: int) -> object:
        if n_microbatches not in self._schedules:
            self._schedules[n_microbatches] = build_schedule(
                self.chunks, self.stage_indices, schedule=self.schedule_name, n_stages=self.n_stages,
                n_microbatches=n_microbatches, device=self.device, group=self.mesh["pp"].get_group(),
                loss_fn=next_token_loss)
        return self._schedules[n_microbatches]

    def full_gradients(self) -> dict[str, Tensor]:
        """Every parameter's whole gradient, gathered from all pipeline stages (a collective on all ranks)."""
        mine = {self.aliases.get(k, k): v for chunk in self.chunks for k, v in whole_gradients(chunk).items()}
        every: list[dict[str, Tensor]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, mine)
        return {k: v for grads in every for k, v in grads.items()}


def whole_gradients(module: nn.Module) -> dict[str, Tensor]:
    grads = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            grads[clean_fqn(name)] = unregrouped(module, name, _plain(p.grad).detach().cpu())
    return grads


def hf_aux_loss_coef(module: nn.Module) -> float:
    """A Hugging Face MoE's `router_aux_loss_coef` (its `aux_loss` is returned with output_router_logits)."""
    config = getattr(module, "config", None) or getattr(getattr(module, "module", None), "config", None)
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def _plain(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def apply_pipeline(model: nn.Module, layout: Layout, *, graph: ModelGraph, mesh: Meshes,
                   recompute: dict[str, str] | None, lr: float, seed: int | None,
                   split: list[int] | None, identity: dict[str, str], mp_policy=None,
                   cp_attention: str = "ring") -> PipelineParallelModel:
    """PP first (each rank keeps its chunks), then per chunk TP/SP -> recompute -> weights, then DP/ZeRO over
    all of this rank's chunks."""
    device = device_for_rank()
    meta = is_meta(model)
    if not meta:
        model.to(device)
    sizes = split or pipeline_split_blocks(len(graph.blocks), layout.pp * layout.vpp)
    if len(sizes) != layout.pp * layout.vpp:
        raise UserError(f"the stage split {sizes} has {len(sizes)} chunks; pp({layout.pp}) x vpp({layout.vpp}) "
                        f"needs {layout.pp * layout.vpp} block counts")
    pp_rank = mesh["pp"].get_local_rank()
    try:
        specs = chunk_specs(len(graph.blocks), sizes, pp_rank, layout.pp, layout.schedule)
        chunks = split_model(model, graph, sizes=sizes, pp_rank=pp_rank, pp=layout.pp, seq_len=graph.seq_len,
                             schedule=layout.schedule)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    parts = [shard_model_parallel(chunk.module, layout, graph=graph, mesh=mesh, mp_policy=mp_policy,
                                  cp_attention=cp_attention) for chunk in chunks]
    split_batch = parts[0][0]
    experts = merge_expert_shards([e for _, e in parts if e is not None])
    names = [b.name for b in graph.blocks]
    modes = dict.fromkeys(names, layout.recompute) | (recompute or {})
    blocks = []
    for chunk, spec in zip(chunks, specs, strict=True):
        mine = [names[i] for i in spec.blocks]
        if mp_policy is not None and (layout.dp * layout.cp == 1 or layout.zero < 2):  # as in apply_layout
            cast_forward_inputs([chunk.module.get_submodule(n) for n in mine], mp_policy.param_dtype)
        apply_ac(chunk.module, blocks=mine, modes=modes)
        blocks += [chunk.module.get_submodule(n) for n in mine]
    replicas = layout.dp * layout.cp
    aliases = tied_aliases(graph.tied)
    for chunk in chunks:
        if meta and (replicas == 1 or layout.zero < 2):
            materialize(chunk, device, seed, aliases)
    if replicas > 1:
        optimizer = apply_dp_to_chunks(chunks, zero=layout.zero, blocks=blocks, mesh=mesh["dp_cp"], lr=lr,
                                       exclude=experts.names if experts is not None else frozenset(),
                                       mp_policy=mp_policy)
        if experts is not None:
            optimizer = experts.optimizer(optimizer, lr=lr)
    else:
        optimizer = single_replica_optimizer([p for c in chunks for p in c.parameters()], lr=lr, mp_policy=mp_policy)
    for chunk in chunks:
        if is_meta(chunk):
            materialize(chunk, device, seed, aliases)
    tied = None
    if graph.tied:
        grid = torch.arange(layout.gpus).view(*(getattr(layout, a) for a in MESH_AXES))  # rank of each coordinate
        ends = (0, pipeline_chunk_stage(len(sizes) - 1, layout.pp, layout.schedule))  # zbv: both on rank 0
        tied = TiedGradients(chunks, graph.tied, grid.flatten(1).T.tolist(), ends)
    return PipelineParallelModel(module=nn.ModuleList(chunks), optimizer=optimizer, mesh=mesh, micro_batch=layout.mbs,
                                 device=device, split_batch=split_batch, chunks=chunks, schedule_name=layout.schedule,
                                 stage_indices=[s.index for s in specs], n_stages=layout.pp * layout.vpp,
                                 tied=tied, aliases=aliases, **identity)


def apply_plan(model: nn.Module, plan: Plan, mesh: DeviceMesh | None = None, *, lr: float = 1e-3,
               seed: int | None = None, precision: str = "fp32", cp_attention: str | None = None) -> ParallelModel:
    """Shard `model` as `plan` says on the current process group (see `apply_layout` for `seed`).
    `precision`: "fp32" (the default: CPU runs and checks), "bf16", or "plan" for the plan's training
    precision and grad_reduce (transforms/precision.py). `cp_attention`: "ring" or "allgather"
    (transforms/cp.py); None: the plan's training.cp_attention if it has one (what it was priced with), else
    "ring"."""
    layout = plan.layout_obj()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if plan.gpus != world:
        raise UserError(f"the plan is for {plan.gpus} GPUs but {world} processes are running; re-plan for "
                        f"{world} or launch {plan.gpus} (torchrun --nproc-per-node ...)")
    graph = capture(model, 1, plan.training["seq_len"])
    if fingerprint(graph) != plan.model["fingerprint"]:
        raise UserError(f"the plan was made for another model ({plan.model['name']}, fingerprint "
                        f"{plan.model['fingerprint']}); this one has fingerprint {fingerprint(graph)}. Re-plan it.")
    recompute, split = plan_choices(plan, graph)
    grad_reduce = None
    if precision == "plan":
        precision, grad_reduce = plan.training.get("precision", "fp32"), plan.training.get("grad_reduce")
    return apply_layout(model, layout, graph=graph, mesh=mesh, recompute=recompute, lr=lr, seed=seed, split=split,
                        precision=precision, cp_attention=cp_attention or plan.training.get("cp_attention") or "ring",
                        grad_reduce=grad_reduce)


def plan_choices(plan: Plan, graph: ModelGraph) -> tuple[dict[str, str], list[int] | None]:
    """What a plan fixes beyond its layout: per-block recompute and the blocks per pipeline chunk."""
    recompute: dict[str, str] = {}
    for stage in plan.stages:
        recompute.update(stage.recompute)
    if plan.layout_obj().pp == 1:
        return recompute, None
    return recompute, split_from_units([s.units for s in plan.stages], [b.name for b in graph.blocks])


def parallelize(model: nn.Module, *, profile: str, global_batch: int, seq_len: int, gpus: int | None = None,
                layout: str | dict | None = None, lr: float = 1e-3, seed: int | None = None) -> ParallelModel:
    """Plan `model` for this job's GPUs (the process group's size unless given) and apply the plan."""
    from autoshard.planner.api import plan as make_plan

    world = dist.get_world_size() if dist.is_initialized() else 1
    chosen = make_plan(model, gpus=gpus or world, profile=profile, global_batch=global_batch, seq_len=seq_len,
                       layout=layout)
    return apply_plan(model, chosen, lr=lr, seed=seed)
