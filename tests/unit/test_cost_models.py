"""Cost formulas against hand computations and published figures (each test names its source)."""

from __future__ import annotations

import dataclasses

import pytest

from autoshard.cost_models import communication as comm
from autoshard.cost_models import memory, pipeline
from autoshard.cost_models.compute import gemm_efficiency, unit_compute
from autoshard.cost_models.estimate import estimate
from autoshard.cost_models.layout import Layout, Training, complete, parse_layout
from autoshard.cost_models.work import UnitWork
from autoshard.hardware_profiles import parse_profile
from autoshard.planner.capture.trace import capture

GB = 1e9


def _num(v: float) -> dict:
    return {"value": v, "source": "test"}


SPECS = dict(hbm_bytes=80e9, hbm_bw_bytes_per_s=3e12, bf16_flops_per_s=1000e12, fp8_flops_per_s=2000e12,
             fp32_flops_per_s=500e12, gpus_per_node=8, nvlink_domain_gpus=8, intra_node_bw_bytes_per_s=400e9,
             intra_node_latency_s=5e-6, inter_node_bw_bytes_per_s=50e9, inter_node_latency_s=10e-6)
FITTED = dict(gemm_efficiency_max=0.8, gemm_half_flops=1e9, attention_efficiency=0.5,
              collective_efficiency_intra=1.0, collective_efficiency_inter=1.0, overlap_slowdown=1.2,
              elementwise_traffic_factor=4.0)
