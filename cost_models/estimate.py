"""Step time and peak memory of a layout: the one entry point the planner calls.

step = m x slowest stage + (p-1)/v x mean stage          (pipeline, Narayanan et al. SC'21)
     + exposed data-parallel communication + optimizer step
stage (one micro-batch) = forward + backward compute (+ recompute)
     + TP/SP collectives + EP all-to-alls + exposed CP exchange + PP sends (+ exposed ZeRO-3 traffic)

Which communication hides behind compute (COST_MODEL_NOTES.md, item 5):
- TP/SP and EP collectives sit between dependent kernels: exposed.
- The CP ring exchange of keys and values overlaps the attention of the previous chunk: exposed beyond it.
- ZeRO-3 gathers and reduce-scatters are prefetched under the micro-batch's compute: exposed beyond it,
  and the overlapped compute runs `overlap_slowdown` slower.
- DP gradient reduction overlaps the last micro-batch's backward; ZeRO-1/2's parameter all-gather the
  next step's first forward (Megatron-Core's overlap_grad_reduce and overlap_param_gather).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from autoshard.hardware_profiles import Profile
from autoshard.planner.capture.model_graph import ModelGraph

from . import communication as comm
from . import memory, pipeline
from .compute import ATTN_BWD_FACTOR, optimizer_time, unit_compute
from .framework import Framework, attention_ratio, get_framework, with_cp_attention
from .layout import Layout, Training
from .validity import check
from .work import ACT_BYTES, UnitWork, cost_key, model_work

FSDP_REDUCE_BYTES = 4
"""FSDP reduce-scatters gradients in fp32 (torchtitan's default mixed_precision_reduce)."""


@dataclass(kw_only=True, slots=True)
class Estimate:
    """Predicted step time and memory of one layout."""

    layout: Layout
    training: Training
    profile: str
    step_time_s: float
    tokens_per_sec_per_gpu: float
    mfu: float
    """Model FLOPs (captured forward + backward, no recompute) / (time x GPUs x bf16 peak)."""
    hfu: float
    """As mfu, with recomputed FLOPs counted."""
    peak_memory_bytes: float
    memory_capacity_bytes: float
    micro_batches: int
    peak_stage: int
    stage_times_s: list[float]
    stage_memory_bytes: list[float] = field(default_factory=list)
    """Peak bytes per GPU of each pipeline stage."""
    time_breakdown: dict[str, float] = field(default_factory=dict)
    """Seconds per step: compute, recompute, bubble and each exposed communication."""
    memory_parts: list[tuple] = field(default_factory=list, repr=False)
    """Per stage (states, activations, in-flight bytes) as _memories gives them: stage_memories builds the
    by-kind view from them when asked (most estimates the search makes are never shown)."""

    @property
    def stage_memories(self) -> list[memory.StageMemory]:
        """Peak bytes on one GPU of each pipeline stage, by kind."""
        return [_holding(states, working, logits, held) for states, (working, logits, _), held in self.memory_parts]

    @property
    def memory_breakdown(self) -> dict[str, float]:
        """Bytes on the peak stage's GPU by kind (the kinds it holds)."""
        return {k: v for k, v in self.stage_memory_breakdown[self.peak_stage].items() if v}

    @property
    def stage_memory_breakdown(self) -> list[dict[str, float]]:
        """Bytes on one GPU of each pipeline stage by kind (the report's stacked bars)."""
        return [_mem_dict(mem) for mem in self.stage_memories]

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.memory_capacity_bytes

    def predicted(self) -> dict[str, Any]:
        """The `predicted` object of the CLI's JSON (ARCHITECTURE.md)."""
        gib = 2**30
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_sec_per_gpu": self.tokens_per_sec_per_gpu,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "peak_memory_gib": self.peak_memory_bytes / gib,
            "memory_capacity_gib": self.memory_capacity_bytes / gib,
            "fits": self.fits,
            "over_capacity_gib": max(0.0, (self.peak_memory_bytes - self.memory_capacity_bytes) / gib),
            "peak_stage": self.peak_stage,
            "micro_batches": self.micro_batches,
            "time_breakdown_s": dict(self.time_breakdown),
            "memory_breakdown_gib": {k: v / gib for k, v in self.memory_breakdown.items()},
        }


