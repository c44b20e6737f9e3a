"""What each unit of a captured model costs per token, before any parallelism.

The capture runs on meta, where SDPA takes its math path: fp32 copies of q, k, v, the s x s
probabilities, and a FLOP count of the full (non-causal) score matrix. Training runs a fused kernel
instead, so the attention core is re-priced here:
- FLOPs: causal FlashAttention computes half the score matrix (Dao, arXiv:2307.08691, Sec. 3.1).
- saved bytes: q, k, v and the output in 16 bits plus the fp32 log-sum-exp per head (FlashAttention-2
  keeps only these for its backward).
RMSNorm is re-priced the same way: on meta it decomposes into fp32 elementwise ops that save about 8h
bytes per token, where the fused kernel training uses (Apex/TE, torch's CUDA rms_norm) saves its 16-bit
input and one fp32 statistic per token.
Everything else is the model's own measured number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autoshard.planner.capture.model_graph import ModelGraph, Unit

ACT_BYTES = 2
"""Activation element size in 16-bit training."""
NORM_OPS = ("rms_norm", "layer_norm")


@dataclass(kw_only=True, frozen=True, slots=True)
class UnitWork:
    """Per-token costs of one unit, unsharded, at the captured sequence length."""

    name: str
    kind: str
    gemm_flops: float
    """Forward FLOPs of dense linears (attention, MLP, router, shared experts, head)."""
    gemm_calls: int
    """Dense GEMM launches per forward, to size the average GEMM (small GEMMs run below peak)."""
    param_tensors: int = 1
    """Parameter tensors (weights, biases, norm scales): DeepSpeed of 2021 gathered each on its own."""
    attn_flops: float
    """Forward FLOPs of the causal attention core under a fused kernel."""
    act_bytes: float
    """Bytes saved for backward, the attention core priced as a fused kernel."""
    core_bytes: float
    """Of act_bytes, what the attention core saves (selective recompute drops it)."""
    input_bytes: float
    """The unit's input activation (what full recompute keeps)."""
    logits: int = 0
    """Logits per token the unit computes for the loss (the head's vocabulary; 0 elsewhere)."""
    gathered_bytes: float = 0.0
    """Per token, the inputs its column-parallel linears all-gather under sequence parallelism: the
    attention's and the MLP's (their q/k/v or gate/up linears share one gather) in a block, the head's.
    Frameworks whose linears save that gathered input for the weight gradient keep it whole
    (Framework.sp_saves_gathered)."""
    dense_params: int
    expert_params: int
    expert_flops: float = 0.0
    """Forward FLOPs of the routed experts: balanced routing x moe_load."""
    experts: int = 0
    """Routed experts: with EP, a GPU runs experts/ep of them on tokens gathered from the EP group."""
    moe_top_k: int = 0
    moe_load: float = 1.0
    """Routed rows per token x top_k: 1 dropless (balanced), the capacity factor cf with a capacity, whose
    bound cf x balanced is the load of the busiest expert, which sets the EP step (and what Megatron pads
    to): it scales expert_flops and the all-to-all bytes."""
    kv_bytes: float = 0.0
    """Keys and values of one token (what context parallelism exchanges)."""
    score_bytes: float = 0.0
    """One query token's row of attention scores over all heads (heads x seq x 2 B): what an unfused
    kernel writes to HBM."""
    causal_attention: bool = True
    sac_op_bytes: float = 0.0
    """Bytes torchtitan's op-level selective AC keeps: the block input, the SDPA output with its
    log-sum-exp, and every other matmul output in execution order (the 1st, 3rd, ...)."""
    cost_id: int = -1
    """Units of one model with equal cost_id cost the same (model_work sets it; -1: not known), so the cost
    model prices each kind of block once."""


