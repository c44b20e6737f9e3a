"""Layout and training settings: what the cost model prices and the planner chooses.

The layout string (ARCHITECTURE.md) is `tp=8,pp=16,vpp=2,cp=1,ep=1,dp=64,zero=1,mbs=1,recompute=selective,
schedule=interleaved_1f1b`; any subset parses to a `PartialLayout`, all degrees to a `Layout`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe", "zb_interleaved", "zbv")
MULTI_CHUNK_SCHEDULES = ("interleaved_1f1b", "zb_interleaved", "zbv")
"""Schedules that run vpp > 1 model chunks per pipeline rank (zbv exactly 2: validity.py)."""
PRECISIONS = ("bf16", "fp8")
ATTENTION_KERNELS = ("flash", "unfused")
_INT_KEYS = ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "mbs")
_ALIASES = {"micro_batch": "mbs", "sp": "sequence_parallel"}
_BOOL_KEYS = ("sequence_parallel", "async_tp")
LAYOUT_KEYS = _INT_KEYS + ("recompute", "schedule") + _BOOL_KEYS


@dataclass(kw_only=True, frozen=True, slots=True)
class Layout:
    """A complete parallel layout. Rank order: TP innermost, then CP, DP (EP inside DP x CP), PP outermost."""

    tp: int = 1
    """Tensor-parallel degree (within one NVLink domain)."""
    pp: int = 1
    """Pipeline stages."""
    vpp: int = 1
    """Interleaved model chunks per pipeline rank."""
    cp: int = 1
    """Context-parallel degree: the sequence is split over cp ranks."""
    ep: int = 1
    """Expert-parallel degree; divides dp x cp (experts are sharded inside the data-parallel ranks)."""
    dp: int = 1
    """Data-parallel replicas of the dense part."""
    zero: int = 1
    """ZeRO stage: 0 plain DP, 1 optimizer state sharded, 2 + gradients, 3 + parameters (FSDP)."""
    mbs: int = 1
    """Micro-batch size in sequences."""
    recompute: str = "none"
    """Activation recomputation: none, selective (attention core) or full (whole block)."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b, interleaved_1f1b, gpipe, or the zero-bubble zb_interleaved (vpp >= 1) and zbv
    (vpp = 2, chunks in a V) of torch.distributed.pipelining (transforms/pp.py, cost_models/pipeline.py)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism for the norms and dropout between TP regions (when tp > 1)."""
    async_tp: bool = False
    """TP collectives overlapped with the GEMMs they feed (TE's tp-comm-overlap, torch's async TP)."""

    def __post_init__(self) -> None:
        degrees = (self.tp, self.pp, self.vpp, self.cp, self.ep, self.dp, self.mbs)
        # the search builds tens of thousands of layouts: the common case in one pass, messages only on failure
        if not (set(map(type, degrees)) == {int} and min(degrees) >= 1 and type(self.zero) is int
                and 0 <= self.zero <= 3):
            self._integer_errors()
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"layout recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"layout schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.vpp > 1 and self.schedule not in MULTI_CHUNK_SCHEDULES:
            raise ValueError(f"vpp={self.vpp} needs schedule {' or '.join(MULTI_CHUNK_SCHEDULES)}, got {self.schedule}")
        if (self.dp * self.cp) % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp x cp ({self.dp} x {self.cp} = {self.dp * self.cp})")

    def _integer_errors(self) -> None:
        for key in _INT_KEYS:
            value = getattr(self, key)
            low = 0 if key == "zero" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"layout {key} must be an integer >= {low}, got {value!r}")
        if self.zero > 3:
            raise ValueError(f"layout zero must be 0, 1, 2 or 3, got {self.zero}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def to_string(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in _INT_KEYS]
        parts += [f"recompute={self.recompute}", f"schedule={self.schedule}"]
        if not self.sequence_parallel:
            parts.append("sequence_parallel=false")
        if self.async_tp:
            parts.append("async_tp=true")
        return ",".join(parts)


@dataclass(kw_only=True, frozen=True, slots=True)
class Training:
    """What one optimizer step processes."""

    global_batch: int
    """Sequences per optimizer step."""
    seq_len: int
    precision: str = "bf16"
    """Matmul precision: bf16, or fp8 (matmuls only; attention, norms and communication stay bf16)."""
    attention: str = "flash"
    """Attention kernel: flash (fused, what PyTorch SDPA runs on GPUs) or unfused (scores through HBM, as
    Megatron-LM ran before FlashAttention; kept to price older published runs)."""
    framework: str = "torch"
    """What runs the layout (cost_models/framework.py): torch (apply_plan, the default), torchtitan,
    megatron, deepspeed or nanotron."""
    grad_reduce: str | None = None
    """Gradient buffer and reduction dtype, fp32 or bf16; None: the framework's default (Megatron fp32,
    `--grad-reduce-in-bf16` / grad_reduce_in_fp32=False make it bf16)."""
    cp_attention: str | None = None
    """How context-parallel attention runs: ring or allgather (apply_plan's `cp_attention`,
    transforms/cp.py); None: the framework's default (framework.py `cp_comm`; ring for torch)."""

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.seq_len < 1:
            raise ValueError(f"global batch ({self.global_batch}) and seq_len ({self.seq_len}) must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        from .framework import get_framework

        object.__setattr__(self, "framework", get_framework(self.framework).name)
        if self.grad_reduce not in (None, "fp32", "bf16"):
            raise ValueError(f"grad_reduce must be fp32 or bf16, got {self.grad_reduce!r}")
        if self.cp_attention not in (None, "ring", "allgather"):
            raise ValueError(f"cp_attention must be ring or allgather, got {self.cp_attention!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    def grad_bytes(self, framework_default: float) -> float:
        """Bytes per parameter of the gradient buffer (ZeRO 0-2) and of its reduction."""
        return {"fp32": 4.0, "bf16": 2.0}.get(self.grad_reduce or "", framework_default)


def parse_layout(text: str) -> dict[str, Any]:
    """`tp=8,pp=4,recompute=full` -> {'tp': 8, 'pp': 4, 'recompute': 'full'}; unknown keys are an error."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if not sep or key not in LAYOUT_KEYS:
            raise ValueError(f"layout item {item!r}: expected key=value with key one of {', '.join(LAYOUT_KEYS)}")
        out[key] = _value(key, value.strip())
    if out.get("vpp", 1) > 1 and "schedule" not in out:
        out["schedule"] = "interleaved_1f1b"
    if out.get("schedule") == "zbv" and "vpp" not in out:
        out["vpp"] = 2  # ZB-V's V is two chunks per rank
    return out


def _value(key: str, value: str) -> Any:
    if key in _INT_KEYS:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"layout {key} must be an integer, got {value!r}") from None
    if key in _BOOL_KEYS:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"layout {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return value


def complete(partial: dict[str, Any], gpus: int) -> Layout:
    """A Layout from explicit keys; dp takes the remaining GPUs when not given. Raises when keys are missing
    that only the planner can choose (nothing is, today: unspecified degrees default to 1)."""
    fields = {f.name for f in dataclasses.fields(Layout)}
    kwargs = {k: v for k, v in partial.items() if k in fields}
    if "dp" not in kwargs:
        other = kwargs.get("tp", 1) * kwargs.get("pp", 1) * kwargs.get("cp", 1)
        if gpus % other:
            raise ValueError(f"tp x pp x cp = {other} does not divide the {gpus} GPUs")
        kwargs["dp"] = gpus // other
    layout = Layout(**kwargs)
    if layout.gpus != gpus:
        raise ValueError(
            f"tp({layout.tp}) x pp({layout.pp}) x cp({layout.cp}) x dp({layout.dp}) = {layout.gpus} != {gpus} GPUs"
        )
    return layout