@dataclass(kw_only=True, slots=True)
class _Stage:
    units: list[UnitWork] = field(default_factory=list)
    chunks: int = 0
    recompute: dict[str, str] = field(default_factory=dict)
    """Unit FQN -> recompute mode."""
    kinds: list[tuple[UnitWork, str, int]] = field(default_factory=list)
    """(one unit of each kind, its recompute mode, how many the stage holds): what the stage costs."""
    key: int = -1
    """Stages with equal keys cost the same: the number `_stages` gives the stage's (chunks, kinds and how many
    of each) in the memo."""
    params: tuple[int, int] = (0, 0)
    """(dense, expert) parameters of its units, unsharded."""


def estimate(graph: ModelGraph, layout: Layout, training: Training, profile: Profile, *,
             split: list[int] | None = None, recompute: dict[str, str] | None = None,
             work: list[UnitWork] | None = None, framework: Framework | None = None,
             validate: bool = True, memo: dict | None = None) -> Estimate:
    """Predict one training step of `graph` (captured at training.seq_len) under `layout` on `profile`.

    `split`: blocks per model chunk (pp x vpp of them, chunk c on stage c mod pp); even when None.
    `recompute`: block FQN -> none|selective|full where a block differs from layout.recompute.
    `work`: model_work(graph), when the caller prices many layouts of one model.
    `framework`: what runs it (default: the one training.framework names, with its stored coefficients).
    `validate=False` skips the framework rules (validity.py), for bounds the search prices on purpose.
    `memo`: a dict kept across calls on one graph, work, training, profile and framework (the search's):
    equal stages of different layouts are priced once.
    """
    if validate:
        check(graph, layout, training)
    memo = {} if memo is None else memo
    fw, stages, degrees = _setup(graph, layout, training, split, recompute, work, framework, memo)
    m = training.global_batch // (layout.dp * layout.mbs)
    groups = comm.layout_groups(layout)
    parts = _parts(layout, training, profile, fw, stages, degrees, memo)
    stage_times = [sum(p.values()) for p in parts]
    pipe = pipeline.step_time(stage_times, m, layout.vpp, layout.schedule)
    grad_bytes = training.grad_bytes(fw.grad_bytes)
    dp_exposed, opt = 0.0, 0.0  # the slowest stage's
    for s, part in {s.key: (s, part) for s, part in zip(stages, parts, strict=True)}.values():
        key = ("dp", s.key, degrees, layout.zero)  # degrees hold dp and mbs: m too
        if key not in memo:
            memo[key] = _data_parallel(s, part, layout, profile, groups, m, fw, grad_bytes)
        dp_exposed, opt = max(dp_exposed, memo[key][0]), max(opt, memo[key][1])
    step = pipe + dp_exposed + opt
    parts_mem = _memories(layout, training, fw, stages, memo)
    totals = [_total(states, working, logits, held) for states, (working, logits, _), held in parts_mem]
    peak = max(range(len(totals)), key=totals.__getitem__)
    gpus = layout.gpus
    model_flops = (graph.fwd_flops + graph.bwd_flops) / graph.tokens * training.tokens
    recompute_flops = _recompute_flops(stages) * training.tokens
    peak_flops = profile.bf16_flops_per_s * gpus * step
    slowest = max(range(len(parts)), key=lambda i: stage_times[i])
    breakdown = {k: v * m for k, v in parts[slowest].items()}
    breakdown["bubble"] = pipe - m * stage_times[slowest]
    breakdown["dp_exposed"] = dp_exposed
    breakdown["optimizer"] = opt
    return Estimate(
        layout=layout, training=training, profile=profile.name,
        step_time_s=step,
        tokens_per_sec_per_gpu=training.tokens / step / gpus,
        mfu=model_flops / peak_flops,
        hfu=(model_flops + recompute_flops) / peak_flops,
        peak_memory_bytes=totals[peak],
        memory_capacity_bytes=profile.hbm_bytes,
        micro_batches=m, peak_stage=peak, stage_times_s=stage_times,
        stage_memory_bytes=totals,
        time_breakdown=breakdown,
        memory_parts=parts_mem,
    )


def peak_memory(graph: ModelGraph, layout: Layout, training: Training, *, work: list[UnitWork] | None = None,
                memo: dict | None = None) -> float:
    """estimate(...).peak_memory_bytes without pricing the time: what the search asks first, since most
    layouts it tries do not fit. Arguments as estimate's (no validation)."""
    memo = {} if memo is None else memo
    fw, stages, degrees = _setup(graph, layout, training, None, None, work, None, memo)
    return max(_total(states, working, logits, held)
               for states, (working, logits, _), held in _memories(layout, training, fw, stages, memo))


