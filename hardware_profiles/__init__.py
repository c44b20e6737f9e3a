"""Hardware profiles: one YAML per system in this folder, every number with its source.

`load_profile("H100_IB")` looks a name up case-insensitively (or reads a path to a YAML file); an unknown
name raises `UnknownProfileError` listing the valid ones. Units are in the field names, decimal SI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

SPEC_FIELDS = (
    "hbm_bytes",
    "hbm_bw_bytes_per_s",
    "bf16_flops_per_s",
    "fp8_flops_per_s",
    "fp32_flops_per_s",
    "gpus_per_node",
    "nvlink_domain_gpus",
    "intra_node_bw_bytes_per_s",
    "intra_node_latency_s",
    "inter_node_bw_bytes_per_s",
    "inter_node_latency_s",
)
OPTIONAL_SPEC_FIELDS = {"flash2_attention_ratio": 1.0}
"""Spec fields a profile may leave out (a CPU profile has no fused attention kernels), with their default."""
FITTED_FIELDS = (
    "gemm_efficiency_max",
    "gemm_half_flops",
    "attention_efficiency",
    "collective_efficiency_intra",
    "collective_efficiency_inter",
    "overlap_slowdown",
    "elementwise_traffic_factor",
)


class UnknownProfileError(ValueError):
    """An unknown profile name: the message lists the valid ones."""


@dataclass(kw_only=True, frozen=True, slots=True)
class Profile:
    """One system. Bandwidths are per GPU and per direction; FLOP/s are dense (no sparsity)."""

    name: str
    description: str
    gpu: str
    family: str
    """GPU generation whose fitted coefficients this profile shares (a100, h100, b200, cpu)."""
    hbm_bytes: float
    hbm_bw_bytes_per_s: float
    bf16_flops_per_s: float
    fp8_flops_per_s: float
    fp32_flops_per_s: float
    gpus_per_node: int
    nvlink_domain_gpus: int
    """GPUs that reach each other over NVLink (8 in a DGX; 72 in a GB200 NVL72 rack)."""
    intra_node_bw_bytes_per_s: float
    """NVLink bandwidth per GPU per direction."""
    intra_node_latency_s: float
    inter_node_bw_bytes_per_s: float
    """Scale-out network bandwidth per GPU per direction (its NIC)."""
    inter_node_latency_s: float
    flash2_attention_ratio: float = 1.0
    """FlashAttention-2's speed on this GPU as a fraction of the best fused attention kernel (cuDNN's or
    FlashAttention-3, what Transformer Engine runs): 1 where FA2 is the best (A100), about 0.57 on Hopper,
    whose TMA and warpgroup MMA it does not use. Frameworks on torch SDPA or the flash-attn 2 package run it
    (Framework.attention_kernel)."""
    gemm_efficiency_max: float
    """Fitted: fraction of the dtype peak that large GEMMs reach."""
    gemm_half_flops: float
    """Fitted: FLOPs of one GEMM at which it reaches half of gemm_efficiency_max."""
    attention_efficiency: float
    """Fitted: fraction of gemm_efficiency_max that fused (flash) attention reaches (of the bf16 peak: the
    product), so what lowers a GPU's GEMMs (a power cap, an older generation) lowers its attention too."""
    collective_efficiency_intra: float
    """Fitted: NCCL bus bandwidth / link bandwidth for large messages over NVLink."""
    collective_efficiency_inter: float
    """Fitted: the same over the scale-out network."""
    overlap_slowdown: float
    """Fitted: compute runs this much slower while communication overlaps it (Galvatron uses 1.3)."""
    elementwise_traffic_factor: float
    """Fitted: HBM bytes moved by non-GEMM ops per byte of activation they save for backward."""
    fitted_on: str
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def peak_flops(self, precision: str) -> float:
        return {"bf16": self.bf16_flops_per_s, "fp8": self.fp8_flops_per_s, "fp32": self.fp32_flops_per_s}[precision]

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


def profile_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load_profile(name: str | Path, *, gpu_memory_gib: float | None = None) -> Profile:
    """A profile by name (case-insensitive) or path; `gpu_memory_gib` overrides the memory capacity."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        match = [n for n in profile_names() if n.lower() == str(name).lower()]
        if not match:
            raise UnknownProfileError(
                f"unknown hardware profile {str(name)!r}; valid: {', '.join(profile_names())} "
                "(or a path to a profile .yaml, e.g. one written by `plan calibrate`)"
            )
        path = HERE / f"{match[0]}.yaml"
    profile = parse_profile(yaml.safe_load(path.read_text()), source=str(path))
    if gpu_memory_gib is not None:
        if gpu_memory_gib <= 0:
            raise ValueError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib}")
        profile = profile.replace(hbm_bytes=gpu_memory_gib * 2**30)
    return profile


def parse_profile(data: dict[str, Any], *, source: str = "<dict>") -> Profile:
    """Read the YAML layout: `specs:` and `fitted:` hold `{value, source}` for every number."""
    try:
        specs, fitted = data["specs"], data["fitted"]
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key in SPEC_FIELDS:
            values[key], sources[key] = _number(specs[key], key)
        for key, default in OPTIONAL_SPEC_FIELDS.items():
            values[key], sources[key] = (_number(specs[key], key) if key in specs
                                          else (default, f"not given in the profile: {default}"))
        for key in FITTED_FIELDS:
            values[key], sources[key] = _number(fitted[key], key)
        return Profile(
            name=data["name"], description=data["description"], gpu=data["gpu"], family=data["family"],
            fitted_on=fitted["fitted_on"], sources=sources,
            **{k: int(v) if k in ("gpus_per_node", "nvlink_domain_gpus") else float(v) for k, v in values.items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid hardware profile: {exc}") from exc


def _number(entry: Any, key: str) -> tuple[float, str]:
    if not isinstance(entry, dict) or "value" not in entry or not entry.get("source"):
        raise ValueError(f"{key} must be {{value: <number>, source: <where it comes from>}}, got {entry!r}")
    return float(entry["value"]), str(entry["source"])
