"""Architecture specs (`spec.yaml`): parse and validate them into frozen dataclasses.

A spec describes a decoder-only transformer in a few numbers (see ARCHITECTURE.md, "Model inputs"):

```yaml
model:    {name, layers, hidden, ffn_hidden, heads, kv_heads, head_dim, vocab, seq_len, tied_embeddings,
           style, norm_eps, rope_theta,
           moe: null | {experts, top_k, expert_ffn_hidden, shared_experts, dense_layers_first,
                        capacity_factor, aux_loss_coef}}
training: {global_batch_sequences, micro_batch, precision: bf16|fp8, seq_len}   # all optional
```

A null or absent optional value means "not given". Keys autoshard does not model (`mla`, `params_b`, ...)
come back as warnings for the caller to print; a missing required key or an impossible value raises
`SpecError` with one paragraph naming the file, the field, the value and the fix. `load_spec` also accepts
one entry of `calibration/published_runs_dev.yaml` (its other top-level keys are named in a warning).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from autoshard.planner.errors import SpecError

__all__ = ["MoESpec", "ModelSpec", "TrainingSpec", "load_spec", "parse_spec"]

Style = Literal["gpt", "llama"]
Precision = Literal["bf16", "fp8"]

_MODEL_KEYS = (
    "name", "layers", "hidden", "ffn_hidden", "heads", "kv_heads", "head_dim", "vocab", "seq_len",
    "tied_embeddings", "moe", "style", "norm_eps", "rope_theta",
)  # fmt: skip
_MOE_KEYS = ("experts", "top_k", "expert_ffn_hidden", "shared_experts", "dense_layers_first", "capacity_factor",
             "aux_loss_coef")
_TRAINING_KEYS = ("global_batch_sequences", "micro_batch", "precision", "seq_len")
_TOP_KEYS = ("model", "training")
_STYLES: tuple[Style, ...] = ("gpt", "llama")
_PRECISIONS: tuple[Precision, ...] = ("bf16", "fp8")
DEFAULT_SEQ_LEN = 4096


@dataclass(kw_only=True, frozen=True, slots=True)
class MoESpec:
    """Mixture-of-experts feed-forward layers (Switch / Mixtral / DeepSeek style)."""

    experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Experts each token is routed to."""
    expert_ffn_hidden: int
    """Inner (SwiGLU) width of one expert."""
    shared_experts: int = 0
    """Always-active experts per MoE layer, fused into one FFN of width shared_experts x expert_ffn_hidden."""
    dense_layers_first: int = 0
    """The first this-many layers use a dense FFN of width `ffn_hidden` instead of experts (DeepSeek-V3: 3)."""
    capacity_factor: float | None = None
    """None: dropless. Else each expert takes at most ceil(capacity_factor x T x top_k / experts) of the T x top_k
    assignments of one routing group (the T tokens of one micro-batch), the rest are dropped in token order
    (reference_model.MoE); priced as capacity_factor x the balanced load."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch load-balancing loss added to the training loss per MoE layer (0: not added)."""


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer, GPT or Llama style, optionally with MoE layers."""

    name: str
    """Free-form model name, for reports."""
    layers: int
    """Transformer blocks."""
    hidden: int
    """Model width (d_model)."""
    ffn_hidden: int | None
    """Inner width of the dense FFN; None only for MoE models whose every layer is MoE."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (grouped-query attention when fewer than `heads`)."""
    vocab: int
    """Vocabulary size (rows of the embedding and of the output projection)."""
    seq_len: int = DEFAULT_SEQ_LEN
    """Longest sequence the model supports: learned positions (GPT) or the RoPE table (Llama)."""
    tied_embeddings: bool = False
    """The output projection reuses the token-embedding matrix."""
    moe: MoESpec | None = None
    """Mixture-of-experts layers, or None for a dense model."""
    style: Style = "llama"
    """"gpt": LayerNorm, learned positions, GELU MLP, biases. "llama": RMSNorm, RoPE, SwiGLU, no biases."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
    rope_theta: float = 500000.0
    """RoPE base frequency (Llama 3: 500000); unused by the GPT style."""
    head_dim: int = 0
    """Width of one attention head; 0 (not given): hidden / heads. Qwen3, Gemma and gpt-oss set it apart
    from the width (Qwen3-32B: 64 heads of 128 on a 5,120 width), so q and o are heads x head_dim wide."""

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether block `layer_id` (0-based) has routed experts instead of a dense FFN."""
        return self.moe is not None and layer_id >= self.moe.dense_layers_first