PROFILE = parse_profile({"name": "test", "description": "", "gpu": "X", "family": "h100",
                         "specs": {k: _num(v) for k, v in SPECS.items()},
                         "fitted": {"fitted_on": "test", **{k: _num(v) for k, v in FITTED.items()}}})


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize(("zero", "published_gb"), [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_model_states_match_zero_paper_figure_1(zero, published_gb):
    """ZeRO (arXiv:1910.02054) Fig. 1: 7.5B parameters, N_d = 64, K = 12, fp16 weights and gradients."""
    w, g, o = memory.model_states(7.5e9, zero=zero, shards=64, grad_bytes=2)
    assert (w + g + o) / GB == pytest.approx(published_gb, rel=0.01)


def _block(h: float, act_per_h: float = 34, core_per_h: float = 0.0) -> UnitWork:
    return UnitWork(name="b", kind="block", gemm_flops=0, gemm_calls=1, attn_flops=0, act_bytes=act_per_h * h,
                    core_bytes=core_per_h * h, input_bytes=2 * h, dense_params=0, expert_params=0)


def test_activations_follow_korthikanti_table_2():
    """Korthikanti et al. (arXiv:2205.05198) Table 2, per layer, 16-bit, ignoring the 5as/h attention term:
    no parallelism 34 sbh; TP without SP sbh(10 + 24/t); TP + SP 34 sbh/t; full recompute 2 sbh (/t with SP)."""
    s, b, h, t = 2048, 1, 4096, 8
    tokens, sbh = s * b, s * b * h
    w = _block(h)
    assert memory.block_activations(w, tokens=tokens, tp=1, cp=1, sp=False, recompute="none") == 34 * sbh
    assert memory.block_activations(w, tokens=tokens, tp=t, cp=1, sp=False, recompute="none") == sbh * (10 + 24 / t)
    assert memory.block_activations(w, tokens=tokens, tp=t, cp=1, sp=True, recompute="none") == 34 * sbh / t
    assert memory.block_activations(w, tokens=tokens, tp=t, cp=1, sp=True, recompute="full") == 2 * sbh / t
    assert memory.block_activations(w, tokens=tokens, tp=1, cp=2, sp=False, recompute="none") == 34 * sbh / 2


def test_dtensor_sequence_parallel_keeps_the_gathered_inputs_whole():
    """Under SP, DTensor's styles (autoshard's transforms/tp.py, torchtitan) gather the attention's and the
    MLP's input once and their column linears save it whole: 34 sbh/t + 2 x 2 sbh (1 - 1/t). Megatron's
    linears save the shard and gather it again in backward (Korthikanti's 34 sbh/t). Full recompute keeps
    the block input alone either way; the working block it rebuilds holds the gathered inputs."""
    s, h, t = 2048, 4096, 8
    sbh = s * h
    w = dataclasses.replace(_block(h), gathered_bytes=2 * 2 * h)
    kw = {"tokens": s, "tp": t, "cp": 1, "sp": True}
    assert memory.block_activations(w, recompute="none", gathered=True, **kw) == 34 * sbh / t + 4 * sbh * (1 - 1 / t)
    assert memory.block_activations(w, recompute="none", **kw) == 34 * sbh / t
    assert memory.block_activations(w, recompute="full", gathered=True, **kw) == 2 * sbh / t
    assert memory.working_activations(w, gathered=True, **kw) == 34 * sbh / t + 4 * sbh * (1 - 1 / t)
    assert memory.block_activations(w, recompute="none", gathered=True, **(kw | {"sp": False})) == sbh * (10 + 24 / t)


def test_loss_bytes_per_logit_by_framework():
    """benchmarks/loss_memory.py measures 12.0 B per logit for torch's cross-entropy on upcast logits and
    16.1 under loss_parallel; Megatron's vocab-parallel cross-entropy works in place on an fp32 copy (6)."""
    from autoshard.cost_models.framework import get_framework

    for name in ("torch", "torchtitan"):
        fw = get_framework(name)
        assert (fw.logit_bytes_at(1), fw.logit_bytes_at(8)) == (memory.LOGIT_BYTES, memory.VOCAB_PARALLEL_LOGIT_BYTES)
        assert fw.sp_saves_gathered
    megatron = get_framework("megatron")
    assert (megatron.logit_bytes_at(1), megatron.logit_bytes_at(8), megatron.sp_saves_gathered) == (6, 6, False)


def test_cross_entropy_on_upcast_logits_peaks_at_logit_bytes():
    """Live tensors counted by storage through one forward and backward of the loss as the training step
    runs it (transforms/apply.py: the head's 16-bit output upcast, dropped before backward)."""
    import torch
    import torch.nn.functional as F
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                    st = t.untyped_storage()
                    self.refs.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
            self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
            return out

    tokens, vocab = 512, 1000
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    with Live() as live:
        out = logits * 1.0
        loss = F.cross_entropy(out.float(), torch.randint(0, vocab, (tokens,)))
        del out
        loss.backward()
    assert live.peak / (tokens * vocab) == pytest.approx(memory.LOGIT_BYTES, rel=0.01)


def test_selective_recompute_drops_the_attention_core():
    w = _block(1024, act_per_h=40, core_per_h=6)
    full = memory.block_activations(w, tokens=10, tp=1, cp=1, sp=False, recompute="none")
    sel = memory.block_activations(w, tokens=10, tp=1, cp=1, sp=False, recompute="selective")
    assert full - sel == 6 * 1024 * 10


# ------------------------------------------------------------------ pipeline


def test_bubble_fractions_from_megatron_paper():
    """Narayanan et al. SC'21 Sec. 2.2: (p-1)/m for 1F1B and GPipe, (p-1)/(v m) interleaved."""
    assert pipeline.bubble_fraction(8, 32) == 7 / 32
    assert pipeline.bubble_fraction(8, 32, v=4) == 7 / 128
    # equal stages of time T: m T + (p-1) T / v, so the bubble over the ideal time is the same fraction
    p, m, v, T = 8, 32, 4, 0.5
    assert pipeline.step_time([T] * p, m, v) == pytest.approx(m * T * (1 + pipeline.bubble_fraction(p, m, v)))


def test_micro_batches_in_flight():
    """1F1B: p - i on stage i; GPipe: all m; interleaved first stage: p (1 + (p-1)/(p v)) (Korthikanti 4.2.3)."""
    assert [pipeline.in_flight(i, 4, 16, 1, "1f1b") for i in range(4)] == [4, 3, 2, 1]
    assert pipeline.in_flight(0, 4, 2, 1, "1f1b") == 2  # never more than m
    assert pipeline.in_flight(2, 4, 16, 1, "gpipe") == 16
    assert pipeline.in_flight(0, 4, 16, 2, "interleaved_1f1b") == 4 * (1 + 3 / 8)  # Korthikanti Sec. 4.2.3
    # later stages: Megatron's warm-up, 2 (p - i - 1) + (v - 1) p chunk forwards plus one, over v
    assert pipeline.in_flight(3, 4, 16, 2, "interleaved_1f1b") == (0 + 4 + 1) / 2


def test_split_blocks_is_even_with_extra_on_later_chunks():
    assert pipeline.split_blocks(10, 4) == [2, 2, 3, 3]
    assert sum(pipeline.split_blocks(126, 16)) == 126


# ------------------------------------------------------------------ communication


def test_ring_all_reduce_inside_a_node():
    """nccl-tests PERFORMANCE.md: all-reduce moves 2(n-1)/n S over the bus bandwidth."""
    g = comm.Group(size=8, stride=1)
    nbytes = 1e9
    expected = 2 * (7 / 8 * nbytes / 400e9 + 7 * 5e-6)
    assert comm.all_reduce(nbytes, g, PROFILE) == pytest.approx(expected)
    assert comm.all_gather(nbytes, g, PROFILE) == pytest.approx(expected / 2)


def test_groups_spanning_nodes_are_bound_by_the_nics():
    layout = Layout(tp=8, dp=16)
    groups = comm.layout_groups(layout)
    assert comm.link(groups["tp"], PROFILE) == (400e9, 5e-6)
    assert comm.link(groups["dp"], PROFILE) == (50e9, 10e-6)  # one DP rank per node: one NIC
    wide = comm.layout_groups(Layout(tp=1, dp=128))["dp"]
    assert comm.link(wide, PROFILE)[0] == 400e9  # 8 ranks per node: min(NVLink, 8 x 50 GB/s)
    half = comm.layout_groups(Layout(tp=2, dp=64))["dp"]
    assert comm.link(half, PROFILE)[0] == 200e9


def test_rank_order_tp_innermost():
    groups = comm.layout_groups(Layout(tp=4, cp=2, dp=8, pp=2, ep=4))
    assert groups["cp"] == comm.Group(size=2, stride=4)
    assert groups["dp"] == comm.Group(size=8, stride=8)
    assert groups["pp"] == comm.Group(size=2, stride=64)
    assert groups["edp"].size * groups["ep"].size == 16


# ------------------------------------------------------------------ compute


def test_gemm_efficiency_saturates():
    assert gemm_efficiency(1e9, PROFILE) == pytest.approx(0.4)
    assert gemm_efficiency(1e15, PROFILE) == pytest.approx(0.8, rel=1e-5)


def test_fp8_speeds_up_only_gemms():
    w = UnitWork(name="b", kind="block", gemm_flops=1e9, gemm_calls=4, attn_flops=1e8, act_bytes=1e4,
                 core_bytes=0, input_bytes=100, dense_params=0, expert_params=0)
    kw = dict(tokens=4096, tp=1, cp=1, recompute="none", profile=PROFILE)
    bf16 = unit_compute(w, precision="bf16", **kw)
    fp8 = unit_compute(w, precision="fp8", **kw)
    assert bf16.attn_fwd_s == fp8.attn_fwd_s
    gemm_bf16 = 1e9 * 4096 / (1000e12 * gemm_efficiency(1e9 * 4096 / 4, PROFILE))
    assert bf16.fwd_s - fp8.fwd_s == pytest.approx(gemm_bf16 / 2)


def test_attention_runs_at_a_fraction_of_the_gemm_efficiency():
    """Fused attention time by hand: FLOPs / (bf16 peak x gemm_efficiency_max x attention_efficiency x
    f / (f + f_half)); a GPU whose GEMMs run slower (a power cap: gemm_efficiency_max halved) runs its
    attention slower by as much."""
    w = UnitWork(name="b", kind="block", gemm_flops=0, gemm_calls=1, attn_flops=1e8, act_bytes=0,
                 core_bytes=0, input_bytes=100, dense_params=0, expert_params=0)
    kw = dict(tokens=4096, tp=1, cp=1, precision="bf16", recompute="none")
    flops = 1e8 * 4096
    t = unit_compute(w, profile=PROFILE, **kw)
    assert t.attn_fwd_s == pytest.approx(flops / (1000e12 * 0.8 * 0.5 * flops / (flops + 1e9)))
    capped = PROFILE.replace(gemm_efficiency_max=0.4)
    assert unit_compute(w, profile=capped, **kw).attn_fwd_s == pytest.approx(2 * t.attn_fwd_s)


def test_flash2_frameworks_run_attention_at_the_profiles_ratio():
    """Frameworks on torch SDPA (FlashAttention-2 first in its default backend priority) or flash-attn 2
    run attention at Profile.flash2_attention_ratio of the GPU's best kernel: 0.57 on H100 (FlashAttention-3
    paper: 1.5-2.0x over FA2), 1 on A100; Megatron-Core with Transformer Engine runs the best."""
    from autoshard.cost_models.framework import attention_ratio, get_framework
    from autoshard.hardware_profiles import load_profile

    h100, a100 = load_profile("h100_ib"), load_profile("a100_ib")
    assert h100.flash2_attention_ratio == pytest.approx(1 / 1.75, abs=0.01) and a100.flash2_attention_ratio == 1
    assert attention_ratio(get_framework("megatron"), h100) == 1.0
    for fw in ("torch", "torchtitan", "nanotron", "deepspeed"):
        assert attention_ratio(get_framework(fw), h100) == h100.flash2_attention_ratio
        assert attention_ratio(get_framework(fw), a100) == 1.0
    w = UnitWork(name="b", kind="block", gemm_flops=0, gemm_calls=1, attn_flops=1e8, act_bytes=0,
                 core_bytes=0, input_bytes=100, dense_params=0, expert_params=0)
    kw = dict(tokens=4096, tp=1, cp=1, precision="bf16", recompute="none", profile=PROFILE)
    assert unit_compute(w, attention_ratio=0.5, **kw).attn_fwd_s == pytest.approx(2 * unit_compute(w, **kw).attn_fwd_s)


def test_recompute_adds_forward_work():
    w = _block(1024)
    w = UnitWork(**{**{f: getattr(w, f) for f in w.__slots__}, "gemm_flops": 1e8, "attn_flops": 1e7})
    kw = dict(tokens=1024, tp=1, cp=1, precision="bf16", profile=PROFILE)
    none, sel, full = (unit_compute(w, recompute=r, **kw) for r in ("none", "selective", "full"))
    assert full.recompute_s == pytest.approx(none.fwd_s)
    assert sel.recompute_s == pytest.approx(none.attn_fwd_s)
    assert full.bwd_s - none.bwd_s == pytest.approx(none.fwd_s)


# ------------------------------------------------------------------ layout strings


def test_layout_string_round_trip():
    text = "tp=8,pp=16,vpp=2,cp=1,ep=1,dp=64,zero=1,mbs=1,recompute=selective"
    layout = complete(parse_layout(text), 8192)
    assert layout.schedule == "interleaved_1f1b"
    assert complete(parse_layout(layout.to_string()), 8192) == layout


@pytest.mark.parametrize(("text", "needle"), [
    ("tp=8,foo=1", "foo"), ("tp=x", "integer"), ("recompute=some", "recompute"), ("tp=8,pp=3", "divide"),
    ("tp=8,pp=2,dp=2", "!="),
    ("zero=4", "zero"), ("vpp=2,schedule=1f1b", "vpp"), ("ep=3,dp=8", "ep"),
])
def test_bad_layouts_name_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle):
        complete(parse_layout(text), 64)


# ------------------------------------------------------------------ estimate on a captured model


@pytest.fixture(scope="module")
def tiny(request):
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "examples" / "specs" / "tiny_llama.yaml"
    return capture(spec, 1, 32)


def test_estimate_is_consistent(tiny):
    train = Training(global_batch=32, seq_len=32)
    base = estimate(tiny, Layout(dp=8), train, PROFILE)
    assert base.step_time_s > 0 and 0 < base.mfu < 1 and base.hfu == base.mfu
    assert base.tokens_per_sec_per_gpu == pytest.approx(32 * 32 / base.step_time_s / 8)
    full = estimate(tiny, Layout(dp=8, recompute="full"), train, PROFILE)
    assert full.step_time_s > base.step_time_s and full.hfu > full.mfu
    assert full.memory_breakdown["activations"] < base.memory_breakdown["activations"]
    z3 = estimate(tiny, Layout(dp=8, zero=3), train, PROFILE)
    assert z3.memory_breakdown.get("weights", 0) < base.memory_breakdown["weights"]


def test_pipeline_bubble_in_estimate(tiny):
    train = Training(global_batch=8, seq_len=32)
    est = estimate(tiny, Layout(pp=4, dp=2), train, PROFILE)
    assert est.micro_batches == 4
    assert est.time_breakdown["bubble"] > 0


@pytest.mark.parametrize(("layout", "needle"), [
    (Layout(tp=8, dp=1), "heads"),
    (Layout(pp=8), "blocks"),
    (Layout(dp=3), "multiple of dp"),
    (Layout(ep=2, dp=2), "experts"),
])
def test_estimate_rejects_impossible_layouts(tiny, layout, needle):
    with pytest.raises(ValueError, match=needle):
        estimate(tiny, layout, Training(global_batch=32, seq_len=32), PROFILE)


def test_ring_latency_counts_network_steps_by_node():
    """NCCL's ring model (src/graph/tuning.cc): of the n-1 steps, nNodes-1 cross the network, the rest NVLink.
    128 ranks, 8 per node (16 nodes): 112 NVLink steps x 5 us + 15 network steps x 10 us."""
    g = comm.layout_groups(Layout(tp=1, dp=128))["dp"]
    nbytes = 1e9
    expected = 127 / 128 * nbytes / 400e9 + 112 * 5e-6 + 15 * 10e-6
    assert comm.all_gather(nbytes, g, PROFILE) == pytest.approx(expected)
    assert comm.domains(g, PROFILE) == 16


def test_all_reduce_across_many_nodes_takes_nccls_tree_when_faster():
    """NCCL's tuner (src/graph/tuning.cc) picks ring or tree per call. 1,024 ranks, one per node (tp=8 x
    dp=1024): a 25 MB bucket on the ring pays 2 x 1,023 network steps of 10 us (20.5 ms of latency) and
    moves 2 x 1023/1024 x 25 MB at 50 GB/s (1.0 ms); the tree pays 2 x log2(1024) x 10 us = 0.2 ms and
    moves 2 x 25 MB at 0.92 x 50 GB/s (1.09 ms). Inside one node there is no tree: the ring."""
    g = comm.layout_groups(Layout(tp=8, dp=1024))["dp"]
    nbytes = 25e6
    ring = 2 * (1023 / 1024 * nbytes / 50e9 + 1023 * 10e-6)
    tree = 2 * nbytes / (0.92 * 50e9) + 2 * 10 * 10e-6
    assert tree < ring
    assert comm.all_reduce(nbytes, g, PROFILE) == pytest.approx(tree)
    # a huge buffer: the ring's 2 (n-1)/n S beats the tree's 2 S / 0.92
    big = 1e12
    assert comm.all_reduce(big, g, PROFILE) == pytest.approx(2 * (1023 / 1024 * big / 50e9 + 1023 * 10e-6))
    one_node = comm.Group(size=8, stride=1)
    assert comm.all_reduce(nbytes, one_node, PROFILE) == pytest.approx(2 * (7 / 8 * nbytes / 400e9 + 7 * 5e-6))


def test_framework_lookup_names_the_valid_ones():
    from autoshard.cost_models.framework import get_framework

    assert get_framework("Megatron-LM").name == "megatron"
    with pytest.raises(ValueError, match="torch, torchtitan, megatron, deepspeed, nanotron"):
        get_framework("jax")


def test_cp_time_follows_how_the_framework_runs_it():
    """The same cp=4 layout: TE's overlapped ring hides its exchange behind attention; all-gather CP exposes a
    gather and a reduce-scatter; autoshard's masked all-gather kernel (cp_attention=allgather) also computes
    the non-causal half."""
    graph = capture("examples/specs/llama3_8b.yaml", 1, 32768)
    layout = Layout(cp=4, dp=1, zero=3)  # a stage all three run
    train = {fw: Training(global_batch=4, seq_len=32768, framework=fw) for fw in ("megatron", "torchtitan")}
    train["torch"] = Training(global_batch=4, seq_len=32768, framework="torch", cp_attention="allgather")
    est = {fw: estimate(graph, layout, t, PROFILE) for fw, t in train.items()}
    cp = {fw: e.time_breakdown["cp_exposed"] for fw, e in est.items()}
    assert cp["torchtitan"] > cp["megatron"]
    assert cp["torch"] == pytest.approx(cp["torchtitan"])
    assert est["torch"].time_breakdown["compute"] > est["torchtitan"].time_breakdown["compute"]
    # all-gather CP keeps the gathered keys/values: more activation memory than the ring
    assert est["torch"].memory_breakdown["activations"] > est["megatron"].memory_breakdown["activations"]


def test_cp_time_follows_cp_attention():
    """apply_plan runs ring CP by default (transforms/cp.py): priced as Megatron's overlapped ring, with no
    gathered keys/values kept; cp_attention=allgather prices its all-gather (exposed gather and
    reduce-scatter, the masked kernel's doubled attention, the gathered keys/values kept)."""
    graph = capture("examples/specs/llama3_8b.yaml", 1, 32768)
    layout = Layout(cp=4, dp=1, zero=3)
    est = {a: estimate(graph, layout, Training(global_batch=4, seq_len=32768, cp_attention=a), PROFILE)
           for a in (None, "ring", "allgather")}
    megatron = estimate(graph, layout, Training(global_batch=4, seq_len=32768, framework="megatron"), PROFILE)
    time = {a: e.time_breakdown for a, e in est.items()}
    assert time[None] == time["ring"]  # ring is the torch default
    assert time["ring"]["cp_exposed"] == pytest.approx(megatron.time_breakdown["cp_exposed"])
    assert time["allgather"]["cp_exposed"] > time["ring"]["cp_exposed"]
    assert time["allgather"]["compute"] > time["ring"]["compute"]
    mem = {a: e.memory_breakdown["activations"] for a, e in est.items()}
    assert mem["allgather"] > mem["ring"]
    with pytest.raises(ValueError, match="cp_attention must be ring or allgather"):
        Training(global_batch=4, seq_len=32768, cp_attention="ulysses")


def test_zero3_gathers_per_linear_pay_more_latency():
    """DeepSpeed ZeRO-3 gathers each linear's parameters (one ring latency each); FSDP2 one per block."""
    graph = capture("examples/specs/tiny_llama.yaml", 1, 64)
    layout = Layout(dp=256, zero=3)
    per = {fw: estimate(graph, layout, Training(global_batch=256, seq_len=64, framework=fw), PROFILE)
           for fw in ("torch", "deepspeed")}
    assert per["deepspeed"].time_breakdown["zero3_exposed"] > per["torch"].time_breakdown["zero3_exposed"]


def test_deepspeed_zero3_traffic_by_hand():
    """DeepSpeed stage 3, per linear of a block: forward gather, backward gather, a third gather when the
    block's forward is recomputed (its fetch hooks fire again), and a 16-bit gradient reduce-scatter; FSDP2
    reduces in fp32 and gathers a recomputed block once for recompute and backward. DeepSpeed of 2021 hides
    none of it (deepspeed_2021: zero3_overlap 0) and gathered each parameter tensor on its own."""
    from autoshard.cost_models import estimate as est_module
    from autoshard.cost_models.framework import get_framework
    from autoshard.cost_models.work import model_work
    from autoshard.planner.capture.loading import load_model
    from autoshard.planner.capture.reference_model import build_reference_model

    graph = capture("examples/specs/tiny_llama.yaml", 1, 64)
    layout = Layout(dp=256, zero=3)
    block = next(w for w in model_work(graph) if w.kind == "block")
    groups = comm.layout_groups(layout)
    ds, torch_fw = get_framework("deepspeed"), get_framework("torch")
    n, params = block.gemm_calls, block.dense_params
    gather = comm.all_gather(params / n * memory.WEIGHT_BYTES, groups["dp_cp"], PROFILE)
    reduce16 = comm.reduce_scatter(params / n * 2, groups["dp_cp"], PROFILE)
    assert est_module._zero3_unit(block, layout, PROFILE, groups, ds) == pytest.approx(n * (2 * gather + reduce16))
    assert est_module._zero3_unit(block, layout, PROFILE, groups, ds, regather=True) == \
        pytest.approx(n * (3 * gather + reduce16))
    whole = comm.all_gather(params * memory.WEIGHT_BYTES, groups["dp_cp"], PROFILE)
    reduce32 = comm.reduce_scatter(params * 4, groups["dp_cp"], PROFILE)
    assert est_module._zero3_unit(block, layout, PROFILE, groups, torch_fw) == pytest.approx(2 * whole + reduce32)
    ds2021 = get_framework("deepspeed_2021")  # one all-gather per parameter tensor: weights, biases, norm scales
    block_module = build_reference_model(load_model("examples/specs/tiny_llama.yaml").spec).layers[0]
    assert block.param_tensors == len(list(block_module.parameters())) > n
    k = block.param_tensors
    assert est_module._zero3_unit(block, layout, PROFILE, groups, ds2021) == pytest.approx(
        k * 2 * comm.all_gather(params / k * memory.WEIGHT_BYTES, groups["dp_cp"], PROFILE)
        + k * comm.reduce_scatter(params / k * 2, groups["dp_cp"], PROFILE))
    training = {fw: Training(global_batch=256, seq_len=64, framework=fw) for fw in ("deepspeed", "deepspeed_2021")}
    full = dataclasses.replace(layout, recompute="full")
    t = {fw: estimate(graph, full, tr, PROFILE).time_breakdown["zero3_exposed"] for fw, tr in training.items()}
    assert t["deepspeed_2021"] > t["deepspeed"]  # nothing hidden under the compute


def test_gradient_buckets_by_framework():
    """Megatron-Core's default bucket is max(40M, 1M x dp) parameters (distributed_data_parallel.py), in the
    gradient dtype: 160 MB of fp32 up to dp 40, 192 MB at dp 48; torch DDP's bucket_cap_mb is bytes."""
    from autoshard.cost_models.framework import get_framework

    megatron = get_framework("megatron")
    assert megatron.bucket_bytes(8, 4.0) == 40e6 * 4
    assert megatron.bucket_bytes(48, 4.0) == 48e6 * 4
    assert megatron.bucket_bytes(48, 2.0) == 48e6 * 2
    assert get_framework("torch").bucket_bytes(48, 2.0) == 25e6


def test_overlapped_dp_collective_by_hand():
    """A data-parallel collective under the compute, chunk by chunk (estimate._overlapped).

    One chunk: 1.0 s of reduce-scatter under a 0.3 s backward leaves 0.7 s. Interleaved, pp 4, 3 chunks,
    0.3 s backward per micro-batch: a chunk-step is 0.1 s and chunks finish their last backward 0.4 s apart,
    so the shares (1/3 s each) queue to end at max(1.0, 2 x 0.4 + 1/3) = 1.133 s after the first chunk
    starts, and the compute ends at 2 x 0.4 + 0.1 = 0.9 s: 0.233 s exposed."""
    from autoshard.cost_models.estimate import _overlapped

    assert _overlapped(1.0, 0.3, chunks=1, pp=4, slow=0.0) == pytest.approx(0.7)
    assert _overlapped(1.0, 0.3, chunks=3, pp=4, slow=0.0) == pytest.approx(2 * 0.4 + 1 / 3 - 0.9)
    assert _overlapped(0.05, 0.3, chunks=1, pp=4, slow=0.1) == pytest.approx(0.1 * 0.05)  # hidden, slowing it
    assert _overlapped(3.0, 0.3, chunks=3, pp=4, slow=0.0) == pytest.approx(3.0 - 0.9)  # bandwidth-bound


def test_megatron_2023_reduces_gradients_after_the_schedule():
    """Megatron-LM before August 2023 reduced gradients after forward_backward_func and gathered the
    parameters after the step (train_step at 285068c8, MegaScale's baseline): nothing hidden, so its DP
    term is the whole reduce-scatter + all-gather; Megatron-Core hides part of it."""
    graph = capture("examples/specs/tiny_llama.yaml", 1, 64)
    layout = Layout(tp=2, pp=2, dp=16, zero=1, schedule="1f1b")
    dp = {fw: estimate(graph, layout, Training(global_batch=256, seq_len=64, framework=fw),
                       PROFILE).time_breakdown["dp_exposed"] for fw in ("megatron", "megatron_2023", "megascale")}
    assert dp["megatron_2023"] > dp["megascale"] > 0
    assert dp["megatron_2023"] > dp["megatron"]


def test_pipeline_scatter_gather_by_hand():
    """Megatron-LM 2021-23 without sequence parallelism sends 1/tp of a boundary per TP rank and all-gathers
    it over NVLink (SC'21 Sec. 4.1); Megatron-Core and torch send it whole; with SP every framework sends
    1/tp."""
    from autoshard.cost_models import estimate as est_module
    from autoshard.cost_models.framework import get_framework

    layout = Layout(tp=8, pp=4, dp=2, sequence_parallel=False)
    groups = comm.layout_groups(layout)
    boundary = 2048 * 12288 * 2.0  # one sequence of GPT-3 175B, bf16
    send = est_module._pp_send
    assert send(boundary, layout, PROFILE, groups, get_framework("megatron_2023")) == pytest.approx(
        comm.p2p(boundary / 8, groups["pp"], PROFILE) + comm.all_gather(boundary, groups["tp"], PROFILE))
    assert send(boundary, layout, PROFILE, groups, get_framework("megatron")) == \
        pytest.approx(comm.p2p(boundary, groups["pp"], PROFILE))
    sp = dataclasses.replace(layout, sequence_parallel=True)
    for fw in ("megatron_2023", "torch"):
        assert send(boundary, sp, PROFILE, groups, get_framework(fw)) == \
            pytest.approx(comm.p2p(boundary / 8, groups["pp"], PROFILE))


def test_megatron_keeps_fp32_gradients_6_plus_12_over_d_bytes():
    """Megatron with bf16 accumulates and reduces gradients in fp32 (Megatron-LM arguments.py forces
    accumulate_allreduce_grads_in_fp32; NeMo/Megatron-Bridge bf16_mixed set grad_reduce_in_fp32): with the
    distributed optimizer a parameter costs 6 + 12/d bytes (Megatron-LM docs, distrib_optimizer.md), against
    4 + 12/d for 16-bit buffers (torch DDP). The gradient reduce-scatter moves 4 bytes per parameter too."""
    graph = capture("examples/specs/tiny_llama.yaml", 1, 64)
    layout = Layout(dp=8, zero=1)
    est = {fw: estimate(graph, layout, Training(global_batch=8, seq_len=64, framework=fw), PROFILE)
           for fw in ("torch", "megatron")}
    states = {fw: e.memory_breakdown for fw, e in est.items()}
    params = states["torch"]["weights"] / 2
    assert states["megatron"]["gradients"] == pytest.approx(4 * params)
    assert states["torch"]["gradients"] == pytest.approx(2 * params)
    per_param = sum(states["megatron"][k] for k in ("weights", "gradients", "optimizer")) / params
    assert per_param == pytest.approx(6 + 12 / 8)


def _tp_block_time(gemm_flops: float, *, recompute: str = "none", overlap: bool = False) -> tuple[float, float]:
    """(tp_comm of one block and micro-batch, one all-gather of its hidden activations) at tp=8 with SP."""
    from autoshard.cost_models.estimate import unit_time

    h, tokens = 4096, 4096
    w = UnitWork(name="b", kind="block", gemm_flops=gemm_flops, gemm_calls=4, attn_flops=0, act_bytes=34 * h,
                 core_bytes=0, input_bytes=2 * h, dense_params=0, expert_params=0)
    layout = Layout(tp=8, dp=1)
    groups = comm.layout_groups(layout)
    t = unit_time(w, layout=layout, training=Training(global_batch=1, seq_len=tokens), profile=PROFILE,
                  groups=groups, tokens=tokens, hidden=h, recompute=recompute, tp_overlap=overlap)
    return t["tp_comm"], comm.all_gather(tokens * h * 2, groups["tp"], PROFILE)


def test_tp_collectives_per_block_follow_korthikanti_and_recompute():
    """SP: 4 collectives forward, 6 backward (Korthikanti et al. Sec. 4.2.2); full recompute redoes the 4."""
    t, one = _tp_block_time(0.0)
    assert t == pytest.approx(10 * one)
    t, one = _tp_block_time(0.0, recompute="full")
    assert t == pytest.approx(14 * one)


def test_megatron_hides_the_column_linears_backward_collectives_under_their_gemms():
    """With tp_bwd_overlap the input all-gathers for wgrad and the dgrad reduce-scatters (4 of 10) hide
    behind the backward GEMMs, paying only overlap_slowdown; with no GEMM time to hide under, none hide."""
    big = 1e13
    t, one = _tp_block_time(big, overlap=True)
    slow = FITTED["overlap_slowdown"] - 1
    assert t == pytest.approx(6 * one + slow * 4 * one)
    assert _tp_block_time(0.0, overlap=True)[0] == pytest.approx(10 * one)


def test_the_loss_passes_over_this_gpus_logits_at_hbm_bandwidth():
    """The head's cross-entropy: 22 + 22 HBM bytes per logit (fp32 upcast, log-softmax, their backward) over
    the tokens / cp x vocab / tp logits a GPU holds, by hand."""
    from autoshard.cost_models.compute import LOSS_BWD_BYTES, LOSS_FWD_BYTES

    head = UnitWork(name="output", kind="head", gemm_flops=0, gemm_calls=1, attn_flops=0, act_bytes=0,
                    core_bytes=0, input_bytes=0, dense_params=0, expert_params=0, logits=256_000)
    kw = {"tokens": 16384, "precision": "bf16", "recompute": "none", "profile": PROFILE}
    t = unit_compute(head, tp=2, cp=2, **kw)
    logits = 16384 / 2 * 256_000 / 2
    assert t.fwd_s == pytest.approx(LOSS_FWD_BYTES * logits / PROFILE.hbm_bw_bytes_per_s, rel=1e-12)
    assert t.bwd_s == pytest.approx(LOSS_BWD_BYTES * logits / PROFILE.hbm_bw_bytes_per_s, rel=1e-12)
    assert (LOSS_FWD_BYTES, LOSS_BWD_BYTES) == (2 + 4 + 4 + 4 + 4 + 4, 4 + 4 + 4 + 4 + 4 + 2)
    assert unit_compute(dataclasses.replace(head, logits=0), tp=2, cp=2, **kw).fwd_s == 0