def pipeline_time(graph: ModelGraph, layout: Layout, training: Training, profile: Profile, *,
                  work: list[UnitWork] | None = None, memo: dict | None = None) -> float:
    """estimate(...)'s step time less its data-parallel traffic and optimizer step: a lower bound on it that
    ZeRO stages 0-2 share, for the search to prune with. Arguments as estimate's (no validation)."""
    memo = {} if memo is None else memo
    fw, stages, degrees = _setup(graph, layout, training, None, None, work, None, memo)
    stage_times = [sum(p.values()) for p in _parts(layout, training, profile, fw, stages, degrees, memo)]
    return pipeline.step_time(stage_times, training.global_batch // (layout.dp * layout.mbs), layout.vpp,
                              layout.schedule)


def _parts(layout: Layout, training: Training, profile: Profile, fw: Framework, stages: list[_Stage],
           degrees: tuple, memo: dict) -> list[dict[str, float]]:
    """Seconds one micro-batch spends on each stage, by kind (_stage_time)."""
    m = training.global_batch // (layout.dp * layout.mbs)
    zero3 = layout.zero == 3  # ZeRO < 3 leaves stage times alone (degrees hold m's dp and mbs)
    parts, groups = [], None
    for s in stages:
        key = ("time", s.key, degrees, zero3)
        if key not in memo:
            groups = groups or comm.layout_groups(layout)
            memo[key] = _stage_time(s, layout, training, profile, groups, layout.mbs * training.seq_len, m, fw, memo)
        parts.append(memo[key])
    return parts


def _setup(graph: ModelGraph, layout: Layout, training: Training, split: list[int] | None,
           recompute: dict[str, str] | None, work: list[UnitWork] | None, framework: Framework | None,
           memo: dict) -> tuple[Framework, list[_Stage], tuple]:
    """(the framework, the stages, what a stage's time, memory and DP traffic depend on besides its units:
    the degrees and the micro-batch)."""
    fw = memo.get("framework") or with_cp_attention(framework or get_framework(training.framework),
                                                    training.cp_attention)
    memo["framework"] = fw
    memo["work"] = work = work or memo.get("work") or model_work(graph)
    stages = _stages(work, layout, split, recompute, memo)
    return fw, stages, (layout.tp, layout.cp, layout.pp, layout.dp, layout.ep, layout.mbs, layout.sp, layout.async_tp)


def _memories(layout: Layout, training: Training, fw: Framework, stages: list[_Stage],
              memo: dict) -> list[tuple[memory.StageMemory, tuple[float, float, float], float]]:
    """Each stage's (model states and buffers: _stage_states, activations: _stage_activations, bytes of the
    micro-batches it holds in flight), the first two kept in `memo` (ZeRO stages share the activations,
    recompute modes the states)."""
    m = training.global_batch // (layout.dp * layout.mbs)
    held_key = ("in_flight", layout.pp, m, layout.vpp, layout.schedule)
    if held_key not in memo:
        memo[held_key] = [pipeline.in_flight(i, layout.pp, m, layout.vpp, layout.schedule) for i in range(layout.pp)]
    out = []
    kept: dict[tuple, tuple] = {}  # stage key -> (states, activations): middle stages are often alike
    for s, held in zip(stages, memo[held_key], strict=True):
        if s.key not in kept:
            states_key = ("states", s.key if layout.zero == 3 else s.params, layout.tp, layout.cp, layout.dp,
                          layout.ep, layout.pp > 1, layout.zero)
            if states_key not in memo:
                memo[states_key] = _stage_states(s, layout, training.grad_bytes(fw.grad_bytes))
            acts_key = ("activations", s.key, layout.tp, layout.cp, layout.sp, layout.mbs)
            if acts_key not in memo:
                memo[acts_key] = _stage_activations(s, layout, layout.mbs * training.seq_len, training.attention,
                                                    fw)
            kept[s.key] = memo[states_key], memo[acts_key]
        states, acts = kept[s.key]
        out.append((states, acts, held * acts[2]))
    return out


def _stages(work: list[UnitWork], layout: Layout, split: list[int] | None, recompute: dict[str, str] | None,
            memo: dict) -> list[_Stage]:
    """assign_stages with each unit's recompute mode and the stage's kinds (kept in `memo` when the
    recompute is the layout's own)."""
    key = ("stages", layout.pp, layout.vpp, layout.schedule, layout.recompute, tuple(split or ()))
    if recompute is None and key in memo:
        return memo[key]
    stages = assign_stages(work, layout, split)
    for stage in stages:
        stage.recompute = {w.name: (recompute or {}).get(w.name, layout.recompute) for w in stage.units}
        kinds: dict[tuple, list] = {}
        for w in stage.units:
            mode = stage.recompute[w.name]
            kind = kinds.setdefault((_cost_key(w), mode), [w, mode, 0])
            kind[2] += 1
        stage.kinds = [(w, mode, n) for w, mode, n in kinds.values()]
        ids = memo.setdefault("stage_ids", {})  # a small int hashes at once; the tuple it stands for does not
        stage.key = ids.setdefault((stage.chunks, tuple((k, v[2]) for k, v in kinds.items())), len(ids))
        stage.params = (sum(n * w.dense_params for w, _, n in stage.kinds),
                        sum(n * w.expert_params for w, _, n in stage.kinds))
    if recompute is None:
        memo[key] = stages
    return stages