@dataclass(kw_only=True, frozen=True, slots=True)
class TrainingSpec:
    """Training settings given in the spec; None means "not given" (the planner chooses)."""

    global_batch_sequences: int | None = None
    """Sequences per optimizer step."""
    micro_batch: int | None = None
    """Sequences per micro-batch per data-parallel rank."""
    precision: Precision | None = None
    """Matmul precision: "bf16" or "fp8"."""
    seq_len: int | None = None
    """Training sequence length; defaults to model.seq_len."""


class _Reader:
    """Typed field access on one section of the spec, raising SpecError that names file and field."""

    def __init__(self, data: Mapping[str, Any], *, section: str, source: str) -> None:
        self.data, self.section, self.source = data, section, source

    def fail(self, key: str, problem: str, fix: str) -> SpecError:
        value = self.data.get(key)
        shown = f" ({value!r})" if value is not None else ""
        return SpecError(f"{self.source}: {self.section}.{key}{shown} {problem}. {fix}")

    def int_(self, key: str, *, required: bool = False, minimum: int = 1) -> int | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise SpecError(
                    f"{self.source}: {self.section}.{key} is missing; it is required. "
                    f"Add `{key}: <integer>` under `{self.section}:`."
                )
            return None
        # bool is a subclass of int in Python: `layers: true` must not read as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer", f"Write it as a whole number, e.g. `{key}: 4096`.")
        if value < minimum:
            bound = "positive" if minimum == 1 else f"at least {minimum}"
            raise self.fail(key, f"must be {bound}", f"Set {self.section}.{key} to {minimum} or more.")
        return value

    def req_int(self, key: str) -> int:
        value = self.int_(key, required=True)
        assert value is not None
        return value

    def float_(self, key: str, default: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(key, "must be a positive number", f"Remove it to use the default {default}.")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false", f"Write `{key}: true` or `{key}: false`.")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise self.fail(
                key, f"must be one of {', '.join(choices)}", "Use one of those values or remove the key."
            )
        return value.strip().lower()

    def unknown(self, known: tuple[str, ...]) -> list[str]:
        return [f"{self.section}.{k}" if self.section else str(k) for k in self.data if k not in known]


