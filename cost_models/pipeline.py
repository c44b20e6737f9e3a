"""Pipeline schedules: bubble, micro-batches in flight, step time, and the split of units into stages.

Narayanan et al., SC'21 (arXiv:2104.04473), Sec. 2.2: with p stages, m micro-batches and v model chunks
per stage, the bubble is (p-1)/m of the ideal time for GPipe and 1F1B, and (p-1)/(v m) for interleaved
1F1B. 1F1B keeps at most p - i micro-batches in flight on stage i (p on the first); GPipe keeps all m;
interleaving multiplies the first stage's activations by 1 + (p-1)/(p v) (Korthikanti et al., Sec. 4.2.3),
the stage-0 case of Megatron's interleaved warm-up: stage i runs 2 (p - i - 1) + (v - 1) p chunk forwards
before its first backward, each chunk 1/v of the stage (measured on torch's schedules in
tests/distributed/test_pp.py).

Zero bubble (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, arXiv:2401.10241). The backward
splits into B, the gradient of the stage's input (on the critical path: the previous stage waits for it),
and W, the gradient of its weights (needed only by the optimizer step), so W can fill the bubble. With
T_F, T_B, T_W the times of one micro-batch on a stage:
- 1F1B's bubble is (p-1)(T_F + T_B + T_W); ZB-H1, which delays stage i's W passes by i
  micro-batches and so keeps 1F1B's peak of p micro-batches, cuts it to (p-1)(T_F + T_B - T_W) (Sec. 3.1).
  W cannot fill more than the B it replaces: the bubble is (p-1)(T_F + max(0, T_B - T_W)).
  torch's ScheduleInterleavedZeroBubble is ZB-H1 over v chunks per rank, each 1/v of the stage:
  (p-1)(T_F + max(0, T_B - T_W)) / v.
- ZB-V (Sec. 6; Qi et al., "Pipeline Parallelism with Controllable Memory", arXiv:2405.15362, Sec. 3: the
  V-shape building block) places 2 chunks per rank in a V, rank r holding chunks r and 2p-1-r, so the
  first and the last chunk share rank 0 and every rank's memory is the same, p micro-batches. At
  T_F = T_B = T_W it is "zero bubble": what is left is the fill no schedule avoids, the last rank waiting
  for p-1 chunk forwards, (p-1) T_F / 2, the ZB-H1 formula above at v = 2.
The cost model prices the split backward as T_F = T_B = T_W, a third of a micro-batch's stage time each
(the paper's premise, Sec. 2: B and W each cost about a forward for the matmuls); then both zero-bubble
schedules' fill and drain is (p-1)/(3v) stage times against interleaved 1F1B's (p-1)/v. Replaying torch's
own action order with those times (tests/unit/test_pipeline_schedules.py) gives exactly these bubbles
for m >= p micro-batches (zbv: m >= 2p - 1, the count torch builds its V order for), and the peaks below;
fewer micro-batches leave holes the formula does not price (as 1F1B's (p-1)/v does not for m < p).
W deferral holds memory: a micro-batch's activations stay until its W has run (torch keeps the whole
autograd graph from B to W), so "in flight" counts forwards whose W has not run. Only the tensors above the
stage's last weight go at B: on the stage with the head, the loss's (the logits' softmax), which estimate.py
prices once, as `logits`, not per micro-batch held (measured in tests/distributed/test_pp.py: 4, 4, 4 and
3.65 micro-batches on the stages of zb_interleaved at p = 4, m = 8, the loss 12% of the last stage's bytes).
"""

from __future__ import annotations

ZERO_BUBBLE = ("zb_interleaved", "zbv")
"""Schedules that split the backward into input (B) and weight (W) gradients."""
V_SHAPED = ("zbv",)
"""Schedules that place the chunks in a V: rank r holds chunks r and 2p-1-r."""
SPLIT_BACKWARD = (1 / 3, 1 / 3, 1 / 3)
"""T_F : T_B : T_W, shares of one micro-batch's stage time under a zero-bubble schedule (Qi et al., Sec. 2)."""


def chunk_stage(chunk: int, p: int, schedule: str) -> int:
    """The pipeline rank that runs model chunk `chunk`: c mod p (Megatron's interleaving, torch's "loop"), or
    in a V for ZB-V (torch's `generate_stage_to_rank_mapping(style="v")`: down the ranks, then back up)."""
    rank = chunk % p
    return p - 1 - rank if schedule in V_SHAPED and (chunk // p) % 2 else rank


def fill_drain(p: int, v: int = 1, schedule: str = "1f1b") -> float:
    """Idle time of the pipeline per step, in stage times of one micro-batch (m >= p)."""
    if schedule in ZERO_BUBBLE:
        t_f, t_b, t_w = SPLIT_BACKWARD
        return (p - 1) * (t_f + max(0.0, t_b - t_w)) / v  # Qi et al. Sec. 3.1 (ZB-H1), over v chunks
    return (p - 1) / v  # Narayanan et al. Sec. 2.2


def bubble_fraction(p: int, m: int, v: int = 1, schedule: str = "1f1b") -> float:
    """Idle time of the pipeline over its busy time."""
    return fill_drain(p, v, schedule) / m


def in_flight(stage: int, p: int, m: int, v: int, schedule: str) -> float:
    """Micro-batches whose activations stage `stage` (0-based) holds at its peak."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "zbv":
        # rank r runs 2(p-r)-1 forwards of chunk r, then r pairs (chunk 2p-1-r, chunk r), then the first
        # W of chunk 2p-1-r: min(m, 2p-r-1) + min(m, r+1) chunk forwards held, 2p (p micro-batches) at most
        return (min(m, 2 * p - stage - 1) + min(m, stage + 1)) / v
    if schedule == "zb_interleaved":
        # torch's ZB-H1 warm-up: (v-1) rounds of m/rounds micro-batches plus p-1-i forwards, then i+1 more
        # forward-B pairs before stage i's first W: the same on every stage (p micro-batches when p | m)
        per_round = m // max(1, m // p)
        return min(m * v, (v - 1) * per_round + p) / v
    if schedule == "interleaved_1f1b" and v > 1:
        return min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1) / v
    return float(min(p - stage, m))


def step_time(stage_times: list[float], m: int, v: int = 1, schedule: str = "1f1b") -> float:
    """Time of m micro-batches through the pipeline: the slowest stage paces the steady state and the
    fill and drain cost `fill_drain` average stage times ((p-1)/v for 1F1B: Narayanan et al., Sec. 2.2.2)."""
    p = len(stage_times)
    slowest = max(stage_times)
    mean = sum(stage_times) / p
    return m * slowest + fill_drain(p, v, schedule) * mean


def split_blocks(n_blocks: int, chunks: int) -> list[int]:
    """Blocks per model chunk, as even as possible, extra blocks on the later chunks (the first chunk
    also holds the embedding, the last the head)."""
    base, extra = divmod(n_blocks, chunks)
    return [base + (1 if i >= chunks - extra else 0) for i in range(chunks)]