def assign_stages(work: list[UnitWork], layout: Layout, split: list[int] | None = None) -> list[_Stage]:
    """Blocks over pp x vpp chunks (chunk c on stage c mod pp, in a V under zbv), as `split` says or evenly; units before the
    first block join the first chunk, units after the last block the last chunk."""
    block_idx = [i for i, w in enumerate(work) if w.kind == "block"]
    first, last = block_idx[0], block_idx[-1]
    chunks = layout.pp * layout.vpp
    sizes = split if split is not None else pipeline.split_blocks(len(block_idx), chunks)
    if len(sizes) != chunks or sum(sizes) != len(block_idx) or min(sizes) < 1:
        raise ValueError(f"split {sizes} must give each of the {chunks} chunks at least one of {len(block_idx)} blocks")
    stages = [_Stage() for _ in range(layout.pp)]
    start = 0
    for c, size in enumerate(sizes):
        units = work[first + start: first + start + size]
        if c == 0:
            units = work[:first] + units
        if c == chunks - 1:
            units = units + work[last + 1:]
        stage = stages[pipeline.chunk_stage(c, layout.pp, layout.schedule)]
        stage.units.extend(units)
        stage.chunks += 1
        start += size
    return stages


def _stage_time(stage: _Stage, layout: Layout, training: Training, profile: Profile,
                groups: dict[str, comm.Group], tokens: float, m: int, fw: Framework,
                memo: dict | None = None) -> dict[str, float]:
    """Seconds one micro-batch spends on this stage, by kind. `memo` as estimate's: a unit's time is kept
    by what it depends on (its kind and recompute, tp, cp, ep, the micro-batch and the TP switches; the
    groups it uses span tp x cp ranks, whatever the pipeline and data-parallel degrees)."""
    memo = {} if memo is None else memo
    out = dict.fromkeys(("compute", "recompute", "tp_comm", "ep_comm", "cp_exposed", "pp_comm", "zero3_exposed"), 0.0)
    hidden = _hidden(stage)
    for w, mode, n in stage.kinds:  # identical blocks cost the same: each kind is priced once
        for kind, value in _unit_times(w, mode, layout, training, profile, groups, tokens, hidden, fw, memo).items():
            out[kind] += n * value
    if layout.pp > 1:
        out["pp_comm"] = 2 * stage.chunks * _pp_send(tokens / layout.cp * hidden * ACT_BYTES, layout, profile,
                                                     groups, fw)
    if layout.zero == 3:
        exposed = _zero3_exposed(stage, layout, profile, groups, out["compute"] + out["recompute"], fw)
        # under a pipeline the gathers and the reduce-scatter happen once per step (see _stage_memory)
        out["zero3_exposed"] = exposed / m if layout.pp > 1 else exposed
    return out


def _unit_times(w: UnitWork, mode: str, layout: Layout, training: Training, profile: Profile,
                groups: dict[str, comm.Group], tokens: float, hidden: int, fw: Framework, memo: dict) -> dict[str, float]:
    """unit_time of `w` under `mode`, kept in `memo` by what it depends on (_stage_time)."""
    key = ("unit", _cost_key(w), mode, (layout.tp, layout.cp, layout.ep, layout.sp, layout.async_tp, tokens, hidden))
    if key not in memo:
        memo[key] = unit_time(w, layout=layout, training=training, profile=profile, groups=groups, tokens=tokens,
                              hidden=hidden, recompute=mode, kernel_efficiency=fw.kernel_efficiency,
                              cp_comm=fw.cp_comm, tp_overlap=fw.tp_bwd_overlap,
                              attention_ratio=attention_ratio(fw, profile))
    return memo[key]


