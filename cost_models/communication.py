"""Collective times on a two-tier topology (NVLink inside a domain, the scale-out network across).

Ring algorithms, as nccl-tests PERFORMANCE.md defines bus bandwidth (S = bytes per rank's full buffer,
n = ranks, B = bus bandwidth, a = per-step latency):
    all-reduce              2 (n-1)/n * S / B + 2 (n-1) a
    all-gather, reduce-scatter (n-1)/n * S / B + (n-1) a
    all-to-all              (n-1)/n * S / B + (n-1) a        (pairwise exchange)
    point-to-point          S / B + a
Ranks are ordered TP innermost, then CP, then DP (EP groups inside DP x CP), PP outermost (Megatron-LM and
torchtitan's default). A group is (size, stride) in that order. Within one NVLink domain B is the NVLink
bandwidth. A group that spans domains is bound by the network: with k of its ranks in each domain, NCCL
runs k rings in parallel over k NICs, so B = min(NVLink, k x NIC) (why DP with TP=1 reduces about 8x
faster across DGX nodes than DP with TP=8).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoshard.hardware_profiles import Profile

from .layout import Layout


@dataclass(kw_only=True, frozen=True, slots=True)
class Group:
    size: int
    stride: int
    """Distance in global rank between consecutive members."""


def layout_groups(layout: Layout) -> dict[str, Group]:
    """The process groups of a layout, as placed by the rank order TP < CP < DP < PP."""
    tp, cp, dp = layout.tp, layout.cp, layout.dp
    return {
        "tp": Group(size=tp, stride=1),
        "cp": Group(size=cp, stride=tp),
        "dp": Group(size=dp, stride=tp * cp),
        "dp_cp": Group(size=dp * cp, stride=tp),  # gradients of dense weights reduce over DP and CP
        "ep": Group(size=layout.ep, stride=tp),  # the first ep ranks of DP x CP
        "edp": Group(size=dp * cp // layout.ep, stride=tp * layout.ep),  # replicas of one expert shard
        "pp": Group(size=layout.pp, stride=tp * cp * dp),
    }


def link(group: Group, profile: Profile) -> tuple[float, float]:
    """(bus bandwidth in bytes/s, per-step latency in s) of the slowest tier the group crosses."""
    domain = profile.nvlink_domain_gpus
    if group.size <= 1:
        return float("inf"), 0.0
    if group.size * group.stride <= domain:
        return profile.intra_node_bw_bytes_per_s * profile.collective_efficiency_intra, profile.intra_node_latency_s
    per_domain = max(1, min(group.size, domain // group.stride)) if group.stride < domain else 1
    network = per_domain * profile.inter_node_bw_bytes_per_s * profile.collective_efficiency_inter
    nvlink = profile.intra_node_bw_bytes_per_s * profile.collective_efficiency_intra
    return min(nvlink, network), profile.inter_node_latency_s


def all_reduce(nbytes: float, group: Group, profile: Profile) -> float:
    return 2 * _ring(nbytes, group, profile)


def all_gather(nbytes: float, group: Group, profile: Profile) -> float:
    """`nbytes` is the gathered (full) buffer."""
    return _ring(nbytes, group, profile)


def reduce_scatter(nbytes: float, group: Group, profile: Profile) -> float:
    """`nbytes` is the input (full) buffer."""
    return _ring(nbytes, group, profile)


def all_to_all(nbytes: float, group: Group, profile: Profile) -> float:
    """`nbytes` is what one rank sends in all (its share to itself stays)."""
    return _ring(nbytes, group, profile)


def p2p(nbytes: float, group: Group, profile: Profile) -> float:
    if group.size <= 1:
        return 0.0
    bw, lat = link(group, profile)
    return nbytes / bw + lat


def _ring(nbytes: float, group: Group, profile: Profile) -> float:
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = link(group, profile)
    return (n - 1) / n * nbytes / bw + (n - 1) * lat
