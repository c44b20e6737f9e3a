"""Compute time of one unit for one micro-batch on one GPU.

time = GEMM FLOPs / (peak(dtype) x efficiency(GEMM size))        (Calculon, Isaev et al. SC'23: per-op
     + attention FLOPs / (bf16 peak x GEMM eff_max x attention ratio(size))  efficiency by size;
                                                                   attention fused, one kernel per CP
                                                                   ring step)
     + elementwise HBM traffic / HBM bandwidth                     (norms, activations, rope: memory bound)
     + the loss's HBM passes over the logits / HBM bandwidth       (cross-entropy in fp32: memory bound)
Backward: GEMMs twice the forward (data and weight gradients); fused attention 2.5x (FlashAttention-2,
arXiv:2307.08691: 5 matmuls backward against 2 forward); elementwise twice.
FP8 speeds up only the GEMMs; attention and elementwise ops stay in 16 bits.
Recompute: full repeats the whole forward in the backward; selective repeats the attention core
(Korthikanti et al., arXiv:2205.05198, Sec. 5).
Unfused attention (Megatron-LM before FlashAttention): both score GEMMs over the full s x s (the causal
mask is applied after), and the scores pass through HBM: written, read and written by the fused
scale-mask-softmax, read and written by dropout in the forward, about as much again in the backward
(Calculon models the same passes).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoshard.hardware_profiles import Profile

from .work import UnitWork

GEMM_BWD_FACTOR = 2.0
ATTN_BWD_FACTOR = 2.5
ELEMENTWISE_BWD_FACTOR = 2.0
LOSS_FWD_BYTES = 22
"""HBM bytes per logit of the cross-entropy's forward, memory bound: the upcast to fp32 (read 2, write 4),
the log-softmax (its max and sum passes read 4 + 4, its output reads 4 and writes 4), the nll gather
(negligible). A 256K vocabulary makes this a few percent of a step (Nemotron), more on a narrow model
(GPT-OSS: hidden 2,880, vocabulary 201,088)."""
LOSS_BWD_BYTES = 22
"""Its backward: the nll gradient (write 4), the log-softmax backward (read 4 + 4, write 4) and the cast
back to 16 bits (read 4, write 2)."""
UNFUSED_SCORE_PASSES = 4
"""HBM passes over the score matrix in an unfused forward: softmax read + write, dropout read + write."""


@dataclass(kw_only=True, frozen=True, slots=True)
class ComputeTime:
    fwd_s: float
    bwd_s: float
    """Backward including any recomputed forward."""
    recompute_s: float
    """Of bwd_s, the recomputed forward."""
    attn_fwd_s: float
    """Forward time of the attention core alone (context-parallel exchange hides behind it)."""
    gemm_fwd_s: float = 0.0
    """Forward time of the linears alone (async TP hides its collectives behind them)."""


def gemm_efficiency(flops_per_gemm: float, profile: Profile) -> float:
    """Fraction of peak a GEMM of this many FLOPs reaches: eff_max * f / (f + f_half) (saturating)."""
    return profile.gemm_efficiency_max * flops_per_gemm / (flops_per_gemm + profile.gemm_half_flops)


def gemm_time(flops: float, calls: int, precision: str, profile: Profile, kernel_efficiency: float = 1.0) -> float:
    if flops <= 0:
        return 0.0
    return flops / (profile.peak_flops(precision) * kernel_efficiency * gemm_efficiency(flops / calls, profile))


def unit_compute(
    work: UnitWork, *, tokens: float, tp: int, cp: int, precision: str, recompute: str, profile: Profile,
    ep: int = 1, attention: str = "flash", kernel_efficiency: float = 1.0, cp_comm: str = "ring",
    attention_ratio: float = 1.0,
) -> ComputeTime:
    """Forward and backward time of `work` for `tokens` tokens of one micro-batch on one GPU.

    TP splits every GEMM and the attention heads; CP splits the tokens (attention per rank sees its
    queries against all keys, so causal-balanced CP divides attention FLOPs by cp too). With EP a GPU runs
    experts/ep experts, each on the tokens routed to it from the whole EP group: the same FLOPs in fewer,
    larger GEMMs (three per SwiGLU expert). `kernel_efficiency` scales GEMM and attention efficiency for the
    framework's kernels, `attention_ratio` its fused attention against the GPU's best (FlashAttention-2 on
    Hopper: framework.attention_ratio), and `cp_comm` says how its context-parallel attention runs.
    """
    k = kernel_efficiency
    shard = tp * cp
    gemm_f = gemm_time(work.gemm_flops * tokens / shard, work.gemm_calls, precision, profile, k)
    if work.experts:
        gemm_f += gemm_time(work.expert_flops * tokens / shard, 3 * max(1, work.experts // ep), precision, profile, k)
    if attention == "unfused":
        attn_f = gemm_time(2 * work.attn_flops * tokens / shard, 2, "bf16", profile, k)
        attn_f += UNFUSED_SCORE_PASSES * work.score_bytes * tokens / shard / profile.hbm_bw_bytes_per_s
    else:
        # one kernel per context-parallel ring step (or per gathered chunk); small kernels run below peak like
        # small GEMMs. A masked kernel over all gathered keys skips no causal work: twice the FLOPs, one kernel.
        flops = work.attn_flops * tokens / shard
        per_kernel = flops / cp
        if cp > 1 and cp_comm == "allgather_masked":
            flops, per_kernel = 2 * flops, 2 * flops
        best = profile.attention_efficiency * profile.gemm_efficiency_max  # the GPU's best fused attention
        eff = k * attention_ratio * best * per_kernel / (per_kernel + profile.gemm_half_flops)
        attn_f = flops / (profile.bf16_flops_per_s * eff) if flops else 0.0
    elem_f = profile.elementwise_traffic_factor * work.act_bytes * tokens / shard / profile.hbm_bw_bytes_per_s
    logits = work.logits * tokens / shard  # the loss's passes over this GPU's logits (vocabulary-parallel under TP)
    fwd = gemm_f + attn_f + elem_f + LOSS_FWD_BYTES * logits / profile.hbm_bw_bytes_per_s
    bwd = GEMM_BWD_FACTOR * gemm_f + ATTN_BWD_FACTOR * attn_f + ELEMENTWISE_BWD_FACTOR * elem_f \
        + LOSS_BWD_BYTES * logits / profile.hbm_bw_bytes_per_s
    redo = {"none": 0.0, "selective": attn_f, "full": fwd}[recompute] if work.kind == "block" else 0.0
    return ComputeTime(fwd_s=fwd, bwd_s=bwd + redo, recompute_s=redo, attn_fwd_s=attn_f, gemm_fwd_s=gemm_f)


def optimizer_time(params_per_gpu: float, profile: Profile) -> float:
    """AdamW with fp32 master weights is memory bound: it reads master weight, gradient and both moments
    (16 B) and writes master weight, moments (12 B) and the 16-bit weight (2 B): 30 B per parameter."""
    return 30.0 * params_per_gpu / profile.hbm_bw_bytes_per_s
