"""Capture on meta: FLOPs and saved bytes against hand computations, the three trace paths, structure, cuts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from toy_models import (
    AttnStack,
    MLPStack,
    OpaqueOutputStack,
    ShapeBranchStack,
    SkipStack,
    ValueBranchStack,
)

from autoshard.planner.capture.trace import capture
from autoshard.planner.errors import CaptureError

BF16 = 2  # bytes


def comparable(graph) -> dict:
    """The ModelGraph minus what legitimately differs between trace methods."""
    d = graph.to_dict()
    for key in ("name", "capture_method", "capture_failures", "warnings"):
        d.pop(key)
    return d


def test_mlp_flops_by_hand():
    b, s, h, vocab = 2, 8, 16, 100
    g = capture(MLPStack(vocab, h, layers=3), micro_batch=b, seq_len=s)
    t = b * s
    block_fwd = 2 * t * h * (4 * h) * 2  # up and down projections: 2 FLOPs per multiply-add
    for block in g.blocks:
        assert block.fwd_flops == block_fwd
        assert block.bwd_flops == 2 * block_fwd  # grad of input and of weight
    assert g.unit("head").fwd_flops == 2 * t * h * vocab
    assert g.fwd_flops == 3 * block_fwd + 2 * t * h * vocab
    assert g.flops_per_token == pytest.approx((g.fwd_flops + g.bwd_flops) / t)


def test_mlp_saved_bytes_by_hand():
    b, s, h = 2, 8, 16
    g = capture(MLPStack(100, h, layers=3), micro_batch=b, seq_len=s)
    t = b * s
    # each block saves its input (for up's weight grad), up's output (for gelu) and gelu's output (for down)
    block = t * h * BF16 + t * 4 * h * BF16 + t * 4 * h * BF16
    assert [u.saved_bytes for u in g.blocks] == [block] * 3
    assert g.unit("emb").saved_bytes == t * 8  # the int64 token ids
    assert g.unit("head").saved_bytes == t * h * BF16
    assert g.saved_bytes == 3 * block + t * 8 + t * h * BF16


def test_explicit_attention_by_hand():
    b, s, h, vocab = 2, 16, 8, 64
    g = capture(AttnStack(vocab, h, layers=2), micro_batch=b, seq_len=s)
    t = b * s
    linears = 4 * 2 * t * h * h
    core = 2 * (2 * b * s * s * h)  # q k^T and probs v
    block = g.blocks[0]
    assert block.fwd_flops == linears + core
    attn = block.attention
    assert attn is not None and attn.core == "matmul_softmax" and attn.heads == 1
    assert attn.column == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"]
    assert attn.row == ["layers.0.attn.o"]
    assert attn.core_fwd_flops == core
    # saved: x (read by q, k, v: one storage), q, k, v, the probabilities, and o's input
    assert block.saved_bytes == 5 * t * h * BF16 + b * s * s * BF16


def test_reference_llama_flops_by_hand(specs):
    b, s = 1, 32
    g = capture(specs / "tiny_llama.yaml", micro_batch=b, seq_len=s)
    h, ffn, heads, kv, vocab = 64, 160, 4, 2, 256
    hd, t = h // heads, b * s
    qkvo = 2 * t * h * (2 * h + 2 * kv * hd)
    mlp = 2 * t * 3 * h * ffn
    sdpa = 4 * b * heads * s * s * hd  # flop_counter counts the full (non-causal) s x s
    assert [u.fwd_flops for u in g.blocks] == [qkvo + mlp + sdpa] * 4
    assert g.unit("output").fwd_flops == 2 * t * h * vocab
    a = g.blocks[0].attention
    assert (a.core, a.heads, a.kv_heads, a.head_dim) == ("sdpa", heads, kv, hd)
    assert a.column == [f"layers.0.attention.{w}" for w in ("wq", "wk", "wv")]
    assert a.row == ["layers.0.attention.wo"]
    mlp_info = g.blocks[0].mlp
    assert mlp_info.column == ["layers.0.feed_forward.w1", "layers.0.feed_forward.w3"]
    assert mlp_info.row == ["layers.0.feed_forward.w2"]
    assert g.blocks[0].norms == ["layers.0.attention_norm", "layers.0.ffn_norm"]
    assert [u.kind for u in g.units] == ["embedding"] + ["block"] * 4 + ["norm", "head"]


def test_head_dim_apart_from_the_width_by_hand(specs, tmp_path):
    """A spec's `head_dim` (Qwen3, Gemma, gpt-oss: heads x head_dim != hidden) sizes q, o and the attention
    core: tiny-llama with 4 heads of 32 on a width of 64."""
    import yaml

    data = yaml.safe_load((specs / "tiny_llama.yaml").read_text())
    data["model"]["head_dim"] = 32
    path = tmp_path / "wide_heads.yaml"
    path.write_text(yaml.safe_dump(data))
    b, s = 1, 32
    g = capture(path, micro_batch=b, seq_len=s)
    h, ffn, heads, kv, hd, t = 64, 160, 4, 2, 32, b * s
    qkvo = 2 * t * h * (2 * heads * hd + 2 * kv * hd)
    mlp = 2 * t * 3 * h * ffn
    sdpa = 4 * b * heads * s * s * hd
    assert [u.fwd_flops for u in g.blocks] == [qkvo + mlp + sdpa] * 4
    a = g.blocks[0].attention
    assert (a.heads, a.kv_heads, a.head_dim) == (heads, kv, hd)


def test_three_methods_give_the_same_graph():
    graphs = {m: capture(MLPStack(), 2, 8, methods=[m]) for m in ("fx", "export", "hooks")}
    assert {m: g.capture_method for m, g in graphs.items()} == {"fx": "fx", "export": "export", "hooks": "hooks"}
    assert comparable(graphs["fx"]) == comparable(graphs["export"]) == comparable(graphs["hooks"])


@pytest.mark.parametrize("spec", ["tiny_llama.yaml", "tiny_gpt.yaml", "tiny_moe.yaml"])
def test_three_methods_agree_on_the_reference_model(specs, spec):
    """Why a spec is captured by its hooks alone (trace.SPEC_METHODS): fx and export trace the same graph."""
    graphs = [capture(specs / spec, 1, 16, methods=[m], repeat=False) for m in ("fx", "export", "hooks")]
    assert comparable(graphs[0]) == comparable(graphs[1]) == comparable(graphs[2])
    assert graphs[0].gm is not None and graphs[2].gm is None
    assert capture(specs / spec, 1, 16).capture_method == "hooks"


def test_fx_failure_falls_back_to_export():
    g = capture(ShapeBranchStack(), 1, 8)
    assert g.capture_method == "export"
    assert "fx" in g.capture_failures and g.capture_failures["fx"]
    assert comparable(g) == comparable(capture(MLPStack(), 1, 8))


def test_fx_and_export_failures_fall_back_to_hooks():
    g = capture(OpaqueOutputStack(), 1, 8)
    assert g.capture_method == "hooks"
    assert set(g.capture_failures) == {"fx", "export"}
    assert comparable(g) == comparable(capture(MLPStack(), 1, 8))


def test_value_dependent_model_is_a_clear_error():
    with pytest.raises(CaptureError, match="meta device"):
        capture(ValueBranchStack(), 1, 8)


def test_cut_points_exclude_skip_connections():
    plain = capture(MLPStack(layers=3), 1, 8)
    assert [plain.cut_name(k) for k in plain.cut_points] == [
        "emb|layers.0", "layers.0|layers.1", "layers.1|layers.2", "layers.2|head"]
    skip = capture(SkipStack(layers=3), 1, 8)
    # block 0's output is read by block 1 and again by the sum after block 2 (which runs with block 2):
    # one tensor crosses layers.0|layers.1, two cross layers.1|layers.2, so that cut is invalid
    assert [skip.cut_name(k) for k in skip.cut_points] == ["emb|layers.0", "layers.0|layers.1", "layers.2|head"]
    graph = skip.graph
    assert graph.edges["layers.0", "layers.2"]["activations"] == 1


def test_user_module_is_not_moved_or_changed():
    model = MLPStack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, 1, 8)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_block_graph_and_groups(specs):
    g = capture(specs / "tiny_moe.yaml", 1, 16)
    groups = g.block_groups()
    assert sorted(len(v) for v in groups.values()) == [1, 3]  # one dense first layer, three MoE layers
    moe_blocks = [b for b in g.blocks if b.moe is not None]
    assert len(moe_blocks) == 3
    moe = moe_blocks[0].moe
    assert (moe.num_experts, moe.top_k) == (4, 2)
    assert moe.router == "layers.1.moe.router" and moe.experts == "layers.1.moe.experts"
    assert moe.shared == ["layers.1.moe.shared_experts"]
    assert g.graph.number_of_nodes() == len(g.units)


def test_moe_flops_follow_balanced_routing(specs):
    b, s = 1, 16
    g = capture(specs / "tiny_moe.yaml", b, s)
    h, ffn, experts, top_k, t = 64, 64, 4, 2, b * s
    moe = next(u for u in g.blocks if u.moe is not None)
    # routed experts see t * top_k tokens in all; the shared expert sees every token; the router is h x E
    routed = 2 * (t * top_k) * 3 * h * ffn
    shared = 2 * t * 3 * h * ffn
    router = 2 * t * h * experts
    moe_flops = sum(f for op, (f, _) in moe.flops_by_op.items())
    dense = next(u for u in g.blocks if u.moe is None)
    dense_mlp = 2 * t * 3 * h * 128
    assert moe_flops - dense.fwd_flops == routed + shared + router - dense_mlp


def test_asdict_roundtrip_is_plain_data(specs):
    g = capture(specs / "tiny_gpt.yaml", 1, 8)
    d = g.to_dict()
    assert "gm" not in d and d["capture_method"] == "hooks"
    assert dataclasses.is_dataclass(g.units[0])
    assert g.blocks[0].attention.kv_heads == g.blocks[0].attention.heads  # GPT style: MHA


def test_gpt_block_matches_korthikanti_outside_the_core(specs):
    """Korthikanti et al. (arXiv:2205.05198) Sec. 4.1 count, 16-bit, no dropout, outside the attention core:
    LayerNorm inputs 4sbh, QKV input 2sbh, projection input 2sbh, MLP 2sbh + 8sbh (GeLU input) + 8sbh = 26sbh.
    The two LayerNorms also keep mean and rstd in fp32 (2 x 2 x sb x 4 bytes), which the paper ignores."""
    b, s, h = 2, 32, 64
    g = capture(specs / "tiny_gpt.yaml", b, s)
    t = b * s
    block = g.blocks[0]
    assert block.saved_bytes - block.attention.core_saved_bytes == 26 * t * h + 16 * t
    # the core on meta runs SDPA's math kernel in fp32: q, k, v and the s x s probabilities
    heads = block.attention.heads
    assert block.attention.core_saved_bytes == 4 * (3 * t * h) + 4 * b * heads * s * s


@pytest.mark.parametrize("model", ["examples/specs/tiny_llama.yaml", "examples/specs/tiny_gpt.yaml",
                                   "examples/models/gpt2_small.py", "tests/data/hf/tiny_llama", "mlp6", "moe6",
                                   "moe2+4"])
def test_repeated_blocks_give_the_full_graph(model, tmp_path):
    """Capturing a few blocks of each run and repeating them (planner/capture/repeat.py: a spec keeps two
    blocks of each run, a module three) equals capturing all."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[3]
    if model == "mlp6":
        source = MLPStack(layers=6)
    elif model in ("moe6", "moe2+4"):  # one (two: DeepSeek-V3's layering) dense blocks, then MoE blocks
        spec = yaml.safe_load((root / "examples/specs/tiny_moe.yaml").read_text())
        spec["model"]["layers"] = 6
        spec["model"]["moe"]["dense_layers_first"] = 2 if model == "moe2+4" else 1
        source = tmp_path / "moe.yaml"
        source.write_text(yaml.safe_dump(spec))
    else:
        source = root / model
    full = capture(source, 1, 16, repeat=False)
    fast = capture(source, 1, 16)
    assert comparable(fast) == comparable(full)
    three_blocks = model == "tests/data/hf/tiny_llama"  # a module keeps three blocks of a run: nothing saved
    assert any("identical blocks repeated" in w for w in fast.warnings) != three_blocks
    assert full.gm is not None or full.capture_method != "fx"


