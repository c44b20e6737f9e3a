"""The Plan: what the planner chose, why, and what it expects, as a reviewable, versioned YAML file.

A Plan holds the layout (degrees, micro-batch, recompute, schedule), the units on each pipeline stage,
the per-module sharding keyed by module FQN pattern (`layers.*.attention.wq`, as torch's
`parallelize_module` plan dict), the predicted metrics with their breakdown, the best alternatives with
why each lost, and provenance. `Plan.to_yaml()` is deterministic (floats rounded to `SIG_DIGITS`
significant digits, keys in a fixed order, no timestamps) and reloads what it wrote before returning
(nanotron's `save_as_yaml(sanity_checks=True)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from autoshard.cost_models.estimate import Estimate, assign_stages
from autoshard.cost_models.layout import Layout
from autoshard.cost_models.work import model_work
from autoshard.hardware_profiles import Profile
from autoshard.planner.capture.model_graph import ModelGraph, Unit

try:
    from enum import StrEnum
except ImportError:  # Python 3.10

    class StrEnum(str, Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)


SCHEMA_VERSION = 1
SIG_DIGITS = 6
"""Floats are rounded to this many significant digits so the same inputs give byte-identical YAML."""
GIB = 2**30
STYLES = ("colwise", "rowwise", "vocab", "sequence_parallel", "expert", "replicate")
TOP_KEYS = ("schema_version", "model", "gpus", "profile", "training", "layout", "predicted", "stages",
            "sharding", "alternatives", "provenance")
"""The YAML's top-level keys, in the order a reviewer reads them."""


class MeshAxis(StrEnum):
    """Named axes of the device mesh."""

    PP = "pp"
    DP = "dp"
    CP = "cp"
    TP = "tp"
    EP = "ep"


