"""autoshard.apply_plan runs a Plan and matches the unsharded model (5 AdamW steps, 1e-4 relative)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spawn import spawn
from test_equivalence import TINY_LLAMA, assert_close, reference

WORKER = Path(__file__).with_name("apply_plan_worker.py")


CASES = [("tp=2,pp=1,cp=1,ep=1", "real"), ("tp=2,pp=1,cp=1,ep=1", "meta"),
         ("tp=1,dp=2,zero=3,recompute=full,pp=1,cp=1,ep=1", "real")]


@pytest.fixture(scope="module")
def launch():
    """One 2-rank launch runs every case in turn."""
    return spawn([str(WORKER), *(arg for case in CASES for arg in case)], 2)


@pytest.mark.parametrize(("layout", "weights"), CASES)
def test_apply_plan_matches_the_unsharded_model(layout, weights, launch, tmp_path):
    assert launch.returncode == 0, launch.stderr[-2000:]
    rows = [json.loads(line) for line in launch.stdout.splitlines() if line.startswith("{")]
    losses = [r["loss"] for r in rows if (r["layout"], r["weights"]) == (layout, weights)]
    assert_close(losses, reference(TINY_LLAMA, tmp_path)[0])


def test_apply_plan_rejects_a_plan_for_another_world_size_or_model():
    import autoshard
    from autoshard.planner.capture.reference_model import build_reference_model
    from autoshard.planner.capture.spec import load_spec
    from autoshard.planner.errors import UserError

    plan = autoshard.plan(TINY_LLAMA, gpus=2, profile="h100_ib", global_batch=8, seq_len=32)
    with pytest.raises(UserError, match="2 GPUs but 1 processes"):
        autoshard.apply_plan(build_reference_model(load_spec(TINY_LLAMA)[0]), plan)
    single = autoshard.plan(TINY_LLAMA, gpus=1, profile="h100_ib", global_batch=8, seq_len=32)
    other = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_gpt.yaml"
    with pytest.raises(UserError, match="another model"):
        autoshard.apply_plan(build_reference_model(load_spec(other)[0]), single)


def test_parallelize_plans_and_applies_in_one_call(tmp_path):
    """One process: the plan is the single-GPU layout and training matches the unsharded reference."""

    import autoshard
    from autoshard.planner.capture.reference_model import build_reference_model
    from autoshard.planner.capture.spec import load_spec
    from autoshard.synthetic import synthetic_batch
    from autoshard.transforms.init import init_parameters

    model = build_reference_model(load_spec(TINY_LLAMA)[0])
    init_parameters(model, 7)
    parallel = autoshard.parallelize(model, profile="h100_ib",
                                     global_batch=8, seq_len=32, layout="recompute=none,mbs=8")
    losses = []
    for step in range(5):
        losses.append(parallel.train_step(synthetic_batch(seed=7, step=step, batch=8, seq_len=32, vocab=256)))
    assert_close(losses, reference(TINY_LLAMA, tmp_path)[0])
