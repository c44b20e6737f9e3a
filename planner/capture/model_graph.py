"""ModelGraph: what the planner knows about a model, measured once on the meta device.

A model is a sequence of *units* in execution order: the embedding(s), the repeated blocks (transformer
layers), norms, the output head and any other top-level module. Each unit carries its parameters, its
forward and backward FLOPs (counted by torch.utils.flop_counter) and the bytes it saves for backward
(measured with saved-tensor hooks). Data flow between units gives a networkx DiGraph; a pipeline may cut
between unit k-1 and unit k when exactly one activation tensor (one that needs a gradient) crosses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

UNIT_KINDS = ("embedding", "block", "norm", "head", "other")


@dataclass(kw_only=True, slots=True)
class AttentionInfo:
    """The attention of one block: its core and the linear pair around it."""

    module: str
    """FQN of the module that runs the attention core."""
    core: str
    """`sdpa` (torch's fused scaled_dot_product_attention) or `matmul_softmax` (explicit)."""
    heads: int
    kv_heads: int
    head_dim: int
    column: list[str]
    """Linears before the core (q, k, v projections): column-parallel under TP."""
    row: list[str]
    """Linears after the core (output projection): row-parallel under TP."""
    fused: list[int] = field(default_factory=list)
    """A single fused q/k/v projection whose output is [q | k | v] (GPT-2, Phi-3, Falcon): the widths of the
    three parts, so TP gives each rank its heads of each; empty for separate projections or a fused one
    interleaved per head group (GPT-NeoX), which plain column sharding splits into whole groups."""
    head_norms: list[str] = field(default_factory=list)
    """Norms over one head's width inside the attention (Qwen3's q/k norms): local per rank, weight replicated."""
    width_norms: list[str] = field(default_factory=list)
    """Norms over a whole projection's width (OLMo-2's q/k norms): TP runs them on the gathered width."""
    replicate: str = ""
    """Why TP must replicate this attention instead of sharding its heads ("" when it shards)."""
    core_fwd_flops: int = 0
    core_saved_bytes: int = 0
    """Bytes the core saved for backward as captured (a math kernel on meta keeps the s x s scores)."""


@dataclass(kw_only=True, slots=True)
class MLPInfo:
    """A dense MLP: linears reading the hidden state (column) and writing it back (row)."""

    module: str
    column: list[str]
    row: list[str]
    fused: list[int] = field(default_factory=list)
    """A single fused gate/up projection (Phi-3's gate_up_proj) whose output is chunked: its part widths."""
    replicate: str = ""
    """Why TP must replicate this MLP instead of sharding it ("" when it shards)."""


@dataclass(kw_only=True, slots=True)
class MoEInfo:
    """A mixture-of-experts layer: a router, a list of identical experts, optional shared experts."""

    module: str
    router: str
    experts: str
    """FQN of the ModuleList holding the experts."""
    num_experts: int
    top_k: int
    shared: list[str]
    expert_params: int
    """Parameters of one expert."""
    fused: bool = False
    """Experts stored as stacked tensors [experts, ...] in one module called as experts(x, top_k_index,
    top_k_weights) (Hugging Face transformers 5) rather than a ModuleList of expert modules."""
    capacity_factor: float | None = None
    """None: dropless; else each expert takes at most capacity_factor x the balanced load of a routing group
    (the MoE module's `capacity_factor`, as autoshard's reference MoE declares it)."""


@dataclass(kw_only=True, slots=True)
class Unit:
    """One node of the block graph."""

    name: str
    """Module FQN."""
    kind: str
    """One of UNIT_KINDS."""
    cls: str
    signature: str
    """Class and parameter shapes: units with equal signatures are interchangeable (share ILP variables)."""
    params: int
    param_bytes: dict[str, int]
    """Bytes of this unit's own parameters by dtype name, as the model declares them."""
    param_tensors: int = 0
    """Parameter tensors of the built module (a spec's MoE block builds one expert of its routed experts)."""
    fwd_flops: int
    bwd_flops: int
    saved_bytes: int
    """Bytes saved for backward by ops inside this unit (unique storages, parameters excluded)."""
    flops_by_op: dict[str, list[int]] = field(default_factory=dict)
    """aten op -> [forward, backward] FLOPs."""
    saved_by_op: dict[str, int] = field(default_factory=dict)
    """torch function -> bytes it saved for backward."""
    attention: AttentionInfo | None = None
    mlp: MLPInfo | None = None
    moe: MoEInfo | None = None
    norms: list[str] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class Edge:
    """Tensors produced in `src` and read in `dst`."""

    src: str
    dst: str
    activations: int
    """Distinct tensors that need a gradient (they must travel between pipeline stages)."""
    side: int
    """Distinct tensors that need none (masks, rotary tables): each stage can recompute them."""
    activation_bytes: int


@dataclass(kw_only=True, slots=True)
class ModelGraph:
    """The captured model: units with measured costs, their data flow and the valid pipeline cuts."""

    name: str
    capture_method: str
    """`fx`, `export` or `hooks`: the first method that traced the model."""
    capture_failures: dict[str, str]
    """Methods tried before `capture_method`, with the reason each failed."""
    micro_batch: int
    seq_len: int
    dtype: str
    """Compute dtype of the capture (activations are measured in it)."""
    units: list[Unit]
    edges: list[Edge]
    cut_points: list[int]
    """k such that a pipeline may cut between units[k-1] and units[k]."""
    params: int
    """Unique parameters (tied weights counted once)."""
    param_bytes: dict[str, int]
    fwd_flops: int
    bwd_flops: int
    saved_bytes: int
    root_fwd_flops: int = 0
    """FLOPs of code outside every unit (the model's own forward body)."""
    root_bwd_flops: int = 0
    root_saved_bytes: int = 0
    hidden: int = 0
    vocab: int = 0
    tied: list[list[str]] = field(default_factory=list)
    """Groups of parameter FQNs that are one tensor (tied embeddings)."""
    warnings: list[str] = field(default_factory=list)
    gm: Any = field(default=None, repr=False, compare=False)
    """The traced torch.fx GraphModule on meta (None for `hooks`); kept for the transforms."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def flops_per_token(self) -> float:
        """Forward plus backward FLOPs per token, as measured."""
        return (self.fwd_flops + self.bwd_flops) / self.tokens

    @property
    def blocks(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "block"]

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def block_groups(self) -> dict[str, list[str]]:
        """Signature -> names of identical blocks, in order."""
        groups: dict[str, list[str]] = {}
        for u in self.blocks:
            groups.setdefault(u.signature, []).append(u.name)
        return groups

    @property
    def graph(self) -> nx.DiGraph:
        """Units as nodes (attributes: kind, order, costs), data flow as edges."""
        import networkx as nx  # here, not at the top: 0.15 s of every plan call, for this view only

        g = nx.DiGraph()
        for i, u in enumerate(self.units):
            g.add_node(u.name, order=i, kind=u.kind, params=u.params, fwd_flops=u.fwd_flops, saved_bytes=u.saved_bytes)
        for e in self.edges:
            g.add_edge(e.src, e.dst, activations=e.activations, side=e.side, activation_bytes=e.activation_bytes)
        return g

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "gm"}
        d["units"] = [dataclasses.asdict(u) for u in self.units]
        d["edges"] = [dataclasses.asdict(e) for e in self.edges]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelGraph:
        """The inverse of to_dict (as read back from JSON): the graph without its fx GraphModule."""
        infos = {"attention": AttentionInfo, "mlp": MLPInfo, "moe": MoEInfo}

        def unit(d: dict[str, Any]) -> Unit:
            parts = {k: infos[k](**d[k]) for k in infos if d.get(k) is not None}
            return Unit(**{**d, **parts})

        return cls(**{**data, "units": [unit(u) for u in data["units"]],
                      "edges": [Edge(**e) for e in data["edges"]]})

    def summary(self) -> dict[str, Any]:
        """The `plan --inspect --json` object."""
        return {
            "name": self.name,
            "params": self.params,
            "blocks": len(self.blocks),
            "block_groups": {sig: len(names) for sig, names in self.block_groups().items()},
            "capture_method": self.capture_method,
            "capture_failures": self.capture_failures,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "hidden": self.hidden,
            "vocab": self.vocab,
            "flops_per_token": self.flops_per_token,
            "fwd_flops": self.fwd_flops,
            "bwd_flops": self.bwd_flops,
            "saved_bytes": self.saved_bytes,
            "cut_points": [self.cut_name(k) for k in self.cut_points],
            "units": [_unit_summary(u, self.tokens) for u in self.units],
            "warnings": self.warnings,
        }

    def cut_name(self, k: int) -> str:
        return f"{self.units[k - 1].name}|{self.units[k].name}"


def _unit_summary(u: Unit, tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": u.name,
        "kind": u.kind,
        "class": u.cls,
        "params": u.params,
        "flops_per_token": (u.fwd_flops + u.bwd_flops) / tokens,
        "activation_bytes_per_token": u.saved_bytes / tokens,
    }
    for key in ("attention", "mlp", "moe"):
        info = getattr(u, key)
        if info is not None:
            out[key] = dataclasses.asdict(info)
    if u.norms:
        out["norms"] = u.norms
    return out


def cuts_from_flow(order: dict[str, int], flow: list[tuple[str, str, int, bool]]) -> list[int]:
    """Valid pipeline cuts from tensor-level flow.

    `flow` holds (producer unit, consumer unit, tensor id, needs_grad). A tensor crosses cut k when its
    producer comes before k and some consumer at or after k. Cut k is valid when exactly one
    gradient-carrying tensor crosses it.
    """
    last_use: dict[int, tuple[int, int, bool]] = {}
    for src, dst, tid, grad in flow:
        s, d = order[src], order[dst]
        prev = last_use.get(tid)
        last_use[tid] = (s, max(d, prev[1]) if prev else d, grad)
    cuts = []
    for k in range(1, len(order)):
        crossing = sum(1 for s, d, grad in last_use.values() if grad and s < k <= d)
        if crossing == 1:
            cuts.append(k)
    return cuts


def edges_from_flow(flow: list[tuple[str, str, int, bool]], nbytes: dict[int, int]) -> list[Edge]:
    """Aggregate tensor-level flow into one Edge per (src, dst), sorted for deterministic output."""
    agg: dict[tuple[str, str], tuple[set[int], set[int]]] = {}
    for src, dst, tid, grad in flow:
        acts, side = agg.setdefault((src, dst), (set(), set()))
        (acts if grad else side).add(tid)
    return [
        Edge(src=s, dst=d, activations=len(a), side=len(sd), activation_bytes=sum(nbytes.get(t, 0) for t in a))
        for (s, d), (a, sd) in sorted(agg.items())
    ]