@dataclass(kw_only=True, slots=True)
class ModuleSharding:
    """How one module's weight is placed on the mesh."""

    style: str
    """colwise, rowwise, vocab (embedding or head split over the vocabulary), sequence_parallel (norms:
    weight replicated, activations split over the sequence), expert (experts split over ep) or replicate."""
    axis: str
    """The mesh axis the style refers to (a MeshAxis value); for replicate, the axis it is replicated over."""
    weight_dim: int | None
    """The tensor dim of the weight that is split (nn.Linear weight is [out, in]: colwise 0, rowwise 1);
    None when the weight is not split or the module is a ModuleList of experts."""

    def __post_init__(self) -> None:
        self.axis = str(self.axis)  # a plain str, so YAML and JSON writers take it
        if self.style not in STYLES:
            raise ValueError(f"sharding style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.axis not in {a.value for a in MeshAxis}:
            raise ValueError(f"sharding axis must be one of {', '.join(a.value for a in MeshAxis)}, got {self.axis!r}")


@dataclass(kw_only=True, slots=True)
class StagePlan:
    """One pipeline rank."""

    stage: int
    units: list[str]
    """Unit FQNs (embedding, blocks, norm, head) on this rank, in execution order."""
    recompute: dict[str, str] = field(default_factory=dict)
    """Block FQN -> none|selective|full, only where it differs from the layout's recompute."""
    predicted_time_s: float
    """Forward + backward of one micro-batch on this stage."""
    predicted_memory_gib: float
    """Peak memory on one GPU of this stage."""

    def __post_init__(self) -> None:
        self.predicted_time_s = _round(self.predicted_time_s)
        self.predicted_memory_gib = _round(self.predicted_memory_gib)


@dataclass(kw_only=True, slots=True)
class Alternative:
    """A layout the planner priced and did not choose."""

    layout: dict[str, Any]
    """In layout_json form."""
    step_time_s: float
    tokens_per_sec_per_gpu: float
    peak_memory_gib: float
    fits: bool
    why_not: str
    """One line: why it lost to the chosen layout."""

    def __post_init__(self) -> None:
        self.step_time_s = _round(self.step_time_s)
        self.tokens_per_sec_per_gpu = _round(self.tokens_per_sec_per_gpu)
        self.peak_memory_gib = _round(self.peak_memory_gib)


@dataclass(kw_only=True, slots=True)
class Plan:
    """A complete parallelization plan for one model on one system."""

    schema_version: int = SCHEMA_VERSION
    model: dict[str, Any]
    """{name, fingerprint, params, blocks, seq_len}."""
    gpus: int
    profile: str
    """Hardware profile name."""
    training: dict[str, Any]
    """{global_batch (sequences), seq_len, precision, framework}."""
    layout: dict[str, Any]
    """layout_json form (tp, pp, vpp, cp, ep, dp, zero, micro_batch, recompute, schedule,
    sequence_parallel) plus async_tp."""
    stages: list[StagePlan]
    sharding: dict[str, ModuleSharding]
    """Module FQN pattern (`layers.*.attention.wq`) -> sharding, sorted by key."""
    predicted: dict[str, Any]
    """Estimate.predicted() plus binding_constraint."""
    alternatives: list[Alternative] = field(default_factory=list)
    """Best first."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """{autoshard_version, profile, profile_fitted_on, created_by, solver}; no timestamps, no timings:
    the same inputs give byte-identical YAML."""
    solve_time_s: float = field(default=0.0, compare=False)
    """How long the search took (in the JSON output, not in the YAML)."""
    stage_memory_gib: list[dict[str, float]] = field(default_factory=list, compare=False)
    """Per stage, GiB on one GPU by kind (weights, gradients, ...), for the report; empty for a plan read
    from YAML (not in the YAML: the file keeps the peak stage's breakdown only)."""

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {self.schema_version!r} is not supported; "
                             f"this autoshard reads schema_version {SCHEMA_VERSION}")
        self.predicted = _round(self.predicted)
        self.provenance = _round(self.provenance)
        self.sharding = dict(sorted(self.sharding.items()))
        layout = self.layout_obj()
        if layout.gpus != self.gpus:
            raise ValueError(f"tp({layout.tp}) x pp({layout.pp}) x cp({layout.cp}) x dp({layout.dp}) = "
                             f"{layout.gpus} != gpus({self.gpus})")
        if [s.stage for s in self.stages] != list(range(layout.pp)):
            raise ValueError(f"stages must be numbered 0..{layout.pp - 1} for pp={layout.pp}, "
                             f"got {[s.stage for s in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data in TOP_KEYS order."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["stages"] = [dataclasses.asdict(s) for s in self.stages]
        data["sharding"] = {k: _Inline(dataclasses.asdict(v)) for k, v in self.sharding.items()}
        data["alternatives"] = [{**dataclasses.asdict(a), "layout": _Inline(a.layout)} for a in self.alternatives]
        return {key: data[key] for key in TOP_KEYS}

    def to_yaml(self) -> str:
        header = f"# autoshard plan (schema {SCHEMA_VERSION}); load with autoshard.planner.outputs.plan.load_plan\n"
        text = header + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=100)
        assert Plan.from_yaml(text) == self, "the plan YAML does not load back to the same plan"
        return text

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Validate and build; a ValueError names the schema version or the missing/unknown keys."""
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a mapping, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {version!r} is not supported; "
                             f"this autoshard reads schema_version {SCHEMA_VERSION}")
        _check_keys(data, TOP_KEYS, "plan")
        try:
            return cls(**{
                **data,
                "stages": [_build(StagePlan, s, "stage") for s in data["stages"]],
                "sharding": {k: _build(ModuleSharding, v, f"sharding {k}") for k, v in data["sharding"].items()},
                "alternatives": [_build(Alternative, a, "alternative") for a in data["alternatives"] or []],
            })
        except (TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"invalid plan: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def layout_obj(self) -> Layout:
        return _layout_obj(self.layout)

    def to_json(self) -> dict[str, Any]:
        """ARCHITECTURE.md's JSON object, with the stages (compact) and alternatives."""
        return {
            "layout": dict(self.layout), "predicted": dict(self.predicted),
            "solve_time_s": self.solve_time_s,
            "model": dict(self.model), "gpus": self.gpus, "profile": self.profile, "training": dict(self.training),
            "stages": [{"stage": s.stage, "units": compact_units(s.units), "time_s": s.predicted_time_s,
                        "memory_gib": s.predicted_memory_gib} for s in self.stages],
            "alternatives": [dataclasses.asdict(a) for a in self.alternatives],
        }

    def summary(self) -> str:
        """A compact terminal view."""
        p, t = self.predicted, self.training
        lines = [
            f"model        {self.model['name']} ({self.model['params']:,} params, {self.model['blocks']} blocks) "
            f"on {self.gpus} GPUs, profile {self.profile}",
            f"training     {t['global_batch']} sequences x {t['seq_len']} tokens per step, {t['precision']}"
            f", framework {t.get('framework', 'torch')}",
            f"layout       {self.layout_obj().to_string()}",
            f"step time    {p['step_time_s']:.4g} s   {p['tokens_per_sec_per_gpu']:,.0f} tokens/s/GPU   "
            f"MFU {p['mfu']:.1%}   HFU {p['hfu']:.1%}   {p['micro_batches']} micro-batches",
            f"memory       {p['peak_memory_gib']:.3g} GiB of {p['memory_capacity_gib']:.3g} GiB per GPU "
            f"({'fits' if p['fits'] else 'DOES NOT FIT'})",
            f"binding      {p['binding_constraint']}",
        ]
        lines += [f"{'stages' if s.stage == 0 else '':12} stage {s.stage}: {compact_units(s.units)}   "
                  f"{s.predicted_time_s:.3g} s/micro-batch   {s.predicted_memory_gib:.3g} GiB" for s in self.stages]
        return "\n".join(lines + _alternatives_table(self.alternatives[:5]))

    def explain(self) -> str:
        """Why this plan: one paragraph per degree, with its gain, its cost and the best rival."""
        lay, p = self.layout, self.predicted
        ctx = _Explain(self)
        paragraphs = [
            _explain_tp(ctx, lay["tp"], lay["sequence_parallel"]),
            _explain_pp(ctx, lay["pp"], self.model["blocks"]),
            _explain_vpp(ctx, lay["vpp"]),
            _explain_cp(ctx, lay["cp"], self.training["seq_len"]),
            _explain_ep(ctx, lay["ep"]),
            _explain_dp(ctx, lay["dp"], self.training["global_batch"]),
            _explain_zero(ctx, lay["zero"], lay["dp"] * lay["cp"]),
            _explain_recompute(ctx, lay["recompute"]),
            _explain_mbs(ctx, lay["micro_batch"], p["micro_batches"]),
        ]
        head = (f"{self.layout_obj().to_string()} on {self.gpus} GPUs: {p['step_time_s']:.4g} s per step, "
                f"{p['peak_memory_gib']:.3g} of {p['memory_capacity_gib']:.3g} GiB per GPU; "
                f"binding constraint: {p['binding_constraint']}.")
        return "\n\n".join([head, *paragraphs])


def load_plan(path: str | Path) -> Plan:
    return Plan.from_yaml(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- building


def build_plan(graph: ModelGraph, est: Estimate, profile: Profile, *, alternatives: Sequence[Estimate] = (),
               solver: str = "none", solve_time_s: float = 0.0, split: list[int] | None = None,
               recompute: dict[str, str] | None = None) -> Plan:
    """A Plan from the chosen layout's Estimate and the runners-up (best first).

    `split` and `recompute` are what `est` was priced with (estimate()'s arguments of the same names)."""
    layout = est.layout
    predicted = {**est.predicted(), "binding_constraint": binding_constraint(est)}
    return Plan(
        model={"name": graph.name, "fingerprint": fingerprint(graph), "params": graph.params,
               "blocks": len(graph.blocks), "seq_len": graph.seq_len},
        gpus=layout.gpus, profile=est.profile,
        training={"global_batch": est.training.global_batch, "seq_len": est.training.seq_len,
                  "precision": est.training.precision, "framework": est.training.framework,
                  **({"grad_reduce": est.training.grad_reduce} if est.training.grad_reduce else {})},
        layout=plan_layout(layout),
        stages=_stages(graph, est, split, recompute or {}),
        sharding=sharding_for(graph, layout),
        predicted=predicted,
        alternatives=[alternative(a, est) for a in alternatives],
        provenance={"autoshard_version": _version(), "profile": profile.name,
                    "profile_fitted_on": profile.fitted_on, "created_by": "plan", "solver": solver},
        solve_time_s=solve_time_s,
        stage_memory_gib=[{k: _round(v / GIB) for k, v in mem.items()} for mem in est.stage_memory_breakdown],
    )


def plan_layout(layout: Layout) -> dict[str, Any]:
    """The layout object of ARCHITECTURE.md's JSON (micro_batch for mbs), plus async_tp."""
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "ep": layout.ep,
            "dp": layout.dp, "zero": layout.zero, "micro_batch": layout.mbs, "recompute": layout.recompute,
            "schedule": layout.schedule, "sequence_parallel": layout.sp, "async_tp": layout.async_tp}


def _layout_obj(d: dict[str, Any]) -> Layout:
    kwargs = {("mbs" if k == "micro_batch" else k): v for k, v in d.items()}
    # layout_json stores the effective flag (false when tp == 1); there the default is the same layout
    kwargs["sequence_parallel"] = bool(kwargs.get("sequence_parallel", True)) or kwargs.get("tp", 1) == 1
    try:
        return Layout(**kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid plan layout {d}: {exc}") from exc


def _stages(graph: ModelGraph, est: Estimate, split: list[int] | None,
            recompute: dict[str, str]) -> list[StagePlan]:
    """The cost model's stage split, with each stage's time per micro-batch and peak memory."""
    layout = est.layout
    stages = assign_stages(model_work(graph), layout, split)
    memory = est.stage_memory_bytes
    out = []
    for i, stage in enumerate(stages):
        names = [w.name for w in stage.units]
        overrides = {k: v for k, v in recompute.items() if k in names and v != layout.recompute}
        out.append(StagePlan(stage=i, units=names, recompute=overrides, predicted_time_s=est.stage_times_s[i],
                             predicted_memory_gib=memory[i] / GIB))
    return out


def alternative(est: Estimate, best: Estimate) -> Alternative:
    return Alternative(layout=plan_layout(est.layout), step_time_s=est.step_time_s,
                       tokens_per_sec_per_gpu=est.tokens_per_sec_per_gpu,
                       peak_memory_gib=est.peak_memory_bytes / GIB, fits=est.fits, why_not=why_not(est, best))


def why_not(est: Estimate, best: Estimate) -> str:
    """One line: why `est` lost to `best`."""
    if not est.fits:
        over = (est.peak_memory_bytes - est.memory_capacity_bytes) / GIB
        return (f"does not fit by {over:.1f} GiB ({est.peak_memory_bytes / GIB:.1f} of "
                f"{est.memory_capacity_bytes / GIB:.1f} GiB on stage {est.peak_stage})")
    slower = est.step_time_s / best.step_time_s - 1
    keys = sorted(set(est.time_breakdown) | set(best.time_breakdown))
    grew = max(keys, key=lambda k: est.time_breakdown.get(k, 0.0) - best.time_breakdown.get(k, 0.0))
    delta = est.time_breakdown.get(grew, 0.0) - best.time_breakdown.get(grew, 0.0)
    if slower < 0:
        return f"faster by {-slower:.1%} but ranked lower by the planner"
    return f"slower by {slower:.1%}" + (f", mostly {grew} (+{delta:.3g} s)" if delta > 0 else "")


def binding_constraint(est: Estimate) -> str:
    """What stops this layout from going faster: memory when near capacity, else its largest overhead."""
    peak, cap = est.peak_memory_bytes / GIB, est.memory_capacity_bytes / GIB
    if not est.fits:
        return f"memory: {peak:.1f} GiB per GPU exceeds the {cap:.1f} GiB capacity"
    if peak > 0.9 * cap:
        return f"memory: {peak:.1f} of {cap:.1f} GiB per GPU ({peak / cap:.0%})"
    overheads = {k: v for k, v in est.time_breakdown.items() if k != "compute"}
    worst = max(sorted(overheads), key=overheads.__getitem__, default=None)
    if worst is None or overheads[worst] < 0.05 * est.step_time_s:
        return f"compute: {est.time_breakdown.get('compute', 0.0) / est.step_time_s:.0%} of the step"
    return f"{worst}: {overheads[worst] / est.step_time_s:.0%} of the step"


def fingerprint(graph: ModelGraph) -> str:
    """sha256[:16] of the architecture (units, kinds, signatures, params, seq_len, hidden, vocab)."""
    arch = {"units": [[u.name, u.kind, u.signature, u.params] for u in graph.units],
            "seq_len": graph.seq_len, "hidden": graph.hidden, "vocab": graph.vocab}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def _version() -> str:
    try:
        return metadata.version("autoshard")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- sharding


def sharding_for(graph: ModelGraph, layout: Layout) -> dict[str, ModuleSharding]:
    """Per-module sharding from the captured structure, layer indices collapsed to `*`, sorted by key."""
    token = _token_embedding(graph)
    exact: dict[str, ModuleSharding] = {}
    for unit in graph.units:
        exact.update(_unit_sharding(unit, layout, is_token_embedding=unit.name == token))
    return _collapse(exact)


def _token_embedding(graph: ModelGraph) -> str | None:
    """The embedding over the vocabulary: params == vocab x hidden, else the largest embedding."""
    embeddings = [u for u in graph.units if u.kind == "embedding"]
    exact = [u for u in embeddings if graph.vocab and u.params == graph.vocab * graph.hidden]
    return max(exact or embeddings, key=lambda u: u.params).name if embeddings else None


def _unit_sharding(unit: Unit, layout: Layout, *, is_token_embedding: bool) -> dict[str, ModuleSharding]:
    def tp(style: str, dim: int | None) -> ModuleSharding:
        if layout.tp > 1:
            return ModuleSharding(style=style, axis=MeshAxis.TP, weight_dim=dim)
        return ModuleSharding(style="replicate", axis=MeshAxis.TP, weight_dim=None)

    norm = tp("sequence_parallel", None) if layout.sp else tp("replicate", None)
    if unit.kind == "embedding":
        return {unit.name: tp("vocab", 0) if is_token_embedding else tp("replicate", None)}
    if unit.kind == "head":
        return {unit.name: tp("vocab", 0)}
    if unit.kind == "norm":
        return {unit.name: norm}
    if unit.kind != "block":
        return {unit.name: tp("replicate", None)}
    out = dict.fromkeys(unit.norms, norm)
    for info in (unit.attention, unit.mlp):
        if info is not None and info.replicate:  # a pattern TP does not shard runs whole on every tp rank
            out |= dict.fromkeys(info.column + info.row, tp("replicate", None))
        elif info is not None:
            out |= {n: tp("colwise", 0) for n in info.column} | {n: tp("rowwise", 1) for n in info.row}
    if unit.moe is not None:
        # shared experts run on every token like a dense MLP; kept replicated here for simplicity
        out |= {n: tp("replicate", None) for n in [unit.moe.router, *unit.moe.shared]}
        style = "expert" if layout.ep > 1 else "replicate"
        out[unit.moe.experts] = ModuleSharding(style=style, axis=MeshAxis.EP, weight_dim=None)
    return out


def _collapse(exact: dict[str, ModuleSharding]) -> dict[str, ModuleSharding]:
    """`layers.3.attention.wq` -> `layers.*.attention.wq` where every match agrees; else keep exact names."""
    groups: dict[str, dict[str, ModuleSharding]] = {}
    for name, sharding in exact.items():
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups.setdefault(pattern, {})[name] = sharding
    out: dict[str, ModuleSharding] = {}
    for pattern, members in groups.items():
        first = next(iter(members.values()))
        out |= {pattern: first} if all(m == first for m in members.values()) else members
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------- reading


def _round(value: Any) -> Any:
    """Floats to SIG_DIGITS significant digits (idempotent), through dicts and lists."""
    if isinstance(value, float):
        return float(f"{value:.{SIG_DIGITS}g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _check_keys(data: dict[str, Any], expected: Sequence[str], what: str) -> None:
    missing = [k for k in expected if k not in data]
    unknown = [k for k in data if k not in expected]
    if missing or unknown:
        raise ValueError(f"{what}: missing keys {missing}, unknown keys {unknown}; expected {list(expected)}")


def _build(cls: Any, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {data!r}")
    _check_keys(data, [f.name for f in dataclasses.fields(cls)], what)
    return cls(**data)


class _Inline(dict):
    """A mapping written on one line (sharding entries, alternatives' layouts)."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, (dict, list)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(
    _Inline, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", dict(data), flow_style=True))


# ---------------------------------------------------------------------------------------------- reports


def compact_units(units: Sequence[str]) -> str:
    """`tok_embeddings + layers.0-7 (8 blocks)`: consecutive indexed units as ranges."""
    items: list[list[Any]] = []  # [name] or [prefix, first, last]
    blocks = 0
    for name in units:
        m = re.fullmatch(r"(.*)\.(\d+)", name)
        if m is None:
            items.append([name])
            continue
        blocks += 1
        prefix, idx = m.group(1), int(m.group(2))
        if items and items[-1][0] == prefix and len(items[-1]) == 3 and items[-1][2] == idx - 1:
            items[-1][2] = idx
        else:
            items.append([prefix, idx, idx])
    text = " + ".join(it[0] if len(it) == 1 else f"{it[0]}.{it[1]}" + (f"-{it[2]}" if it[2] > it[1] else "")
                      for it in items)
    return text + (f" ({blocks} block{'s' if blocks != 1 else ''})" if blocks else "")


def _alternatives_table(alts: Sequence[Alternative]) -> list[str]:
    if not alts:
        return ["alternatives none priced"]
    rows = [f"alternatives (top {len(alts)})",
            f"  {'layout':<70} {'step s':>9} {'tok/s/GPU':>10} {'GiB':>7}  why not"]
    for a in alts:
        rows.append(f"  {_layout_obj(a.layout).to_string():<70} {a.step_time_s:>9.4g} "
                    f"{a.tokens_per_sec_per_gpu:>10,.0f} {a.peak_memory_gib:>7.3g}  {a.why_not}")
    return rows


def diff(a: Plan, b: Plan) -> str:
    """What changed from plan `a` to plan `b`, one line each; `identical` if nothing."""
    lines: list[str] = []
    for key in ("model", "training", "layout"):
        lines += _dict_diff(key, getattr(a, key), getattr(b, key))
    for key in ("gpus", "profile"):
        if getattr(a, key) != getattr(b, key):
            lines.append(f"{key}: {getattr(a, key)} -> {getattr(b, key)}")
    for key in ("step_time_s", "tokens_per_sec_per_gpu", "mfu", "peak_memory_gib", "fits", "binding_constraint"):
        va, vb = a.predicted.get(key), b.predicted.get(key)
        if va != vb:
            change = f" ({vb / va - 1:+.1%})" if _is_number(va) and _is_number(vb) and va else ""
            lines.append(f"predicted.{key}: {va} -> {vb}{change}")
    sa, sb = [compact_units(s.units) for s in a.stages], [compact_units(s.units) for s in b.stages]
    if sa != sb:
        lines.append(f"stages: {' | '.join(sa)} -> {' | '.join(sb)}")
    lines += _dict_diff("sharding", {k: _fmt_sharding(v) for k, v in a.sharding.items()},
                        {k: _fmt_sharding(v) for k, v in b.sharding.items()})
    if not lines and a != b:
        lines.append("same layout, predictions, stages and sharding; alternatives or provenance differ")
    return "\n".join(lines) or "identical"


def _dict_diff(what: str, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{what}.{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt_sharding(s: ModuleSharding) -> str:
    return f"{s.style} on {s.axis}" + (f" dim {s.weight_dim}" if s.weight_dim is not None else "")


@dataclass(slots=True)
class _Explain:
    """The numbers the explain paragraphs quote."""

    plan: Plan

    def share(self, key: str) -> str:
        t, step = self.plan.predicted["time_breakdown_s"].get(key, 0.0), self.plan.predicted["step_time_s"]
        return f"{t:.3g} s ({t / step:.1%} of the step)"

    def gib(self, *keys: str) -> float:
        return sum(self.plan.predicted["memory_breakdown_gib"].get(k, 0.0) for k in keys)

    def rival(self, key: str) -> str:
        """The best alternative with another value of `key`, and why it lost."""
        for alt in self.plan.alternatives:
            if alt.layout.get(key) != self.plan.layout.get(key):
                return f" The best alternative with {key}={alt.layout.get(key)}: {alt.why_not}."
        return ""


def _explain_tp(ctx: _Explain, tp: int, sp: bool) -> str:
    if tp == 1:
        return "tp=1: no tensor parallelism; every block runs whole on one GPU, with no per-layer collectives." \
            + ctx.rival("tp")
    sp_text = ", with sequence parallelism splitting the norms' activations" if sp else ""
    return (f"tp={tp}: each block's attention and MLP weights and activations are split {tp} ways "
            f"(column- then row-parallel{sp_text}); its collectives sit between dependent GEMMs and cost "
            f"{ctx.share('tp_comm')}. tp is limited by the attention heads it must divide and by the NVLink "
            f"domain it must stay in.{ctx.rival('tp')}")


def _explain_pp(ctx: _Explain, pp: int, blocks: int) -> str:
    states = ctx.gib("weights", "gradients", "optimizer")
    if pp == 1:
        return (f"pp=1: no pipeline; each GPU holds all {blocks} blocks' weights, gradients and optimizer state "
                f"({states:.3g} GiB per GPU) and pays no bubble.{ctx.rival('pp')}")
    return (f"pp={pp}: the {blocks} blocks are split over {pp} stages, so a GPU holds 1/{pp} of the weights, "
            f"gradients and optimizer state ({states:.3g} GiB per GPU on the peak stage); the pipeline bubble "
            f"costs {ctx.share('bubble')} and the stage-to-stage sends {ctx.share('pp_comm')}.{ctx.rival('pp')}")


def _explain_vpp(ctx: _Explain, vpp: int) -> str:
    if vpp == 1:
        return "vpp=1: one model chunk per stage (no interleaving)." + ctx.rival("vpp")
    return (f"vpp={vpp}: each stage runs {vpp} interleaved model chunks, dividing the bubble by {vpp} (now "
            f"{ctx.share('bubble')}) for {vpp}x the pipeline sends ({ctx.share('pp_comm')}) and more "
            f"activations held on the first stage.{ctx.rival('vpp')}")


def _explain_cp(ctx: _Explain, cp: int, seq_len: int) -> str:
    if cp == 1:
        return f"cp=1: each GPU processes whole {seq_len}-token sequences." + ctx.rival("cp")
    return (f"cp={cp}: each {seq_len}-token sequence is split over {cp} GPUs ({seq_len // cp} tokens each), "
            f"dividing the activations (now {ctx.gib('activations'):.3g} GiB per GPU); the key/value "
            f"exchange (ring or all-gather, as the framework runs it) not hidden under attention costs "
            f"{ctx.share('cp_exposed')}.{ctx.rival('cp')}")


def _explain_ep(ctx: _Explain, ep: int) -> str:
    if ep == 1:
        return "ep=1: no expert parallelism; every data-parallel rank holds all experts." + ctx.rival("ep")
    return (f"ep={ep}: the routed experts are split over {ep} data-parallel ranks, dividing their weights and "
            f"optimizer state by {ep}; the token dispatch and combine all-to-alls cost "
            f"{ctx.share('ep_comm')}.{ctx.rival('ep')}")


def _explain_dp(ctx: _Explain, dp: int, global_batch: int) -> str:
    return (f"dp={dp}: {dp} data-parallel replicas take {global_batch // dp} of the {global_batch} sequences "
            f"each; the gradient reduction not hidden under the last backward costs {ctx.share('dp_exposed')} "
            f"and the optimizer step {ctx.share('optimizer')}.{ctx.rival('dp')}")


def _explain_zero(ctx: _Explain, zero: int, shards: int) -> str:
    what = {0: "nothing is sharded: every replica keeps full optimizer state and gradients",
            1: f"the optimizer state is sharded over the {shards} data-parallel ranks",
            2: f"the optimizer state and gradients are sharded over the {shards} data-parallel ranks",
            3: f"parameters, gradients and optimizer state are sharded over the {shards} data-parallel ranks "
               f"(FSDP); the gathers not hidden under compute cost {ctx.share('zero3_exposed')}"}[zero]
    return (f"zero={zero}: {what}; optimizer state {ctx.gib('optimizer'):.3g} GiB and gradients "
            f"{ctx.gib('gradients'):.3g} GiB per GPU.{ctx.rival('zero')}")


def _explain_recompute(ctx: _Explain, mode: str) -> str:
    return (f"recompute={mode}: activations take {ctx.gib('activations'):.3g} GiB per GPU; recomputation "
            f"costs {ctx.share('recompute')}.{ctx.rival('recompute')}")


def _explain_mbs(ctx: _Explain, mbs: int, micro_batches: int) -> str:
    return (f"mbs={mbs}: {micro_batches} micro-batches of {mbs} sequence{'s' if mbs > 1 else ''} per step "
            f"on each replica; larger micro-batches run the GEMMs more efficiently but hold more activations "
            f"and leave fewer micro-batches to fill the pipeline.{ctx.rival('micro_batch')}")