def kind_times(graph: ModelGraph, layout: Layout, training: Training, profile: Profile, *,
               work: list[UnitWork] | None = None, memo: dict | None = None) -> list[tuple[int, float]]:
    """(how many units, seconds one micro-batch spends in one of them) for each kind of unit (_Stage.kinds) at
    the layout's tp, cp, ep, micro-batch and recompute, whatever its pipeline: what a stage's time is made of
    (_stage_time adds the sends between stages and ZeRO-3's gathers). For the search's floors."""
    memo = {} if memo is None else memo
    layout = dataclasses.replace(layout, pp=1, vpp=1, schedule="1f1b")
    fw, (whole,), _ = _setup(graph, layout, training, None, None, work, None, memo)
    groups = comm.layout_groups(layout)
    hidden, tokens = _hidden(whole), layout.mbs * training.seq_len
    return [(n, sum(_unit_times(w, mode, layout, training, profile, groups, tokens, hidden, fw, memo).values()))
            for w, mode, n in whole.kinds]


def _pp_send(boundary: float, layout: Layout, profile: Profile, groups: dict[str, comm.Group],
             fw: Framework) -> float:
    """One activation (or its gradient) sent to the next stage. Under sequence parallelism each TP rank holds
    and sends 1/tp of it. Without it, Megatron-LM's scatter/gather (Narayanan et al. SC'21 Sec. 4.1) still
    sends 1/tp per rank over its own NIC and all-gathers the whole over NVLink on the receiving stage;
    otherwise every TP rank sends the whole tensor."""
    gather = not layout.sp and fw.pp_scatter_gather and layout.tp > 1
    send = comm.p2p(boundary / layout.tp if layout.sp or gather else boundary, groups["pp"], profile)
    return send + (comm.all_gather(boundary, groups["tp"], profile) if gather else 0.0)


def _cost_key(w: UnitWork) -> tuple | int:
    """Units with equal keys cost the same (model_work numbers the kinds; else all fields but the name)."""
    return w.cost_id if w.cost_id >= 0 else cost_key(w)


def unit_time(w: UnitWork, *, layout: Layout, training: Training, profile: Profile,
              groups: dict[str, comm.Group], tokens: float, hidden: int, recompute: str,
              kernel_efficiency: float = 1.0, cp_comm: str = "ring", tp_overlap: bool = False,
              attention_ratio: float = 1.0) -> dict[str, float]:
    """Seconds one micro-batch spends in one unit on one GPU, by kind (compute and its own collectives).
    `tp_overlap`: the framework overlaps the column-parallel linears' backward collectives with their
    backward GEMMs (framework.tp_bwd_overlap)."""
    tp, cp, sp = layout.tp, layout.cp, layout.sp
    hidden_bytes = tokens / cp * hidden * ACT_BYTES
    t = unit_compute(w, tokens=tokens, tp=tp, cp=cp, precision=training.precision, recompute=recompute,
                     profile=profile, ep=layout.ep, attention=training.attention,
                     kernel_efficiency=kernel_efficiency, cp_comm=cp_comm, attention_ratio=attention_ratio)
    out = {"compute": t.fwd_s + t.bwd_s - t.recompute_s, "recompute": t.recompute_s}
    exposed, overlappable = _tp_comm(w, hidden_bytes, layout, profile, groups["tp"], recompute)
    slow = profile.overlap_slowdown - 1
    if layout.async_tp and w.kind == "block":
        # collectives split against the GEMMs they feed, forward and backward (3x the forward GEMMs)
        tp_t, gemms = exposed + overlappable, 3 * t.gemm_fwd_s
        tp_t = max(0.0, tp_t - gemms) + slow * min(tp_t, gemms)
    elif tp_overlap:
        # the column-parallel linears' dgrad and wgrad GEMMs (about the block's forward GEMM time) hide them
        gemms = t.gemm_fwd_s
        tp_t = exposed + max(0.0, overlappable - gemms) + slow * min(overlappable, gemms)
    else:
        tp_t = exposed + overlappable
    out["tp_comm"] = tp_t
    out["ep_comm"] = 0.0
    if w.moe_top_k and layout.ep > 1:
        # dispatch and combine, forward and backward (Megatron-Core token dispatcher)
        sent = hidden_bytes / (tp if sp else 1) * w.moe_top_k * w.moe_load
        out["ep_comm"] = 4 * comm.all_to_all(sent, groups["ep"], profile)
    out["cp_exposed"] = 0.0
    if w.kv_bytes and cp > 1:
        out["cp_exposed"] = _cp_exposed(w, tokens, tp, cp, cp_comm, t.attn_fwd_s, groups["cp"], profile)
    return out