def unit_work(graph: ModelGraph, unit: Unit) -> UnitWork:
    tokens = graph.tokens
    attn = unit.attention
    core_flops = attn.core_fwd_flops if attn else 0
    core_measured = attn.core_saved_bytes if attn else 0
    core_fused, kv, scores = 0.0, 0.0, 0.0
    if attn is not None:
        scores = attn.heads * graph.seq_len * ACT_BYTES
        # FlashAttention-2 keeps q, k, v, o (16-bit) and the fp32 log-sum-exp of each query row and head.
        core_fused = tokens * ((2 * attn.heads + 2 * attn.kv_heads) * attn.head_dim * ACT_BYTES + attn.heads * 4)
        kv = 2 * attn.kv_heads * attn.head_dim * ACT_BYTES
    norm_measured = sum(n for op, n in unit.saved_by_op.items() if op in NORM_OPS)
    norms = len(unit.norms) if unit.kind == "block" else int(unit.kind == "norm")
    norm_fused = min(norm_measured, norms * tokens * (graph.hidden * ACT_BYTES + 8))
    expert = unit.moe.num_experts * unit.moe.expert_params if unit.moe else 0
    # balanced routing: each token meets top_k experts, each expert is 2 x params FLOPs per token (the
    # capture runs this; the router it runs once is in gemm_flops)
    expert_flops = 2.0 * unit.moe.top_k * unit.moe.expert_params if unit.moe else 0.0
    load = unit.moe.capacity_factor if unit.moe and unit.moe.capacity_factor is not None else 1.0
    return UnitWork(
        name=unit.name,
        kind=unit.kind,
        gemm_flops=(unit.fwd_flops - core_flops) / tokens - expert_flops,
        gemm_calls=_gemm_calls(unit),
        param_tensors=max(1, unit.param_tensors),
        attn_flops=core_flops / 2 / tokens,
        act_bytes=(unit.saved_bytes - core_measured + core_fused - norm_measured + norm_fused) / tokens,
        core_bytes=core_fused / tokens,
        input_bytes=graph.hidden * ACT_BYTES if unit.kind == "block" else 0.0,
        gathered_bytes=graph.hidden * ACT_BYTES * _gathered_inputs(unit),
        logits=graph.vocab if unit.kind == "head" else 0,
        dense_params=unit.params - expert,
        expert_params=expert,
        expert_flops=expert_flops * load,
        experts=unit.moe.num_experts if unit.moe else 0,
        moe_top_k=unit.moe.top_k if unit.moe else 0,
        moe_load=load,
        kv_bytes=kv,
        score_bytes=scores,
        sac_op_bytes=_sac_op_bytes(graph, unit),
    )


def _gathered_inputs(unit: Unit) -> int:
    """Inputs the unit all-gathers under sequence parallelism: one per attention and per MLP or MoE, the head's."""
    if unit.kind == "head":
        return 1
    return int(unit.attention is not None) + int(unit.mlp is not None or unit.moe is not None) if unit.kind == "block" else 0


def _sac_op_bytes(graph: ModelGraph, unit: Unit) -> float:
    """Per token: block input + SDPA output and LSE + every other linear output. Linear widths come from the
    structure: q, k, v (or one fused qkv), the output projection, then the MLP's column linears (width from
    its parameters) and its row linear; a MoE block keeps its routed tokens' outputs, priced as its
    shared/dense part only (approximation)."""
    attn, h = unit.attention, graph.hidden
    if unit.kind != "block" or attn is None:
        return 0.0
    q, kv = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
    outs = [q, kv, kv] if len(attn.column) >= 3 else [q + 2 * kv]
    outs.append(h)
    attn_params = h * (q + 2 * kv) + q * h
    mlp_params = max(0, unit.params - attn_params - (unit.moe.num_experts * unit.moe.expert_params if unit.moe else 0))
    if unit.mlp is not None and mlp_params:
        cols = max(1, len(unit.mlp.column))
        ffn = mlp_params / ((cols + 1) * h)
        outs += [ffn] * cols + [h]
    kept = sum(outs[::2])
    return (h + q + kept) * ACT_BYTES + attn.heads * 4



def _gemm_calls(unit: Unit) -> int:
    calls = 0
    if unit.attention:
        calls += len(unit.attention.column) + len(unit.attention.row)
    if unit.mlp:
        calls += len(unit.mlp.column) + len(unit.mlp.row)
    if unit.moe:
        # router + shared experts as SwiGLU triples (the common case; only sizes the GEMMs)
        calls += 1 + 3 * len(unit.moe.shared)
    if unit.kind == "head":
        calls = 1
    return max(calls, 1)


def model_work(graph: ModelGraph) -> list[UnitWork]:
    """Unit costs in execution order (ops in the model body outside every unit are few and not priced)."""
    works = [unit_work(graph, u) for u in graph.units]
    ids: dict[tuple, int] = {}
    return [dataclasses.replace(w, cost_id=ids.setdefault(cost_key(w), len(ids))) for w in works]


def cost_key(w: UnitWork) -> tuple:
    """Everything that prices a unit (all but its name and cost_id)."""
    return tuple(getattr(w, f) for f in w.__slots__ if f not in ("name", "cost_id"))
