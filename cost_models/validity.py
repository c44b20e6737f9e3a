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
  first/last stages with `decoder_first/last_pipeline_num_layers`; torch pipelining: any split);
- TP divides the query heads, and the kv heads divide TP or TP divides them (kv heads replicated: Megatron
  needs `num_query_groups % tp == 0`, torchtitan and autoshard replicate);
- CP: the sequence splits into 2 x cp chunks (causal load balancing, Megatron and torchtitan);
- EP divides the experts (and dp x cp, checked by Layout itself);
- what the framework runs at all (framework.py): its ZeRO stages (nanotron 0-1, Megatron 0/1/3,
  torchtitan 0/2/3), interleaving (not DeepSpeed's or nanotron's pipeline engines) and ZeRO with a
  pipeline (DeepSpeed refuses ZeRO-2/3 with pipeline parallelism);
- under torch's pipelining schedules (frameworks torch and torchtitan), interleaved 1F1B runs its m
  micro-batches in rounds of max(1, m // pp): m must be a multiple of the rounds
  (torch.distributed.pipelining.ScheduleInterleaved1F1B).
"""

from __future__ import annotations

from autoshard.planner.capture.model_graph import ModelGraph

from .framework import get_framework
from .layout import Layout, Training

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
    out += tp_errors(graph, layout.tp)
    out += cp_errors(training.seq_len, layout.cp)
    m = training.global_batch // (layout.dp * layout.mbs)
    rounds = max(1, m // layout.pp)
    if layout.vpp > 1 and training.framework in TORCH_SCHEDULES and m and m % rounds:
        out.append(f"interleaved rounds (torch's ScheduleInterleaved1F1B): the {m} micro-batches must be a "
                   f"multiple of max(1, m // pp({layout.pp})) = {rounds}")
    out += framework_errors(layout, training.framework)
    moe = next((b.moe for b in graph.blocks if b.moe), None)
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
    if layout.pp > 1 and layout.zero > fw.zero_with_pp:
        out.append(f"{fw.name} runs ZeRO up to stage {fw.zero_with_pp} with pipeline parallelism, not {layout.zero}")
    return out


def tp_errors(graph: ModelGraph, tp: int) -> list[str]:
    """TP splits whole heads: tp divides the query heads; kv heads divide tp or tp divides them."""
    attn = next((b.attention for b in graph.blocks if b.attention), None)
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
