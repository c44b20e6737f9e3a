"""Learning-rate schedules a ParallelModel applies before each optimizer step, and that checkpoints save.

`WarmupCosine` (the schedule of most LLM pretraining recipes: nanoGPT's `get_lr`, torchtitan's
`linear_warmup_cosine`): linear warmup to the peak over `warmup` steps, then cosine decay to `floor` x peak at
step `total`, constant after it. Its state (the shape and the steps taken) is plain JSON: checkpoints keep it
in their manifest (transforms/checkpoint.py), so a resumed job continues the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .checkpoint import FlatState, optimizer_parts


@dataclass(kw_only=True, slots=True)
class WarmupCosine:
    """lr(t) = peak (t + 1) / warmup for t < warmup, else
    peak (floor + (1 - floor) (1 + cos(pi min(1, (t - warmup) / (total - warmup)))) / 2), t = steps taken."""

    peak: float
    """The learning rate at the end of warmup."""
    warmup: int
    """Steps of linear warmup."""
    total: int
    """The step at which the decay reaches `floor` x peak."""
    floor: float = 0.1
    """The final learning rate as a fraction of `peak`."""
    steps: int = 0
    """Optimizer steps taken under the schedule."""

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.total < 1 or not 0 <= self.floor <= 1:
            raise ValueError(f"warmup ({self.warmup}) must be >= 0, total ({self.total}) >= 1 and floor "
                             f"({self.floor}) in [0, 1]")

    def lr(self, t: int) -> float:
        if t < self.warmup:
            return self.peak * (t + 1) / self.warmup
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.peak * (self.floor + (1 - self.floor) * (1 + math.cos(math.pi * progress)) / 2)

    def apply(self, optimizer: Any) -> float:
        """Set the learning rate of the next step on every AdamW inside `optimizer`; count the step."""
        lr = self.lr(self.steps)
        for part in optimizer_parts(optimizer):
            for group in (part.opt.inner if isinstance(part, FlatState) else part).param_groups:
                group["lr"] = lr
        self.steps += 1
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "warmup_cosine", **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "warmup_cosine":
            raise ValueError(f"not a warmup_cosine schedule state: {state}")
        for key in ("peak", "warmup", "total", "floor", "steps"):
            setattr(self, key, state[key])
