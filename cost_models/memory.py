"""Memory per GPU: model states by ZeRO stage, activations by schedule and recompute, and buffers.

Model states with Adam in mixed precision (ZeRO, Rajbhandari et al., arXiv:1910.02054, Sec. 3.1):
16-bit weights (2 B) + gradients + fp32 master weights, momentum and variance (K = 12 B) per parameter.
ZeRO-1 shards the optimizer state over the N_d data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the
weights too: 2+2+12 = 16 Psi; 4 Psi + 12 Psi/N_d; 2 Psi + 14 Psi/N_d; 16 Psi/N_d (paper's Fig. 1 with 2-byte
gradients), the default here.

Activations are the captured bytes saved for backward (see work.py), split by TP with sequence parallelism
(all of them) or without it (all but about 10 sbh bytes of norm and linear inputs, which every TP rank
keeps: Korthikanti et al., arXiv:2205.05198, Table 2: sbh(10 + 24/t)) and by CP (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from .work import UnitWork

WEIGHT_BYTES = 2
GRAD_BYTES = 2
"""16-bit gradient buffers, the default (torch DDP on bf16 weights; FSDP2 keeps the sharded fp32 gradient
instead of a master copy, which the 12 optimizer bytes already cover). Megatron's fp32 main_grad is
framework.grad_bytes = 4."""
OPTIMIZER_BYTES = 12
LOGIT_BYTES = 12
"""Per logit at the loss's backward peak, PyTorch's cross-entropy on logits upcast to fp32 (as autoshard and
torchtitan compute the loss): the fp32 log-softmax kept for backward, the nll gradient and the log-softmax
gradient, 4 bytes each (the 16-bit logits and their fp32 copy, 6 bytes, are freed after the forward,
whose own peak is 10). Measured: benchmarks/loss_memory.py (12.0 on CPU)."""
VOCAB_PARALLEL_LOGIT_BYTES = 16
"""The same under DTensor's loss_parallel (vocabulary-sharded logits, TP > 1): its backward rebuilds the
gradient from zeros_like, exp(log-softmax) and their sum beside the kept log-softmax, 4 x 4 bytes
(torch/distributed/tensor/parallel/loss.py, _nll_loss_and_log_softmax_backward; measured 16.0)."""
REPLICATED_INPUTS = 5
"""Without SP, each TP rank keeps ~10 sbh bytes = 5 x the block input (2 sbh bytes): Korthikanti Table 2."""
ALLOCATOR_RESERVE = 0.05
"""PyTorch's caching allocator holds more than it hands out (fragmentation); sources report the reserved peak."""


@dataclass(kw_only=True, slots=True)
class StageMemory:
    """Peak bytes on one GPU of one pipeline stage, by kind."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    buffers: float = 0.0
    reserve: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.buffers + self.reserve)


def model_states(params: float, *, zero: int, shards: int, weight_bytes: float = WEIGHT_BYTES,
                 grad_bytes: float = GRAD_BYTES, optimizer_bytes: float = OPTIMIZER_BYTES) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes on one GPU holding `params` parameters, sharded over `shards`."""
    w, g, o = params * weight_bytes, params * grad_bytes, params * optimizer_bytes
    if zero >= 1:
        o /= shards
    if zero >= 2:
        g /= shards
    if zero >= 3:
        w /= shards
    return w, g, o


UNFUSED_SCORE_BYTES = 5 / 2
"""An unfused core keeps 5 bytes per score (16-bit softmax output and dropout output, 1-byte dropout
mask: Korthikanti et al. Sec. 4.1, the 5as^2b term), i.e. 2.5 x the 16-bit score row."""


def block_activations(work: UnitWork, *, tokens: float, tp: int, cp: int, sp: bool, recompute: str,
                      attention: str = "flash", selective: str = "attention", gathered: bool = False) -> float:
    """Bytes one micro-batch leaves saved in this unit until its backward (on one GPU). `selective` is what
    the framework's selective recompute keeps (framework.py): the block minus its attention core, or
    torchtitan's op-level policy (every other matmul output and the SDPA output). `gathered`: under SP its
    column-parallel linears keep their all-gathered input whole (Framework.sp_saves_gathered), not the
    1/tp that Korthikanti's 34sbh/t counts."""
    if recompute == "full" and work.kind == "block":
        return work.input_bytes * tokens / cp / (tp if sp else 1)
    if recompute == "selective" and selective == "op" and work.sac_op_bytes:
        return work.sac_op_bytes * tokens / cp / tp
    whole = gathered_whole(work, tokens=tokens, tp=tp, cp=cp, sp=sp) if gathered and work.kind == "block" else 0.0
    core = work.core_bytes + (UNFUSED_SCORE_BYTES * work.score_bytes if attention == "unfused" else 0.0)
    act = work.act_bytes - work.core_bytes + (0.0 if recompute == "selective" else core)
    if tp > 1 and not sp:
        kept = min(act, REPLICATED_INPUTS * work.input_bytes)
        act = (act - kept) / tp + kept
    else:
        act /= tp
    return act * tokens / cp + whole


def gathered_whole(work: UnitWork, *, tokens: float, tp: int, cp: int, sp: bool) -> float:
    """Bytes beyond their 1/tp shard that a unit's sequence-parallel linears keep when they save the
    all-gathered input (Framework.sp_saves_gathered)."""
    return work.gathered_bytes * tokens / cp * (1 - 1 / tp) if sp and tp > 1 else 0.0


def working_activations(work: UnitWork, *, tokens: float, tp: int, cp: int, sp: bool, attention: str = "flash",
                        gathered: bool = False) -> float:
    """Full recompute rebuilds one block's activations at a time during the backward."""
    return block_activations(work, tokens=tokens, tp=tp, cp=cp, sp=sp, recompute="none", attention=attention,
                             gathered=gathered)


def logits_bytes(tokens: float, vocab: int, *, tp: int, cp: int, logit_bytes: float = LOGIT_BYTES) -> float:
    return tokens / cp * vocab / tp * logit_bytes
