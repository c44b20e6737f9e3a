"""The reference top-1 MoE (examples/specs/tiny_moe_top1.yaml) with deliberately unbalanced routing: each
router adds a fixed bias toward expert 0 (a buffer, so the seeded init of the weights is unchanged), which
then gets most of the tokens, and the other experts few or none, on some ranks. For tests/distributed/test_ep.py."""

from pathlib import Path

import torch
from torch import Tensor, nn

from autoshard.planner.capture.reference_model import MoE, build_reference_model
from autoshard.planner.capture.spec import load_spec

SPEC = Path(__file__).resolve().parents[3] / "examples" / "specs" / "tiny_moe_top1.yaml"
SKEW = 0.4
"""Added to expert 0's router logit (the logits' spread at init is about 0.15)."""


class SkewedRouter(nn.Linear):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__(hidden, experts, bias=False)
        self.register_buffer("skew", torch.zeros(experts), persistent=False)
        with torch.no_grad():
            self.skew[0] = SKEW  # not a fill by index on meta: the buffer is real (transforms/init.py)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.skew


def build_model() -> nn.Module:
    spec, _, _ = load_spec(SPEC)
    model = build_reference_model(spec)
    for m in model.modules():
        if isinstance(m, MoE):
            m.router = SkewedRouter(spec.hidden, spec.moe.experts)
    return model
