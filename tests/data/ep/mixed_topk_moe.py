"""autoshard's reference MoE model (examples/specs/tiny_moe.yaml: 4 experts, top-2 routing, one shared
expert) with its first MoE layer switched to top-1 routing without a shared expert (Switch style), so one
run covers both routings. For tests/distributed/test_ep.py."""

from pathlib import Path

from torch import nn

from autoshard.planner.capture.reference_model import MoE, build_reference_model
from autoshard.planner.capture.spec import load_spec

SPEC = Path(__file__).resolve().parents[3] / "examples" / "specs" / "tiny_moe.yaml"


def build_model() -> nn.Module:
    spec, _, _ = load_spec(SPEC)
    model = build_reference_model(spec)
    first = next(block for block in model.layers if block.moe_enabled)
    first.moe = MoE(spec.hidden, experts=spec.moe.experts, top_k=1, expert_ffn_hidden=spec.moe.expert_ffn_hidden)
    return model