def _section(data: Mapping[str, Any], key: str, *, source: str, where: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is None or isinstance(value, Mapping):
        return value
    raise SpecError(
        f"{source}: {where} must be a mapping of keys to values, not {type(value).__name__} ({value!r}). "
        f"Write it as an indented block or as {{key: value, ...}}, or null."
    )


def _parse_moe(data: Mapping[str, Any], *, layers: int, source: str) -> MoESpec:
    r = _Reader(data, section="model.moe", source=source)
    experts, top_k = r.req_int("experts"), r.req_int("top_k")
    if top_k > experts:
        raise r.fail(
            "top_k",
            f"exceeds model.moe.experts ({experts}); a token cannot use more experts than exist",
            "Lower top_k or raise experts.",
        )
    dense_first = r.int_("dense_layers_first", minimum=0) or 0
    if dense_first > layers:
        raise r.fail(
            "dense_layers_first", f"exceeds model.layers ({layers})", f"Set it between 0 and {layers}."
        )
    return MoESpec(
        experts=experts,
        top_k=top_k,
        expert_ffn_hidden=r.req_int("expert_ffn_hidden"),
        shared_experts=r.int_("shared_experts", minimum=0) or 0,
        dense_layers_first=dense_first,
        capacity_factor=r.float_("capacity_factor", 1.0) if data.get("capacity_factor") is not None else None,
        aux_loss_coef=_aux_loss_coef(r),
    )


def _aux_loss_coef(r: _Reader) -> float:
    value = r.data.get("aux_loss_coef", 0.01)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise r.fail("aux_loss_coef", "must be a number >= 0", "Use 0 to train without the load-balancing loss.")
    return float(value)


def _check_shapes(r: _Reader, *, hidden: int, heads: int, kv_heads: int, head_dim: int | None) -> None:
    """Attention shapes: hidden = heads x head_dim unless head_dim is given, and GQA groups of heads / kv_heads
    query heads."""
    if head_dim is None and hidden % heads:
        raise r.fail(
            "hidden",
            f"is not divisible by model.heads ({heads}); hidden must be heads x head_dim",
            "Fix hidden or heads, or give model.head_dim when the heads are not hidden / heads wide.",
        )
    if heads % kv_heads:
        raise r.fail(
            "kv_heads",
            f"does not divide model.heads ({heads}); each key/value head serves a whole group of query heads",
            "Choose kv_heads among the divisors of heads.",
        )


def _derive_style(r: _Reader, *, hidden: int, ffn_hidden: int | None, heads: int, kv_heads: int) -> Style:
    """GPT-2/3 use a 4 x hidden MLP and multi-head attention; anything else reads as Llama style."""
    explicit = r.choice("style", _STYLES)
    if explicit is not None:
        return explicit  # type: ignore[return-value]
    return "gpt" if ffn_hidden == 4 * hidden and kv_heads == heads else "llama"


def _parse_model(data: Mapping[str, Any], *, source: str, warnings: list[str]) -> ModelSpec:
    r = _Reader(data, section="model", source=source)
    layers, hidden = r.req_int("layers"), r.req_int("hidden")
    heads, vocab = r.req_int("heads"), r.req_int("vocab")
    kv_heads = r.int_("kv_heads") or heads
    moe_data = _section(data, "moe", source=source, where="model.moe")
    moe = _parse_moe(moe_data, layers=layers, source=source) if moe_data is not None else None
    # The dense FFN width is only unused when every layer is an MoE layer. A dense multi-head model that
    # leaves it out (published GPT runs: Megatron's SC'21, Korthikanti, MegaScale) has GPT's 4 x hidden.
    ffn_given = data.get("ffn_hidden") is not None
    if not ffn_given and moe is None and kv_heads == heads and data.get("style") in (None, "gpt"):
        data = {**data, "ffn_hidden": 4 * hidden}
        r = _Reader(data, section="model", source=source)
        warnings.append(f"{source}: model.ffn_hidden not given; a dense multi-head model: GPT's 4 x hidden = "
                        f"{4 * hidden} assumed.")
    elif not ffn_given and (moe is None or moe.dense_layers_first > 0):
        raise SpecError(
            f"{source}: model.ffn_hidden is missing; it is required for the dense FFN layers. Add "
            f"`ffn_hidden: <integer>` under `model:` (GPT-2/3 use 4 x hidden = {4 * hidden})."
        )
    ffn_hidden = r.int_("ffn_hidden")
    style = _derive_style(r, hidden=hidden, ffn_hidden=ffn_hidden, heads=heads, kv_heads=kv_heads)
    head_dim = r.int_("head_dim")
    _check_shapes(r, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise r.fail("name", "must be a string", 'Quote it, e.g. `name: "my-model"`.')
    return ModelSpec(
        name=name or (Path(source).stem if source != "<dict>" else "model"),
        layers=layers,
        hidden=hidden,
        ffn_hidden=ffn_hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        seq_len=r.int_("seq_len") or DEFAULT_SEQ_LEN,
        tied_embeddings=r.bool_("tied_embeddings", False),
        moe=moe,
        style=style,
        norm_eps=r.float_("norm_eps", 1e-5),
        rope_theta=r.float_("rope_theta", 500000.0),
        head_dim=head_dim or 0,
    )


def _parse_precision(r: _Reader, warnings: list[str]) -> Precision | None:
    """bf16 or fp8. Calibration entries describe precision in words ("bf16 + Float8 linears", "MXFP8",
    "amp_bf16 (FSDP ...)"): a text naming one of the two formats reads as it, with a warning; FP8 wins
    when both appear, since it is the matmul precision. Anything else ("fp16", "mixed") is an error."""
    value = r.data.get("precision")
    if value is None:
        return None
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in _PRECISIONS:
        return text  # type: ignore[return-value]
    found: Precision | None = "fp8" if "fp8" in text or "float8" in text else None
    found = found or ("bf16" if "bf16" in text or "bfloat16" in text else None)
    if found is None:
        raise r.fail(
            "precision", f"must be one of {', '.join(_PRECISIONS)}", "Use one of those or remove the key."
        )
    warnings.append(f"{r.source}: read training.precision {value!r} as {found}.")
    return found


def _parse_training(
    data: Mapping[str, Any], *, model: ModelSpec, source: str, warnings: list[str]
) -> TrainingSpec:
    r = _Reader(data, section="training", source=source)
    seq_len = r.int_("seq_len")
    if seq_len is not None and seq_len > model.seq_len:
        raise r.fail(
            "seq_len",
            f"exceeds model.seq_len ({model.seq_len}), the longest sequence the model's position table holds",
            "Raise model.seq_len or lower training.seq_len.",
        )
    return TrainingSpec(
        global_batch_sequences=r.int_("global_batch_sequences"),
        micro_batch=r.int_("micro_batch"),
        precision=_parse_precision(r, warnings),
        seq_len=seq_len,
    )


def _unknown_keys(
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    moe: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None,
    *,
    source: str,
) -> list[str]:
    """One warning naming every key, by its dotted path, that autoshard reads no meaning from."""
    unknown = _Reader(data, section="", source=source).unknown(_TOP_KEYS)
    unknown += _Reader(model, section="model", source=source).unknown(_MODEL_KEYS)
    if moe is not None:
        unknown += _Reader(moe, section="model.moe", source=source).unknown(_MOE_KEYS)
    if training is not None:
        unknown += _Reader(training, section="training", source=source).unknown(_TRAINING_KEYS)
    if not unknown:
        return []
    return [f"{source}: ignoring keys autoshard does not model: {', '.join(unknown)}."]


def parse_spec(data: Any, *, source: str = "<dict>") -> tuple[ModelSpec, TrainingSpec, list[str]]:
    """Validate a spec mapping (top-level `model:` and optional `training:`) into dataclasses.

    Returns (model, training, warnings); raises SpecError on a missing required key or impossible value.
    """
    if not isinstance(data, Mapping):
        raise SpecError(
            f"{source}: the spec must be a mapping with a `model:` section, not {type(data).__name__}. "
            f"See examples/specs/llama3_8b.yaml for the format."
        )
    model_data = _section(data, "model", source=source, where="model")
    if model_data is None:
        hint = " (a file of many runs needs one entry extracted)" if "runs" in data else ""
        raise SpecError(
            f"{source}: has no `model:` section{hint}. Add `model: {{layers, hidden, ffn_hidden, heads, vocab, ...}}`;"
            f" see examples/specs/llama3_8b.yaml."
        )
    training_data = _section(data, "training", source=source, where="training")
    warnings: list[str] = []
    model = _parse_model(model_data, source=source, warnings=warnings)
    training = _parse_training(training_data or {}, model=model, source=source, warnings=warnings)
    moe_data = model_data.get("moe") if isinstance(model_data.get("moe"), Mapping) else None
    return model, training, _unknown_keys(data, model_data, moe_data, training_data, source=source) + warnings


def load_spec(path: str | Path) -> tuple[ModelSpec, TrainingSpec, list[str]]:
    """Read and validate a spec YAML file; see `parse_spec`."""
    source = str(path)
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SpecError(
            f"{source}: {what}. Pass the path of an architecture spec YAML file (see examples/specs/)."
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())
        raise SpecError(
            f"{source}: is not valid YAML ({detail}). Fix the syntax at the position shown."
        ) from e
    return parse_spec(data, source=source)
