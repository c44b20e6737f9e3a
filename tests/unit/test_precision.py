"""transforms/precision.py: which layouts run bf16, and the refusals (before any collective)."""

import pytest
import torch

from autoshard.cost_models.layout import Layout
from autoshard.transforms.precision import check_precision, mixed_precision_policy


def test_bf16_runs_under_fsdp2_and_is_refused_elsewhere_with_the_reason():
    check_precision("bf16", Layout(dp=2, zero=3))
    check_precision("bf16", Layout(dp=1, cp=2, zero=2, tp=2))
    check_precision("fp32", Layout(zero=0))
    for layout in (Layout(dp=2, zero=1), Layout(dp=1, zero=3)):
        with pytest.raises(ValueError, match="zero 2 or 3 with dp x cp > 1"):
            check_precision("bf16", layout)
    with pytest.raises(ValueError, match="fp8 training"):
        check_precision("fp8", Layout(dp=2, zero=3))
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp16", Layout(dp=2, zero=3))


def test_policy_is_bf16_compute_with_fp32_reduction():
    policy = mixed_precision_policy("bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("fp32") is None
