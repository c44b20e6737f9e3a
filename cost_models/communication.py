"""Collective times on a two-tier topology (NVLink inside a domain, the scale-out network across).

Ring algorithms, as nccl-tests PERFORMANCE.md defines bus bandwidth (S = bytes per rank's full buffer,
n = ranks, B = bus bandwidth, a = per-step latency):
    all-reduce              2 (n-1)/n * S / B + 2 a_ring  (ring), or across d > 1 domains
                            2 S / (0.92 B) + 2 ((k-1) a_nvlink + log2(d) a_network)  (NCCL's tree),
                            whichever is faster, as NCCL's tuner chooses
    all-gather, reduce-scatter (n-1)/n * S / B + a_ring
    all-to-all              (n-1)/n * S / B + a_ring         (pairwise exchange)
with a_ring = (n - d) a_nvlink + (d - 1) a_network over the d NVLink domains the ring spans (NCCL's model).
    point-to-point          S / B + a
Ranks are ordered TP innermost, then CP, then DP (EP groups inside DP x CP), PP outermost (Megatron-LM and
torchtitan's default). A group is (size, stride) in that order. Within one NVLink domain B is the NVLink
bandwidth. A group that spans domains is bound by the network: with k of its ranks in each domain, NCCL
runs k rings in parallel over k NICs, so B = min(NVLink, k x NIC) (why DP with TP=1 reduces about 8x
faster across DGX nodes than DP with TP=8).
"""

from __future__ import annotations

import math
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


TREE_BW_FACTOR = 0.92
"""A tree all-reduce moves 2 S per rank at this fraction of the ring's bus bandwidth (NCCL
src/graph/tuning.cc: the tree's bus bandwidth is the ring's scaled by .92 when it crosses nodes)."""


def all_reduce(nbytes: float, group: Group, profile: Profile) -> float:
    """The faster of NCCL's ring and tree algorithms, as NCCL's tuner picks per call (src/graph/tuning.cc)."""
    return min(2 * _ring(nbytes, group, profile), _tree_all_reduce(nbytes, group, profile))


def _tree_all_reduce(nbytes: float, group: Group, profile: Profile) -> float:
    """NCCL's double binary tree across the d NVLink domains, a chain of the k ranks inside each: reduce up
    and broadcast down, latency 2 ((k-1) a_nvlink + log2(d) a_network) (tuning.cc's tree latency), bandwidth
    2 S / (0.92 B). Across one domain NCCL rings (or NVLS); the tree only pays off across many nodes, where
    the ring's 2 (d-1) network steps make a small bucket latency-bound."""
    d = domains(group, profile)
    if group.size <= 1 or nbytes <= 0 or d <= 1:
        return float("inf")
    bw, _ = link(group, profile)
    k = max(1, group.size // d)
    lat = 2 * ((k - 1) * profile.intra_node_latency_s + math.log2(d) * profile.inter_node_latency_s)
    return 2 * nbytes / (TREE_BW_FACTOR * bw) + lat


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


def domains(group: Group, profile: Profile) -> int:
    """NVLink domains (nodes) the group spans, placed by the rank order."""
    domain = profile.nvlink_domain_gpus
    if group.size * group.stride <= domain:
        return 1
    per_domain = max(1, min(group.size, domain // group.stride)) if group.stride < domain else 1
    return max(1, group.size // per_domain)


def _ring(nbytes: float, group: Group, profile: Profile) -> float:
    """Ring time: bandwidth over the slowest tier, plus the latency of its n-1 steps, of which d-1 cross the
    network (d domains spanned) and the rest NVLink: NCCL's own ring model (src/graph/tuning.cc: nsteps =
    nRanks-1, nInterSteps = nNodes-1, latency = (nsteps - nInterSteps) x intraLat + nInterSteps x interLat)."""
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, _ = link(group, profile)
    d = domains(group, profile)
    lat = (n - d) * profile.intra_node_latency_s + (d - 1) * profile.inter_node_latency_s
    return (n - 1) / n * nbytes / bw + lat
