"""transforms/precision.py: which layouts run bf16, the policy per ZeRO stage and grad_reduce, the refusals
(before any collective), and that casting a parameter in place really changes its (local) data."""

import pytest
import torch
from torch import nn

from autoshard.cost_models.layout import Layout
from autoshard.transforms.precision import cast_parameters, check_precision, mixed_precision_policy


def test_bf16_runs_under_every_zero_stage_with_or_without_experts():
    for layout in (Layout(dp=2, zero=3), Layout(dp=1, cp=2, zero=2, tp=2), Layout(dp=2, zero=1),
                   Layout(dp=2, zero=0), Layout(dp=1, zero=0), Layout(dp=1, zero=3), Layout(ep=2, dp=2, zero=3),
                   Layout(ep=2, dp=2, zero=1), Layout(ep=2, dp=2, zero=0)):
        check_precision("bf16", layout)
    check_precision("fp32", Layout(zero=0))
    with pytest.raises(ValueError, match="fp8 training"):
        check_precision("fp8", Layout(dp=2, zero=3))
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp16", Layout(dp=2, zero=3))
    with pytest.raises(ValueError, match="grad_reduce must be fp32 or bf16"):
        check_precision("bf16", Layout(dp=2, zero=3), "fp16")


def test_policy_reduces_as_the_cost_model_prices_unless_grad_reduce_says():
    """None: fp32 under FSDP2 (estimate.FSDP_REDUCE_BYTES = 4), bf16 under zero 0-1 (framework grad_bytes = 2)."""
    want = {(3, None): torch.float32, (2, None): torch.float32, (1, None): torch.bfloat16, (0, None): torch.bfloat16,
            (0, "fp32"): torch.float32, (3, "bf16"): torch.bfloat16}
    for (zero, grad_reduce), reduce in want.items():
        policy = mixed_precision_policy("bf16", zero=zero, grad_reduce=grad_reduce)
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, reduce), (zero, grad_reduce)
    assert mixed_precision_policy("fp32") is None


def test_cast_parameters_keeps_the_parameter_object_and_ties():
    a = nn.Linear(3, 4)
    b = nn.Linear(3, 4)
    b.weight = a.weight
    p = a.weight
    cast_parameters([a.weight, a.bias], torch.bfloat16)
    assert a.weight is p and b.weight is p and p.dtype == torch.bfloat16 and p.requires_grad
    assert isinstance(p, nn.Parameter) and a.bias.dtype == torch.bfloat16
