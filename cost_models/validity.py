"""Which layouts can run: the rules the frameworks themselves enforce, each named, nothing stricter.

A layout that trained in public is ground truth that it is valid, so a rule here must be one that
Megatron-Core, torchtitan or torch.distributed really check; preferences (TP inside one NVLink domain,
the interleaving degrees worth searching) belong to the search, never here. Each broken rule comes back
as one sentence naming the rule and the numbers, so that an invalid layout is never reported as a
memory problem.

Rules (what each framework checks):
- whole micro-batches: global batch = m x mbs x dp (Megatron `get_num_microbatches`, torchtitan's
  `global_batch_size % (local_batch_size * dp)`);
- pp x vpp model chunks of at least one block each (Megatron: layers divisible by pp x vpp, or uneven
  first/last stages with `decoder_first/last_pipeline_num_layers`; torch pipelining: any split); Megatron-LM
  before 2024 (megatron_2023) only the even split;
- TP divides the query heads, and the kv heads divide TP or TP divides them (kv heads replicated: Megatron
  needs `num_query_groups % tp == 0`, torchtitan and autoshard replicate);
- CP: the sequence splits into 2 x cp chunks (causal load balancing, Megatron and torchtitan);
- EP divides the experts (and dp x cp, checked by Layout itself);
- what the framework runs at all (framework.py): its ZeRO stages (nanotron 0-1, Megatron 0/1/3,
  torchtitan 0/2/3), interleaving (not DeepSpeed's or nanotron's pipeline engines) and ZeRO with a
  pipeline (DeepSpeed refuses ZeRO-2/3 with pipeline parallelism), and its parallelisms (`Framework.dims`:
  no context parallelism in Megatron-LM before 2024 or in DeepSpeed, FSDP only in llm-foundry);
- under torch's pipelining schedules (frameworks torch and torchtitan), interleaved 1F1B runs its m
  micro-batches in rounds of max(1, m // pp): m must be a multiple of the rounds
  (torch.distributed.pipelining.ScheduleInterleaved1F1B), and so does zb_interleaved at any vpp
  (ScheduleInterleavedZeroBubble);
- zero-bubble schedules (zb_interleaved, zbv) are torch.distributed.pipelining's: only the frameworks
  that run its schedules have them; zbv's V is exactly 2 chunks per rank (ScheduleZBVZeroBubble raises
  "ZBV requires exactly 2 stages per rank"); under autoshard's own runtime (framework torch) not with
  ZeRO-3: FSDP2 reshards each block after its forward, and torch's weight-gradient pass looks the
  parameters up on the module, finding the sharded ones the graph never used (their gradients were
  silently lost in our test; torchtitan keeps the blocks gathered under a pipeline and is not affected).
"""

from __future__ import annotations

from autoshard.planner.capture.model_graph import ModelGraph

from .framework import get_framework
from .layout import Layout, Training
from .pipeline import ZERO_BUBBLE

DIM_NAMES = {"tp": "tensor parallelism", "pp": "pipeline parallelism", "cp": "context parallelism",
             "ep": "expert parallelism"}

TORCH_SCHEDULES = ("torch", "torchtitan")
"""Frameworks that run torch.distributed.pipelining's schedules."""


def layout_errors(graph: ModelGraph, layout: Layout, training: Training) -> list[str]:
    """The rules `layout` breaks on this model and batch (empty when it can run)."""
    out: list[str] = []
    if training.global_batch % (layout.dp * layout.mbs):
        out.append(f"whole micro-batches: the global batch {training.global_batch} must be a multiple of "
                   f"dp({layout.dp}) x mbs({layout.mbs}) = {layout.dp * layout.mbs}")
    blocks = len(graph.blocks)
    if layout.pp * layout.vpp > blocks:
        out.append(f"one block per model chunk: pp({layout.pp}) x vpp({layout.vpp}) = {layout.pp * layout.vpp} "
                   f"chunks exceed the {blocks} blocks")
    elif layout.pp > 1 and get_framework(training.framework).even_stages and blocks % (layout.pp * layout.vpp):
        out.append(f"even pipeline chunks ({training.framework}): the {blocks} blocks must be divisible by "
                   f"pp({layout.pp}) x vpp({layout.vpp}) = {layout.pp * layout.vpp}")
    out += tp_errors(graph, layout.tp)
    out += cp_errors(training.seq_len, layout.cp)
    m = training.global_batch // (layout.dp * layout.mbs)
    out += schedule_errors(layout, training.framework, m)
    out += framework_errors(layout, training.framework)
    moe = next((u.moe for u in graph.units if u.kind == "block" and u.moe), None) if layout.ep > 1 else None
    if layout.ep > 1 and (moe is None or moe.num_experts % layout.ep):
        have = f"{moe.num_experts} experts" if moe else "no experts"
        out.append(f"whole experts per rank: ep({layout.ep}) must divide the number of experts; the model has {have}")
    return out