def _cp_exposed(w: UnitWork, tokens: float, tp: int, cp: int, cp_comm: str, attn_fwd_s: float,
                group: comm.Group, profile: Profile) -> float:
    """Context-parallel exchange left exposed, per micro-batch. Ring: cp-1 steps of the local keys/values
    forward; backward, the keys/values again and their gradients, which take one step more to come home
    (2cp-1 messages; transforms/cp.py ring_backward), each hidden behind the attention of the block held.
    All-gather: the keys/values of all ranks gathered before attention and their gradients reduce-scattered
    after it, neither overlapped (Llama 3 Sec. 3.3.2; transforms/cp.py with cp_attention=allgather keeps the
    gathered keys/values)."""
    if cp_comm == "ring":
        kv = tokens / cp * w.kv_bytes / tp
        ring = (cp - 1) * comm.p2p(kv, group, profile)
        back = ring + cp * comm.p2p(kv, group, profile)
        out = 0.0
        for traffic, compute in ((ring, attn_fwd_s), (back, ATTN_BWD_FACTOR * attn_fwd_s)):
            # what hides still slows the attention it overlaps (NCCL's kernels take SMs: COST_MODEL_NOTES 6)
            out += max(0.0, traffic - compute) + (profile.overlap_slowdown - 1) * min(traffic, compute)
        return out
    gathered = tokens * w.kv_bytes / tp
    return comm.all_gather(gathered, group, profile) + comm.reduce_scatter(gathered, group, profile)


