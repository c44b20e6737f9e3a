"""Pipeline schedules: bubble, micro-batches in flight, step time, and the split of units into stages.

Narayanan et al., SC'21 (arXiv:2104.04473), Sec. 2.2: with p stages, m micro-batches and v model chunks
per stage, the bubble is (p-1)/m of the ideal time for GPipe and 1F1B, and (p-1)/(v m) for interleaved
1F1B. 1F1B keeps at most p - i micro-batches in flight on stage i (p on the first); GPipe keeps all m;
interleaving multiplies the first stage's activations by 1 + (p-1)/(p v) (Korthikanti et al., Sec. 4.2.3),
the stage-0 case of Megatron's interleaved warm-up: stage i runs 2 (p - i - 1) + (v - 1) p chunk forwards
before its first backward, each chunk 1/v of the stage (measured on torch's schedules in
tests/distributed/test_pp.py).
"""

from __future__ import annotations


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Idle time of the pipeline over its busy time."""
    return (p - 1) / (v * m)


def in_flight(stage: int, p: int, m: int, v: int, schedule: str) -> float:
    """Micro-batches whose activations stage `stage` (0-based) holds at its peak."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved_1f1b" and v > 1:
        return min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1) / v
    return float(min(p - stage, m))


def step_time(stage_times: list[float], m: int, v: int = 1) -> float:
    """Time of m micro-batches through the pipeline: the slowest stage paces the steady state and the
    fill and drain cost (p-1)/v average stage times (Narayanan et al., Sec. 2.2.2)."""
    p = len(stage_times)
    slowest = max(stage_times)
    mean = sum(stage_times) / p
    return m * slowest + (p - 1) / v * mean


def split_blocks(n_blocks: int, chunks: int) -> list[int]:
    """Blocks per model chunk, as even as possible, extra blocks on the later chunks (the first chunk
    also holds the embedding, the last the head)."""
    base, extra = divmod(n_blocks, chunks)
    return [base + (1 if i >= chunks - extra else 0) for i in range(chunks)]