def test_skip_connections_fall_back_to_the_full_capture():
    g = capture(SkipStack(layers=6), 1, 8)
    assert not any("repeated" in w for w in g.warnings)
    assert [g.cut_name(k) for k in g.cut_points] == ["emb|layers.0", "layers.0|layers.1", "layers.5|head"]


def test_a_spec_moe_is_captured_with_two_experts_built_and_the_others_counted(specs):
    """Only the first expert runs on meta (reference_model.MoE), so capture builds two per MoE layer and
    declares the rest; every parameter count, byte count and signature equals the full build's (the graphs
    are compared whole in test_repeated_blocks_give_the_full_graph[moe6])."""
    from autoshard.planner.capture import structure, trace
    from autoshard.planner.capture.loading import load_model

    spec = load_model(specs / "tiny_moe.yaml").spec  # 4 experts of SwiGLU (3 weights) per MoE layer
    standin, full = trace._spec_module(spec, [1], experts_built=2), trace._spec_module(spec, [1])
    moe = standin.layers[0].moe
    assert (len(moe.experts), moe.unbuilt_experts, full.layers[0].moe.unbuilt_experts) == (2, 2, 0)
    unbuilt = structure.declared_parameters(standin)[len(list(standin.parameters())):]
    assert [n for n, _, _ in unbuilt][:3] == [
        "layers.0.moe.experts.2.w1.weight", "layers.0.moe.experts.2.w2.weight", "layers.0.moe.experts.2.w3.weight"]
    assert trace._param_count(standin) == trace._param_count(full) == structure.param_count(full)
    assert trace._param_bytes(standin) == trace._param_bytes(full)
    assert structure.signature(standin.layers[0]) == structure.signature(full.layers[0])
