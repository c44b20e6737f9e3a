"""The reference MoE as production runs it (issue 16): capacity factor with token dropping, the aux loss
added through its gradient, grouped expert GEMMs, the spec keys, and the pricing of all three."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from autoshard.cost_models import communication as comm
from autoshard.cost_models.estimate import unit_time
from autoshard.cost_models.layout import Layout, Training
from autoshard.cost_models.work import ACT_BYTES, unit_work
from autoshard.hardware_profiles import load_profile
from autoshard.planner.capture import reference_model as rm
from autoshard.planner.capture.reference_model import MoE, build_reference_model, pop_aux_losses
from autoshard.planner.capture.spec import SpecError, load_spec, parse_spec
from autoshard.planner.capture.trace import capture

TINY_MOE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_moe.yaml"


def forced_moe(capacity_factor: float | None) -> tuple[MoE, Tensor]:
    """top-2 over 4 experts, every one of 12 tokens routed to experts 3 (first) and 1 (second)."""
    torch.manual_seed(0)
    moe = MoE(16, experts=4, top_k=2, expert_ffn_hidden=8, capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3], moe.router.weight[1] = 1.0, 0.5
    return moe, torch.rand(12, 16) + 0.1  # positive: logits order the experts 3 > 1 > 0 = 2


def by_hand(moe: MoE, x: Tensor, kept_tokens: int) -> Tensor:
    """Tokens 0 .. kept_tokens - 1 through experts 3 and 1 with renormalised gates; the others get zero."""
    probs = moe.router(x).float().softmax(-1)
    out = torch.zeros_like(x)
    for t in range(kept_tokens):
        gate = probs[t, [3, 1]] / probs[t, [3, 1]].sum()
        out[t] = gate[0] * moe.experts[3](x[t]) + gate[1] * moe.experts[1](x[t])
    return out


def test_capacity_keeps_each_experts_first_assignments_in_token_order():
    """C = ceil(cf x T x k / E) = ceil(0.5 x 12 x 2 / 4) = 3: experts 3 and 1 keep tokens 0-2, 18 dropped."""
    moe, x = forced_moe(0.5)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), by_hand(moe, x, kept_tokens=3))
    assert moe.dropped == 2 * (12 - 3)
    dropless, _ = forced_moe(None)
    with torch.no_grad():
        torch.testing.assert_close(dropless(x), by_hand(dropless, x, kept_tokens=12))
    assert dropless.dropped == 0


def test_a_capacity_above_the_busiest_expert_drops_nothing():
    moe, x = forced_moe(2.0)  # C = 12: experts 3 and 1 each get exactly 12
    with torch.no_grad():
        torch.testing.assert_close(moe(x), by_hand(moe, x, kept_tokens=12))
    assert moe.dropped == 0


def test_grouped_and_looped_experts_are_exact(monkeypatch):
    """Whichever path runs here (grouped GEMMs on CPU fp32 when torch has them) equals the expert loop."""
    torch.manual_seed(1)
    moe = MoE(32, experts=4, top_k=2, expert_ffn_hidden=48, capacity_factor=1.0)
    x = torch.randn(2, 16, 32)

    def run() -> tuple[Tensor, ...]:
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xi.grad, moe.router.weight.grad.clone(), moe.experts[2].w2.weight.grad.clone()

    assert rm.grouped_mm_ok(list(moe.experts), x) == hasattr(torch, "_grouped_mm")
    grouped = run()
    monkeypatch.setattr(rm, "grouped_mm_ok", lambda *_: False)
    looped = run()
    for a, b in zip(grouped, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_aux_loss_reaches_the_router_through_its_gradient():
    """d/dW of sum(y), with the aux loss attached (coef c, scale s), = d/dW of sum(y) + c s aux."""
    torch.manual_seed(2)
    moe = MoE(16, experts=4, top_k=2, expert_ffn_hidden=8, aux_loss_coef=0.1)
    moe.aux_loss_scale = 0.5
    x = torch.randn(10, 16)
    moe(x).sum().backward()
    attached = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.aux_loss_coef = 0.0
    y = moe(x)
    (y.sum() + 0.1 * 0.5 * moe.aux_loss).backward()
    torch.testing.assert_close(attached, moe.router.weight.grad)
    moe.aux_loss_coef = 0.1  # the training loop reports c x the values trained (logged by the first backward)
    logged = [v.item() for v in moe.aux_loss_log]
    assert len(logged) == 1 and pop_aux_losses(moe, 1).item() == pytest.approx(0.1 * logged[0])
    assert moe.aux_loss_log == [] and pop_aux_losses(moe, 1) is None


def test_spec_keys_and_their_errors():
    base = {"name": "m", "layers": 2, "hidden": 64, "heads": 4, "vocab": 256, "seq_len": 32,
            "moe": {"experts": 4, "top_k": 2, "expert_ffn_hidden": 64}}
    spec, _, warnings = parse_spec({"model": base})
    assert (spec.moe.capacity_factor, spec.moe.aux_loss_coef, warnings) == (None, 0.01, [])
    moe = {**base["moe"], "capacity_factor": 1.25, "aux_loss_coef": 0}
    spec, _, warnings = parse_spec({"model": {**base, "moe": moe}})
    assert (spec.moe.capacity_factor, spec.moe.aux_loss_coef, warnings) == (1.25, 0.0, [])
    model = build_reference_model(spec)
    assert (model.layers[0].moe.capacity_factor, model.layers[0].moe.aux_loss_coef) == (1.25, 0.0)
    with pytest.raises(SpecError, match="capacity_factor"):
        parse_spec({"model": {**base, "moe": {**base["moe"], "capacity_factor": 0}}})
    with pytest.raises(SpecError, match="aux_loss_coef"):
        parse_spec({"model": {**base, "moe": {**base["moe"], "aux_loss_coef": -1}}})


def test_capacity_is_priced_as_cf_times_the_balanced_load_and_the_router_once():
    """tiny_moe (hidden 64, 4 heads of 16, 2 kv heads, 4 experts of SwiGLU width 64, top-2, one shared
    expert) with cf = 1.25, by hand per token: experts 1.25 x 2 x top_k x 3 x 64 x 64; dense GEMMs
    2 x (64 x 64 + 2 x 64 x 32 + 64 x 64) attention + 2 x 64 x 4 router (once) + 2 x 3 x 64 x 64 shared;
    EP's four all-to-alls send tokens x hidden x 2 bytes x top_k x 1.25 each."""
    spec, _, _ = load_spec(TINY_MOE)
    spec = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, capacity_factor=1.25))
    with torch.device("meta"):
        graph = capture(build_reference_model(spec), 1, 32)
    unit = next(u for u in graph.units if u.moe is not None)
    work = unit_work(graph, unit)
    assert work.expert_flops == 1.25 * 2 * 2 * 3 * 64 * 64
    assert work.gemm_flops == pytest.approx(2 * (2 * 64 * 64 + 2 * 64 * 32) + 2 * 64 * 4 + 2 * 3 * 64 * 64)
    layout, profile = Layout(dp=2, ep=2), load_profile("h100_ib")
    groups = comm.layout_groups(layout)
    times = unit_time(work, layout=layout, training=Training(global_batch=8, seq_len=32), profile=profile,
                      groups=groups, tokens=32, hidden=64, recompute="none")
    sent = 32 * 64 * ACT_BYTES * 2 * 1.25
    assert times["ep_comm"] == pytest.approx(4 * comm.all_to_all(sent, groups["ep"], profile))
    dropless = dataclasses.replace(work, moe_load=1.0)
    assert unit_time(dropless, layout=layout, training=Training(global_batch=8, seq_len=32), profile=profile,
                     groups=groups, tokens=32, hidden=64, recompute="none")["ep_comm"] < times["ep_comm"]
    assert math.isclose(work.moe_load, 1.25)


def test_hugging_face_aux_loss_is_added_with_the_models_coefficient():
    """A transformers MoE with output_router_logits returns aux_loss; train_step adds router_aux_loss_coef x it,
    as the model's own loss with labels does (one process, no layout)."""
    transformers = pytest.importorskip("transformers")
    from autoshard.cost_models.layout import complete
    from autoshard.transforms.apply import apply_layout, next_token_loss

    config = transformers.AutoConfig.from_pretrained(Path(__file__).resolve().parents[1] / "data" / "hf" / "tiny_mixtral")
    config.output_router_logits = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    with torch.no_grad():
        out = model(tokens[:, :-1])
        want = next_token_loss(out.logits, tokens[:, 1:]) + config.router_aux_loss_coef * out.aux_loss
    parallel = apply_layout(model, complete({"zero": 0, "mbs": 2}, 1), graph=capture(model, 1, 32))
    assert parallel.train_step(tokens, update=False) == pytest.approx(want.item(), rel=1e-6)
