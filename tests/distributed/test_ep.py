"""Expert parallelism (transforms/ep.py) against the unsharded model, in real multi-process runs (torchrun,
gloo on CPU) through examples/train.py: losses of 5 AdamW steps within 1e-4 relative, whole gradients after
the first step within 1e-5 (fp32), expert gradients gathered from their owner ranks.

The models (tests/data/ep/): the reference MoE with a top-1 layer and two top-2 layers with a shared expert
(one run covers both routings), the same with a capacity factor of 0.75 (tokens dropped in every forward)
and the aux loss in every layer, the same top-1 MoE with routing skewed to one expert, and a Mixtral-style
MoE forward (gate + experts loop skipping empty experts) that the transform does not know (record/replay).
The reference MoE layers of tiny_moe.yaml add their load-balancing loss (aux_loss_coef 0.01) to the loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from spawn import spawn
from test_equivalence import ROOT, TINY_MOE, Runs

from autoshard.planner.capture.model_graph import MoEInfo
from autoshard.transforms.ep import _check

MODELS = ROOT / "tests" / "data" / "ep"
MIXED = MODELS / "mixed_topk_moe.py"
SKEWED = MODELS / "skewed_moe.py"
MIXTRAL_STYLE = MODELS / "mixtral_style_moe.py"
CAPACITY = MODELS / "capacity_moe.py"
ROUTER_WORKER = Path(__file__).with_name("ep_router_worker.py")


LAYOUTS = [
    ("ep=2,zero=0", 2),         # dp=2, the two experts halves swap tokens; DDP for the rest
    ("ep=4,zero=1", 4),         # one expert per rank per layer; ZeRO-1 over a single-rank expert group
    ("ep=2,zero=3", 4),         # ep=2 x dp=2: each expert half replicated twice, FSDP2 on both groups
    ("ep=2,tp=2,zero=1", 4),    # ep=2 x tp=2 (with SP): the MoE input gathered over tp, then dispatched
]
CASES = [(MIXED, layout, nproc, ()) for layout, nproc in LAYOUTS] + [
    (SKEWED, "ep=4,zero=2", 4, ("--micro-batch", "1")), (MIXTRAL_STYLE, "ep=2,recompute=full", 2, ()),
    (TINY_MOE, "ep=4,dp=4", 4, ("--steps", "20"))]
CAPACITY_LAYOUTS = [
    ("ep=2,zero=1,recompute=selective", 2),  # capacity cut on the sending rank; the same ops when recomputed
    ("ep=2,tp=2,zero=2", 4),       # the routing group is the tp-gathered micro-batch; FSDP2 experts (expert loop)
    ("pp=2,ep=2,zero=1,recompute=full", 4),  # aux loss gradients and values per pipeline stage
]
CASES += [(CAPACITY, layout, nproc, ()) for layout, nproc in CAPACITY_LAYOUTS]
CASES += [(MIXED, "ep=2,cp=2", 4, ())]  # aux loss counts all-reduced over the cp ranks of one micro-batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(CASES, tmp_path_factory.mktemp("ep_runs"))


@pytest.mark.parametrize(("layout", "nproc"), LAYOUTS)
def test_expert_parallel_matches_the_unsharded_model(layout, nproc, runs):
    runs.check(MIXED, layout, nproc)


@pytest.mark.parametrize(("layout", "nproc"), CAPACITY_LAYOUTS)
def test_capacity_factor_and_aux_loss_match_the_unsharded_model(layout, nproc, runs):
    """Assignments over an expert's capacity dropped the same way sharded and unsharded (some really are),
    the aux loss in the training loss and its gradients."""
    runs.check(CAPACITY, layout, nproc)
    assert runs.saved(CAPACITY, layout, nproc)["dropped"] > 0
    assert runs.saved(CAPACITY, "", nproc)["dropped"] > 0


def test_aux_loss_under_context_parallelism_matches(runs):
    """cp=2 splits each micro-batch's sequence: the expert counts are all-reduced over the cp pair."""
    runs.check(MIXED, "ep=2,cp=2", 4)


def test_router_runs_once_per_layer_and_forward():
    """Under EP the reference MoE's router runs once per forward (no record/replay); the fallback twice."""
    out = spawn([str(ROUTER_WORKER)], 2)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = json.loads(out.stdout.splitlines()[-1])
    assert calls == {"reference": 1, "record_replay": 2}, calls


def test_unbalanced_routing_matches(runs):
    """About 80 % of the tokens go to expert 0 (rank 0), other experts get none in some micro-batches."""
    runs.check(SKEWED, "ep=4,zero=2", 4, "--micro-batch", "1")  # 32 tokens a micro-batch: few for the rest


def test_a_moe_forward_written_elsewhere_with_recompute(runs):
    runs.check(MIXTRAL_STYLE, "ep=2,recompute=full", 2)


def test_training_with_experts_on_four_ranks_lowers_the_loss(runs):
    losses, _ = runs.result(TINY_MOE, "ep=4,dp=4", 4, "--steps", "20")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_layouts_expert_parallelism_cannot_run_are_refused_with_the_valid_choices():
    """The checks apply_ep makes before any collective (no processes needed)."""
    layer = MoEInfo(module="layers.1.moe", router="layers.1.moe.router", experts="layers.1.moe.experts",
                    num_experts=4, top_k=2, shared=[], expert_params=1)
    with pytest.raises(ValueError, match=re.escape("4 experts do not divide over ep = 3; choose ep among [1, 2]")):
        _check([layer], ep=3, replicas=6, zero=0)
    with pytest.raises(ValueError, match=re.escape("ep (4) must divide dp x cp (6); choose ep among [1, 2, 3, 6]")):
        _check([layer], ep=4, replicas=6, zero=0)
    with pytest.raises(ValueError, match="found no MoE layer"):
        _check([], ep=2, replicas=2, zero=0)
    _check([layer], ep=2, replicas=6, zero=3)