def framework_errors(layout: Layout, framework: str) -> list[str]:
    """What the framework cannot run: a ZeRO stage it lacks, interleaving, ZeRO-2/3 with a pipeline."""
    fw = get_framework(framework)
    out = []
    if layout.zero not in fw.zero_stages:
        out.append(f"ZeRO stages of {fw.name}: it runs {', '.join(map(str, fw.zero_stages))}, not {layout.zero}")
    if layout.vpp > 1 and not fw.interleaved:
        out.append(f"{fw.name} has no interleaved pipeline schedule: vpp must be 1, got {layout.vpp}")
    for dim in ("tp", "pp", "cp", "ep"):
        if getattr(layout, dim) > 1 and dim not in fw.dims:
            runs = ", ".join(fw.dims) or "data parallelism only"
            out.append(f"{fw.name} has no {DIM_NAMES[dim]}: {dim} must be 1, got {getattr(layout, dim)} (it runs {runs})")
    if layout.pp > 1 and layout.zero > fw.zero_with_pp:
        out.append(f"{fw.name} runs ZeRO up to stage {fw.zero_with_pp} with pipeline parallelism, not {layout.zero}")
    return out


def schedule_errors(layout: Layout, framework: str, m: int | None = None) -> list[str]:
    """The pipeline schedule's rules: torch's rounds of micro-batches (when `m` is known), the zero-bubble
    schedules only under torch's pipelining, zbv's two chunks per rank."""
    if layout.pp == 1:
        return []
    out = []
    torch_schedules = get_framework(framework).name in TORCH_SCHEDULES
    rounds = max(1, (m or 0) // layout.pp)
    if (layout.vpp > 1 or layout.schedule == "zb_interleaved") and torch_schedules and m and m % rounds:
        cls = "ScheduleInterleavedZeroBubble" if layout.schedule == "zb_interleaved" else "ScheduleInterleaved1F1B"
        out.append(f"interleaved rounds (torch's {cls}): the {m} micro-batches must be a "
                   f"multiple of max(1, m // pp({layout.pp})) = {rounds}")
    if layout.schedule in ZERO_BUBBLE and not torch_schedules:
        out.append(f"zero-bubble schedules are torch.distributed.pipelining's: {framework} has no "
                   f"{layout.schedule} (frameworks that run it: {', '.join(TORCH_SCHEDULES)})")
    if layout.schedule in ZERO_BUBBLE and layout.zero == 3 and get_framework(framework).name == "torch":
        out.append(f"zero-bubble weight pass under ZeRO-3: autoshard's FSDP2 reshards each block after its forward "
                   f"and torch's weight-gradient pass ({layout.schedule}) then misses the parameters the graph used; "
                   f"zero must be at most 2, got 3")
    if layout.schedule == "zbv" and layout.vpp != 2:
        out.append(f"zbv's V (torch's ScheduleZBVZeroBubble): exactly 2 chunks per pipeline rank, vpp must be 2, "
                   f"got {layout.vpp}")
    return out


def tp_errors(graph: ModelGraph, tp: int) -> list[str]:
    """TP splits whole heads: tp divides the query heads; kv heads divide tp or tp divides them."""
    attn = next((u.attention for u in graph.units if u.kind == "block" and u.attention), None)
    if attn is None or tp == 1:
        return []
    out = []
    if attn.heads % tp:
        out.append(f"whole attention heads per TP rank: tp({tp}) must divide the {attn.heads} query heads")
    if attn.kv_heads % tp and tp % attn.kv_heads:
        out.append(f"whole kv heads per TP rank: tp({tp}) and the {attn.kv_heads} kv heads must divide one another")
    return out


def cp_errors(seq_len: int, cp: int) -> list[str]:
    """Causal load balancing gives each CP rank two chunks: the sequence splits into 2 x cp."""
    if cp > 1 and seq_len % (2 * cp):
        return [f"context-parallel chunks: seq_len {seq_len} must be divisible by 2 x cp({cp}) "
                "(causal load balancing gives each CP rank two chunks)"]
    return []


def check(graph: ModelGraph, layout: Layout, training: Training) -> None:
    """Raise ValueError naming every rule the layout breaks."""
    if graph.seq_len != training.seq_len:
        raise ValueError(f"the model was captured at seq_len {graph.seq_len}, the training uses {training.seq_len}")
    errors = layout_errors(graph, layout, training)
    if errors:
        raise ValueError("; ".join(errors))