def _hidden(stage: _Stage) -> int:
    """Hidden size from a block's input bytes (16-bit activations)."""
    return int(max((w.input_bytes for w, _, _ in stage.kinds), default=0) // ACT_BYTES)


def _tp_comm(w: UnitWork, hidden_bytes: float, layout: Layout, profile: Profile, group: comm.Group,
             recompute: str = "none") -> tuple[float, float]:
    """(always exposed, overlappable) TP seconds per block and micro-batch (Korthikanti et al., Sec. 4.2.2).
    With SP: forward, an all-gather before and a reduce-scatter after attention and the MLP (4); backward,
    the row-parallel linears' all-gathers of the output gradient (2), exposed, and for the column-parallel
    linears the input all-gathered again for the weight gradient and the input gradient reduce-scattered
    (4), which Megatron overlaps with the dgrad and wgrad GEMMs. Without SP: two all-reduces forward, two
    backward (the column-parallel ones, overlappable with wgrad). Full recompute redoes the forward's.
    Embedding and head: vocab-parallel, one collective each way."""
    if layout.tp == 1:
        return 0.0, 0.0
    if w.kind == "block":
        fwd = 2 if recompute == "full" else 1
        if layout.sp:
            one = comm.all_gather(hidden_bytes, group, profile)
            return (4 * fwd + 2) * one, 4 * one
        one = comm.all_reduce(hidden_bytes, group, profile)
        return 2 * fwd * one, 2 * one
    if w.kind in ("embedding", "head"):
        one = comm.all_gather if layout.sp else comm.all_reduce
        return 2 * one(hidden_bytes, group, profile), 0.0
    return 0.0, 0.0


def _stage_params(stage: _Stage, layout: Layout) -> tuple[float, float]:
    """(dense, expert) parameters on one GPU of this stage."""
    dense, expert = stage.params
    return dense / layout.tp, expert / (layout.tp * layout.ep)


def _zero3_exposed(stage: _Stage, layout: Layout, profile: Profile, groups: dict[str, comm.Group],
                   compute: float, fw: Framework) -> float:
    """FSDP per micro-batch: all-gather 16-bit weights for forward and again for backward (and a third time
    for a recomputed forward under DeepSpeed: Framework.zero3_regather), reduce-scatter the gradients in
    the framework's reduce dtype (ZeRO paper Sec. 7.2.2: 1.5x the DP volume). One gather per block (FSDP2) or per linear
    (DeepSpeed), each paying its own ring latency: at DP in the hundreds the rings are latency-bound. Up to
    `zero3_overlap` of the compute hides them (prefetch)."""
    t = sum(n * _zero3_unit(w, layout, profile, groups, fw, regather=fw.zero3_regather and mode == "full")
            for w, mode, n in stage.kinds)
    hidden = min(t, fw.zero3_overlap * compute)
    return t - hidden + (profile.overlap_slowdown - 1) * hidden


def _zero3_unit(w: UnitWork, layout: Layout, profile: Profile, groups: dict[str, comm.Group],
                fw: Framework, regather: bool = False) -> float:
    """One unit's ZeRO-3 traffic per micro-batch: gathers forward and backward (and for the recomputed
    forward when `regather`), gradient reduce-scatter."""
    t = 0.0
    calls = 1  # "block": one gather per unit
    if fw.zero3_gather == "linear" and w.kind == "block":
        calls = w.gemm_calls
    elif fw.zero3_gather == "tensor":
        calls = w.param_tensors
    gathers = 3 if regather else 2
    dense, expert = w.dense_params / layout.tp, w.expert_params / (layout.tp * layout.ep)
    for params, group in ((dense, groups["dp_cp"]), (expert, groups["edp"])):
        if params <= 0:
            continue
        t += calls * gathers * comm.all_gather(params / calls * memory.WEIGHT_BYTES, group, profile)
        t += calls * comm.reduce_scatter(params / calls * fw.zero3_reduce_bytes, group, profile)
    return t


def _data_parallel(stage: _Stage, part: dict[str, float], layout: Layout, profile: Profile,
                   groups: dict[str, comm.Group], m: int, fw: Framework, grad_bytes: float) -> tuple[float, float]:
    """(exposed DP communication, optimizer step) in seconds of one stage."""
    dense, expert = _stage_params(stage, layout)
    shards = [(dense, groups["dp_cp"]), (expert, groups["edp"])]
    t_grad = t_gather = 0.0
    if layout.zero < 3:
        for params, group in shards:
            # one collective per gradient bucket, each with its ring latency (Framework.bucket_bytes)
            nbytes = params * grad_bytes
            buckets = max(1, math.ceil(nbytes / fw.bucket_bytes(group.size, grad_bytes)))
            if layout.zero == 0:
                t_grad += buckets * comm.all_reduce(nbytes / buckets, group, profile)
            else:
                t_grad += buckets * comm.reduce_scatter(nbytes / buckets, group, profile)
                t_gather += buckets * comm.all_gather(params * memory.WEIGHT_BYTES / buckets, group, profile)
    # gradients reduce under the last micro-batch's backward (about 2/3 of its compute); the
    # parameter all-gather under the next step's first forward (overlap_grad_reduce / _param_gather),
    # where the framework overlaps them (Framework.dp_overlap), chunk by chunk (_overlapped).
    # ZeRO-2 cannot accumulate unreduced gradient shards: it reduce-scatters after every micro-batch.
    hide = part["compute"] if fw.dp_overlap else 0.0
    last_backward, first_forward = hide * 2 / 3, hide / 3
    slow = profile.overlap_slowdown - 1  # the compute a collective hides behind runs this much slower
    if layout.zero == 2:  # every micro-batch's gradients, each under its own backward
        grad_exposed = m * _overlapped(t_grad, last_backward, 1, layout.pp, slow)
    else:
        grad_exposed = _overlapped(t_grad, last_backward, stage.chunks, layout.pp, slow)
    gather_exposed = _overlapped(t_gather, first_forward, stage.chunks, layout.pp, slow)
    sharded = sum(p / (g.size if layout.zero >= 1 else 1) for p, g in shards)
    return grad_exposed + gather_exposed, optimizer_time(sharded, profile)


def _overlapped(comm_s: float, compute_s: float, chunks: int, pp: int, slow: float) -> float:
    """Exposed seconds of a data-parallel collective of `comm_s` that overlaps `compute_s` of one micro-batch's
    backward (or forward) on a stage of `chunks` model chunks.

    Each chunk's share (comm_s / chunks) starts with its chunk's last backward (Megatron-Core and torch's
    schedules sync a chunk's gradients once its last micro-batch is done; the parameter all-gather mirrors
    this in the first forwards). Interleaved 1F1B ends with pp backward steps per chunk, chunk by chunk, so
    the chunks start pp chunk-steps apart and the last one ends the compute. Queued one after another the
    shares end at max(comm_s, (chunks - 1) x gap + share); the compute ends at (chunks - 1) x gap + its own
    chunk-step. One chunk: the exposed time is comm_s less the micro-batch's compute. The compute the
    collective runs beside is `slow` slower (Profile.overlap_slowdown)."""
    step = compute_s / chunks  # one chunk, one micro-batch
    gap = pp * step
    end = (chunks - 1) * gap + step
    exposed = max(0.0, comm_s - end, comm_s / chunks - step)
    return exposed + slow * min(comm_s, end)


def _stage_states(stage: _Stage, layout: Layout, grad_bytes: float) -> memory.StageMemory:
    """Weights, gradients, optimizer state and ZeRO-3's buffers on one GPU of a stage."""
    mem = memory.StageMemory()
    dense, expert = _stage_params(stage, layout)
    for params, shards in ((dense, layout.dp * layout.cp), (expert, layout.dp * layout.cp // layout.ep)):
        w, g, o = memory.model_states(params, zero=layout.zero, shards=shards, grad_bytes=grad_bytes)
        mem.weights, mem.gradients, mem.optimizer = mem.weights + w, mem.gradients + g, mem.optimizer + o
    if layout.zero == 3:
        biggest = max((w.dense_params + w.expert_params / layout.ep for w, _, _ in stage.kinds), default=0) / layout.tp
        # the gathered 16-bit weights of the running and the prefetched block, and one block's fp32 grads
        mem.buffers = biggest * (2 * memory.WEIGHT_BYTES + FSDP_REDUCE_BYTES)
        if layout.pp > 1:
            # with a pipeline the stage keeps its weights gathered between micro-batches and accumulates
            # unsharded fp32 gradients until the last one (torchtitan: reshard_after_forward=False under PP;
            # PipelineStage turns gradient sync off but for the last micro-batch; FSDP2 accumulates
            # unsynced gradients in reduce_dtype)
            mem.buffers += (dense + expert) * (memory.WEIGHT_BYTES + FSDP_REDUCE_BYTES)
    return mem


def _stage_activations(stage: _Stage, layout: Layout, tokens: float, attention: str,
                       fw: Framework) -> tuple[float, float, float]:
    """(activations held whatever the micro-batches in flight: full recompute's working block, the logits,
    the activations one micro-batch leaves saved) on one GPU of a stage."""
    kw = {"tokens": tokens, "tp": layout.tp, "cp": layout.cp, "sp": layout.sp, "attention": attention,
          "gathered": fw.sp_saves_gathered}
    per_mb = sum(n * memory.block_activations(w, recompute=mode, selective=fw.selective, **kw)
                 for w, mode, n in stage.kinds)
    if layout.cp > 1 and fw.cp_comm != "ring":
        # all-gather CP keeps every block's gathered keys/values (beyond its own chunk) for the backward
        per_mb += sum(n * w.kv_bytes for w, mode, n in stage.kinds if mode != "full") * tokens / layout.tp \
            * (1 - 1 / layout.cp)
    full = [w for w, mode, _ in stage.kinds if mode == "full" and w.kind == "block"]
    working = max((memory.working_activations(w, **kw) for w in full), default=0.0)
    logits = sum(loss_peak(w, layout, tokens, fw) for w, _, _ in stage.kinds if w.kind == "head")
    return working, logits, per_mb


def loss_peak(head: UnitWork, layout: Layout, tokens: float, fw: Framework) -> float:
    """What the loss holds at its backward, once whatever the micro-batches in flight (the last chunk runs
    each micro-batch's backward right after its forward): the logits and, under the framework's
    sequence-parallel styles, the head's gathered input beyond its shard."""
    whole = memory.gathered_whole(head, tokens=tokens, tp=layout.tp, cp=layout.cp, sp=layout.sp) \
        if fw.sp_saves_gathered else 0.0
    return whole + memory.logits_bytes(tokens, head.logits, tp=layout.tp, cp=layout.cp,
                                       logit_bytes=fw.logit_bytes_at(layout.tp))


def _holding(states: memory.StageMemory, working: float, logits: float, held: float) -> memory.StageMemory:
    """A stage's peak: its states, its activations with `held` bytes in flight, and the allocator's reserve."""
    out = dataclasses.replace(states, activations=working + held, logits=logits)
    out.reserve = memory.ALLOCATOR_RESERVE * out.total
    return out


def _total(states: memory.StageMemory, working: float, logits: float, held: float) -> float:
    """_holding(...).total, to the bit, without building it."""
    total = states.weights + states.gradients + states.optimizer + (working + held) + logits + states.buffers
    return total + memory.ALLOCATOR_RESERVE * total


def _mem_dict(mem: memory.StageMemory) -> dict[str, float]:
    return {"weights": mem.weights, "gradients": mem.gradients, "optimizer": mem.optimizer,
            "activations": mem.activations, "logits": mem.logits, "buffers": mem.buffers, "reserve": mem.reserve}


def _recompute_flops(stages: list[_Stage]) -> float:
    """Recomputed forward FLOPs per token: a block's whole forward under full recompute, its attention core
    under selective (as captured: unit_work halves the core for the causal kernel and scales the experts by
    their load, undone here)."""
    total = 0.0
    for stage in stages:
        for w, mode, n in stage.kinds:
            if w.kind != "block":
                continue
            if mode == "full":
                total += n * (w.gemm_flops + 2 * w.attn_flops + w.expert_flops / w.moe_load)
            elif mode == "selective":
                total += n * 2 * w.attn_flops
    return total
