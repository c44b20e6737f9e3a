"""The stage-assignment ILP: which blocks go to which pipeline chunk, and which blocks recompute.

Given the degrees (tp, pp, vpp, cp, ep, dp, zero, micro-batch), the model's blocks are split into C = pp x vpp
contiguous chunks (chunk c on pipeline rank c mod pp, in a V under zbv: pipeline.chunk_stage), the embedding joining the first chunk and the
norm and head the last. Blocks come in *runs* of identical blocks (same signature: a dense-first MoE model
has two runs); blocks of one run are interchangeable, so they share variables.

Variables
    n[c, r]    integer >= 0   blocks of run r in chunk c
    k[c, r, a] integer >= 0   of those, blocks recomputing with mode a (none, selective, full)
    u[c, r]    binary         chunk c holds a block of run r
    f[s, r]    binary         stage s recomputes some block of run r in full (its working set)
    T[s]       continuous     time of one micro-batch on stage s;  T_max >= T[s]

Objective (pipeline.step_time with the slowest stage bounded by T_max; f = pipeline.fill_drain, (p-1)/v for
1F1B and interleaved, (p-1)/(3v) for the zero-bubble schedules):
    minimise  m * T_max + f / p * sum_s T[s]

Constraints (one method each)
    run cover      sum_c n[c, r] = |r|                                        add_cover_constraint
    chunks         sum_r n[c, r] >= 1                                         add_chunk_constraint
    contiguity     n[c, r] <= |r| u[c, r];  sum_{c' > c} n[c', r] <= |r| (1 - u[c, r+1])
                   (once a chunk holds run r+1, no later chunk holds run r)  add_contiguity_constraint
    interleaving   | sum_r n[c, r] - sum_r n[c + p, r] | <= 1 (a rank's chunks differ by at most one block:
                   the schedule's steps are chunk-sized, and it removes symmetric solutions)  add_balance_constraint
    recompute      sum_a k[c, r, a] = n[c, r]                                 add_recompute_constraint
    stage time     T[s] = fixed_s + sum_{c on s, r, a} k[c, r, a] t[r, a] <= T_max   add_time_constraint
    memory         (1 + reserve) (fixed_mem_s + sum n[c, r] states[r] + held_s sum k[c, r, a] act[r, a]
                   + sum_r f[s, r] work[r]) <= capacity;  sum_{c on s} k[c, r, full] <= |r| f[s, r]
                                                                              add_memory_constraint
Coefficients t, act, states and work come from the cost model for one block of each run (estimate.unit_time,
memory.block_activations, memory.model_states), so the ILP and estimate() price a split the same way.
CBC (bundled with PuLP) solves it, HiGHS when installed, to a 0.2% gap and a node limit (not a time limit,
which would make the answer depend on the machine's speed), with CBC's cut generation off: on these small,
symmetric models the cuts cost most of the solve and branching closes the gap anyway (70B, GPT-3 175B, 405B,
DeepSeek-V3 searches: 1.5-7x less CBC time, the same or a lower objective); no files are left behind.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from autoshard.cost_models import communication as comm
from autoshard.cost_models import memory, pipeline
from autoshard.cost_models.estimate import FSDP_REDUCE_BYTES, loss_peak, unit_time
from autoshard.cost_models.framework import Framework, attention_ratio, get_framework, with_cp_attention
from autoshard.cost_models.layout import RECOMPUTE, Layout, Training
from autoshard.cost_models.work import ACT_BYTES, UnitWork
from autoshard.hardware_profiles import Profile

if TYPE_CHECKING:
    import pulp

GAP_REL = 0.002
"""Stop within 0.2% of the optimum (well inside the cost model's error): deterministic, unlike a time limit."""
MAX_NODES = 300
"""Branch-and-bound nodes: the search_speed examples get the plans 2,000 nodes gave (Llama-3 70B: CBC 0.86 -> 0.36 s)."""
TIME_LIMIT_S = 20
"""Safety net only; the node limit and the gap end the search first on every model tested."""


@dataclass(kw_only=True, frozen=True, slots=True)
class StageAssignment:
    split: list[int]
    """Blocks per chunk."""
    recompute: dict[str, str]
    """Block FQN -> recompute mode (every block)."""
    objective_s: float
    status: str


@dataclass(kw_only=True, slots=True)
class _Run:
    blocks: list[UnitWork]
    time: dict[str, float]
    act: dict[str, float]
    states: float
    work: float


class StageILP:
    """Build and solve the model above for one layout."""

    def __init__(self, work: list[UnitWork], layout: Layout, training: Training, profile: Profile,
                 *, modes: tuple[str, ...] = RECOMPUTE, framework: Framework | None = None) -> None:
        self.layout, self.training, self.profile, self.modes = layout, training, profile, modes
        self.fw = with_cp_attention(framework or get_framework(training.framework), training.cp_attention)
        self.m = training.global_batch // (layout.dp * layout.mbs)
        self.tokens = layout.mbs * training.seq_len
        self.groups = comm.layout_groups(layout)
        first = next(i for i, w in enumerate(work) if w.kind == "block")
        last = max(i for i, w in enumerate(work) if w.kind == "block")
        self.pre, self.post = work[:first], work[last + 1:]
        self.hidden = int(work[first].input_bytes // ACT_BYTES)
        self.runs = [self._run(blocks) for blocks in _runs(work[first:last + 1])]
        self.chunks = layout.pp * layout.vpp

    # ---------------------------------------------------------------- coefficients

    def _run(self, blocks: list[UnitWork]) -> _Run:
        w = blocks[0]
        kw = self._activation_kw()
        time = {a: sum(self._unit_time(w, a).values()) for a in self.modes}
        act = {a: memory.block_activations(w, recompute=a, selective=self.fw.selective, **kw) for a in self.modes}
        return _Run(blocks=blocks, time=time, act=act, states=self._states(w),
                    work=memory.working_activations(w, **kw))

    def _activation_kw(self) -> dict:
        """memory.block_activations' keywords at this layout (as estimate._stage_activations passes them)."""
        return {"tokens": self.tokens, "tp": self.layout.tp, "cp": self.layout.cp, "sp": self.layout.sp,
                "attention": self.training.attention, "gathered": self.fw.sp_saves_gathered}

    def _unit_time(self, w: UnitWork, mode: str) -> dict[str, float]:
        return unit_time(w, layout=self.layout, training=self.training, profile=self.profile, groups=self.groups,
                         tokens=self.tokens, hidden=self.hidden, recompute=mode,
                         kernel_efficiency=self.fw.kernel_efficiency, cp_comm=self.fw.cp_comm,
                         tp_overlap=self.fw.tp_bwd_overlap, attention_ratio=attention_ratio(self.fw, self.profile))

    def _states(self, w: UnitWork) -> float:
        """Model-state bytes of one unit on one GPU (see estimate._stage_memory)."""
        lay = self.layout
        dense, expert = w.dense_params / lay.tp, w.expert_params / (lay.tp * lay.ep)
        g = self.training.grad_bytes(self.fw.grad_bytes)
        total = sum(memory.model_states(dense, zero=lay.zero, shards=lay.dp * lay.cp, grad_bytes=g))
        total += sum(memory.model_states(expert, zero=lay.zero, shards=lay.dp * lay.cp // lay.ep, grad_bytes=g))
        if lay.zero == 3 and lay.pp > 1:
            total += (dense + expert) * (memory.WEIGHT_BYTES + FSDP_REDUCE_BYTES)
        return total

    @cached_property
    def _fixed_parts(self) -> list[tuple[float, float]]:
        """_fixed of every stage."""
        return [self._fixed(s) for s in range(self.layout.pp)]

    def _fixed(self, stage: int) -> tuple[float, float]:
        """(time, memory) of the units outside the blocks on this stage, plus its pipeline sends."""
        lay, p = self.layout, self.layout.pp
        last = pipeline.chunk_stage(self.chunks - 1, p, lay.schedule)
        units = (self.pre if stage == 0 else []) + (self.post if stage == last else [])
        t = sum(sum(self._unit_time(w, "none").values()) for w in units)
        kw = self._activation_kw()
        held = pipeline.in_flight(stage, p, self.m, lay.vpp, lay.schedule)
        mem = sum(self._states(w) + held * memory.block_activations(w, recompute="none", **kw) for w in units)
        mem += sum(loss_peak(w, lay, self.tokens, self.fw) for w in units if w.kind == "head")
        if lay.zero == 3:
            # gathered weights of the running and the prefetched block and one block's fp32 gradients
            biggest = max(w.dense_params + w.expert_params / lay.ep for run in self.runs for w in run.blocks[:1])
            mem += biggest / lay.tp * (2 * memory.WEIGHT_BYTES + FSDP_REDUCE_BYTES)
        if p > 1:
            boundary = self.tokens / lay.cp * self.hidden * ACT_BYTES / (lay.tp if lay.sp else 1)
            t += 2 * lay.vpp * comm.p2p(boundary, self.groups["pp"], self.profile)
        return t, mem

    # ---------------------------------------------------------------- bounds, without a solver

    def objective(self, split: list[int], mode: str) -> float:
        """The objective of `split` (blocks per chunk) with every block recomputing with `mode`."""
        p = self.layout.pp
        times = [run.time[mode] for run in self.runs for _ in run.blocks]
        stage = [t for t, _ in self._fixed_parts]
        start = 0
        for c, size in enumerate(split):
            stage[pipeline.chunk_stage(c, p, self.layout.schedule)] += sum(times[start:start + size])
            start += size
        return self.m * max(stage) + self._fill() / p * sum(stage)

    def lower_bound(self) -> float:
        """An objective no assignment beats: every block at its fastest mode, and T_max at least the mean stage
        and, run by run, the least bottleneck of that run's blocks alone over the stages' fixed times
        (_least_bottleneck; the other runs, the memory and the chunk rules left out only lower it)."""
        p = self.layout.pp
        fixed = [t for t, _ in self._fixed_parts]
        fastest = [min(run.time.values()) for run in self.runs]
        total = sum(fixed) + sum(len(run.blocks) * t for run, t in zip(self.runs, fastest, strict=True))
        t_max = max([total / p] + [_least_bottleneck(fixed, len(run.blocks), t)
                                   for run, t in zip(self.runs, fastest, strict=True)])
        return self.m * t_max + self._fill() / p * total

    def even_split_is_optimal(self) -> bool:
        """Whether no assignment beats the even split (pipeline.split_blocks) with nothing recomputed."""
        even = pipeline.split_blocks(sum(len(run.blocks) for run in self.runs), self.chunks)
        return self.lower_bound() >= self.objective(even, "none") * (1 - 1e-9)

    def _fill(self) -> float:
        return pipeline.fill_drain(self.layout.pp, self.layout.vpp, self.layout.schedule)

    # ---------------------------------------------------------------- model

    def build(self) -> StageILP:
        import pulp  # 0.1 s to import: only when an ILP is built (lower_bound and objective need none)

        C, R, p = range(self.chunks), range(len(self.runs)), self.layout.pp
        self.prob = pulp.LpProblem("stage_assignment", pulp.LpMinimize)
        self.n = {(c, r): pulp.LpVariable(f"n_{c}_{r}", 0, len(self.runs[r].blocks), cat="Integer") for c in C for r in R}
        self.k = {(c, r, a): pulp.LpVariable(f"k_{c}_{r}_{a}", 0, len(self.runs[r].blocks), cat="Integer")
                  for c in C for r in R for a in self.modes}
        self.u = {(c, r): pulp.LpVariable(f"u_{c}_{r}", cat="Binary") for c in C for r in R}
        self.f = {(s, r): pulp.LpVariable(f"f_{s}_{r}", cat="Binary") for s in range(p) for r in R}
        self.T = {s: pulp.LpVariable(f"T_{s}", 0) for s in range(p)}
        self.T_max = pulp.LpVariable("T_max", 0)
        self.prob += self.m * self.T_max + self._fill() / p * pulp.lpSum(self.T.values())
        self.add_cover_constraint()
        self.add_chunk_constraint()
        self.add_contiguity_constraint()
        self.add_balance_constraint()
        self.add_recompute_constraint()
        self.add_time_constraint()
        self.add_memory_constraint()
        return self

    def add_cover_constraint(self) -> None:
        """sum_c n[c, r] = |r|: every block of every run is placed once."""
        import pulp

        for r, run in enumerate(self.runs):
            self.prob += pulp.lpSum(self.n[c, r] for c in range(self.chunks)) == len(run.blocks), f"cover_{r}"

    def add_chunk_constraint(self) -> None:
        """sum_r n[c, r] >= 1: no empty chunk."""
        import pulp

        for c in range(self.chunks):
            self.prob += pulp.lpSum(self.n[c, r] for r in range(len(self.runs))) >= 1, f"chunk_{c}"

    def add_contiguity_constraint(self) -> None:
        """n[c, r] <= |r| u[c, r];  sum_{c' > c} n[c', r] <= |r| (1 - u[c, r+1])."""
        import pulp

        for c in range(self.chunks):
            for r, run in enumerate(self.runs):
                self.prob += self.n[c, r] <= len(run.blocks) * self.u[c, r], f"used_{c}_{r}"
                if r + 1 < len(self.runs):
                    later = pulp.lpSum(self.n[c2, r] for c2 in range(c + 1, self.chunks))
                    self.prob += later <= len(run.blocks) * (1 - self.u[c, r + 1]), f"order_{c}_{r}"

    def add_balance_constraint(self) -> None:
        """| sum_r n[c, r] - sum_r n[c + p, r] | <= 1 for the chunks of one pipeline rank."""
        import pulp

        R = range(len(self.runs))
        for s in range(self.layout.pp):
            chunks = self._chunks_of(s)  # c, c + p, ... (or c and 2p-1-c in a V)
            for c, d in zip(chunks, chunks[1:], strict=False):
                a, b = pulp.lpSum(self.n[c, r] for r in R), pulp.lpSum(self.n[d, r] for r in R)
                self.prob += a - b <= 1, f"balance_up_{c}"
                self.prob += b - a <= 1, f"balance_down_{c}"

    def add_recompute_constraint(self) -> None:
        """sum_a k[c, r, a] = n[c, r]: each placed block has one recompute mode."""
        import pulp

        for (c, r), n in self.n.items():
            self.prob += pulp.lpSum(self.k[c, r, a] for a in self.modes) == n, f"mode_{c}_{r}"

    def add_time_constraint(self) -> None:
        """T[s] = fixed_s + sum_{c on s, r, a} k[c, r, a] t[r, a];  T[s] <= T_max."""
        import pulp

        for s in range(self.layout.pp):
            fixed, _ = self._fixed_parts[s]
            work = pulp.lpSum(self.k[c, r, a] * run.time[a] for c in self._chunks_of(s)
                              for r, run in enumerate(self.runs) for a in self.modes)
            self.prob += self.T[s] == fixed + work, f"time_{s}"
            self.prob += self.T[s] <= self.T_max, f"bottleneck_{s}"

    def add_memory_constraint(self) -> None:
        """(1 + reserve)(fixed + states + held * activations + full-recompute working set) <= capacity."""
        import pulp

        lay = self.layout
        for s in range(lay.pp):
            _, fixed = self._fixed_parts[s]
            held = pipeline.in_flight(s, lay.pp, self.m, lay.vpp, lay.schedule)
            chunks = self._chunks_of(s)
            states = pulp.lpSum(self.n[c, r] * run.states for c in chunks for r, run in enumerate(self.runs))
            acts = pulp.lpSum(self.k[c, r, a] * run.act[a] for c in chunks
                              for r, run in enumerate(self.runs) for a in self.modes)
            work = pulp.lpSum(self.f[s, r] * run.work for r, run in enumerate(self.runs))
            if "full" in self.modes:
                for r, run in enumerate(self.runs):
                    full = pulp.lpSum(self.k[c, r, "full"] for c in chunks)
                    self.prob += full <= len(run.blocks) * self.f[s, r], f"working_{s}_{r}"
            total = (1 + memory.ALLOCATOR_RESERVE) * (fixed + states + held * acts + work)
            self.prob += total <= self.profile.hbm_bytes, f"memory_{s}"

    def _chunks_of(self, stage: int) -> list[int]:
        return [c for c in range(self.chunks) if pipeline.chunk_stage(c, self.layout.pp, self.layout.schedule) == stage]

    # ---------------------------------------------------------------- solve

    def solve(self) -> StageAssignment | None:
        """The optimal assignment, or None when no assignment fits in memory."""
        import pulp

        self.prob.solve(_solver())
        status = pulp.LpStatus[self.prob.status]
        if status != "Optimal" or self.T_max.value() is None:  # CBC reports a time-limited incumbent as Optimal
            return None
        split = [round(sum(self.n[c, r].value() for r in range(len(self.runs)))) for c in range(self.chunks)]
        return StageAssignment(split=split, recompute=self._modes(), objective_s=pulp.value(self.prob.objective),
                               status=status)

    def _modes(self) -> dict[str, str]:
        """Give concrete blocks their modes: within each chunk and run, in the order none, selective, full."""
        modes: dict[str, str] = {}
        taken = [0] * len(self.runs)
        for c in range(self.chunks):
            for r, run in enumerate(self.runs):
                for a in self.modes:
                    for _ in range(round(self.k[c, r, a].value())):
                        modes[run.blocks[taken[r]].name] = a
                        taken[r] += 1
        return modes


def _least_bottleneck(fixed: list[float], n: int, t: float) -> float:
    """min over n_s >= 0 with sum n_s = n of max_s fixed[s] + n_s t: placing the blocks one by one on the
    stage that then ends earliest is optimal, so it is the n-th smallest of fixed[s] + k t over s and k >= 1."""
    return heapq.nsmallest(n, (f + k * t for f in fixed for k in range(1, n + 1)))[-1]


def _runs(blocks: list[UnitWork]) -> list[list[UnitWork]]:
    """Maximal runs of consecutive interchangeable blocks (equal costs: same signature in the capture)."""
    runs: list[list[UnitWork]] = []
    for w in blocks:
        if runs and _same(runs[-1][0], w):
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs


def _same(a: UnitWork, b: UnitWork) -> bool:
    return (a.kind, a.gemm_flops, a.attn_flops, a.act_bytes, a.dense_params, a.expert_params, a.experts) == (
        b.kind, b.gemm_flops, b.attn_flops, b.act_bytes, b.dense_params, b.expert_params, b.experts)


def _solver() -> pulp.LpSolver:
    """HiGHS when installed, else the CBC that ships with PuLP; quiet, time-limited, deterministic."""
    import pulp

    available = pulp.listSolvers(onlyAvailable=True)
    if "HiGHS" in available:
        return pulp.HiGHS(msg=False, timeLimit=TIME_LIMIT_S, gapRel=GAP_REL, threads=1)
    kwargs = {"msg": False, "timeLimit": TIME_LIMIT_S, "gapRel": GAP_REL, "maxNodes": MAX_NODES, "threads": 1,
              "cuts": False}
    if "COIN_CMD" in available:
        return pulp.COIN_CMD(**kwargs)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC in favour of pulp[cbc]
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**kwargs)
