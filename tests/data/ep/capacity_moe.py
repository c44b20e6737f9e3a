"""tests/data/ep/mixed_topk_moe.py's model (a top-1 MoE layer, then two top-2 layers with a shared expert)
with a capacity factor of 0.75 and the load-balancing loss (coefficient 0.01) in every MoE layer: each
expert keeps at most 6 of a micro-batch's 32 top-1 assignments, 12 of its 64 top-2 ones, so tokens are
dropped in every forward. For tests/distributed/test_ep.py."""

import dataclasses
from pathlib import Path

from torch import nn

from autoshard.planner.capture.reference_model import MoE, build_reference_model
from autoshard.planner.capture.spec import load_spec

SPEC = Path(__file__).resolve().parents[3] / "examples" / "specs" / "tiny_moe.yaml"
CAPACITY_FACTOR = 0.75
AUX_LOSS_COEF = 0.01


def build_model() -> nn.Module:
    spec, _, _ = load_spec(SPEC)
    moe = dataclasses.replace(spec.moe, capacity_factor=CAPACITY_FACTOR, aux_loss_coef=AUX_LOSS_COEF)
    spec = dataclasses.replace(spec, moe=moe)
    model = build_reference_model(spec)
    first = next(block for block in model.layers if block.moe_enabled)
    first.moe = MoE(spec.hidden, experts=moe.experts, top_k=1, expert_ffn_hidden=moe.expert_ffn_hidden,
                    capacity_factor=CAPACITY_FACTOR, aux_loss_coef=AUX_LOSS_COEF)
    return model
