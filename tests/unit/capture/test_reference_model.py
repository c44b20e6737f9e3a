"""The reference transformer: published parameter counts on meta, tiny models on CPU, fx tracing, MoE."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from autoshard.planner.capture.reference_model import Attention, MoE, Transformer, build_reference_model
from autoshard.planner.capture.spec import ModelSpec, load_spec

SPECS = Path(__file__).resolve().parents[3] / "examples" / "specs"


def example(name: str) -> ModelSpec:
    return load_spec(SPECS / f"{name}.yaml")[0]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def tiny(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return build_reference_model(example(name))


def lm_loss(model: Transformer, tokens: Tensor) -> Tensor:
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    aux = model.moe_aux_loss()
    return loss if aux is None else loss + 0.01 * aux


@pytest.mark.parametrize(
    ("name", "published", "rel_tol"),
    [
        ("llama3_405b", 405.85e9, 0.005),  # Llama 3 paper / HF card: 405.85e9 with vocab 128256, untied
        ("gpt3_175b", 174.6e9, 0.01),  # GPT-3 paper, Table 2.1 ("175.0B"; 174.6e9 by the formula)
        ("mixtral_8x7b", 46.70e9, 0.005),  # Mixtral paper: 46.7e9 total, 12.9e9 active
    ],
)
def test_published_parameter_counts(name: str, published: float, rel_tol: float) -> None:
    with torch.device("meta"):
        model = build_reference_model(example(name))
    assert n_params(model) == pytest.approx(published, rel=rel_tol)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt", "tiny_moe"])
def test_tiny_forward_backward(name: str) -> None:
    model = tiny(name)
    tokens = torch.randint(0, model.spec.vocab, (2, model.spec.seq_len))
    assert model(tokens).shape == (2, model.spec.seq_len, model.spec.vocab)
    loss = lm_loss(model, tokens)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.layers[-1].attention.wq.weight.grad.abs().sum() > 0


def test_shorter_sequence_than_seq_len() -> None:
    for name in ("tiny_llama", "tiny_gpt"):
        model = tiny(name)
        assert model(torch.randint(0, 256, (3, 5))).shape == (3, 5, 256)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt", "tiny_moe"])
def test_meta_forward_backward(name: str) -> None:
    with torch.device("meta"):
        model = build_reference_model(example(name))
    tokens = torch.randint(0, 256, (2, 32), device="meta")
    out = model(tokens)
    assert out.is_meta and out.shape == (2, 32, 256)
    out.float().mean().backward()
    assert model.output.weight.grad is not None


def test_module_names() -> None:
    names = dict(tiny("tiny_moe").named_modules())
    for fqn in (
        "tok_embeddings", "norm", "output", "layers.0.attention_norm", "layers.0.ffn_norm",
        "layers.0.attention.wq", "layers.0.attention.wk", "layers.0.attention.wv", "layers.0.attention.wo",
        "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.0.feed_forward.w3",
        "layers.1.moe.router", "layers.1.moe.experts.3.w1", "layers.1.moe.experts.3.w2",
        "layers.1.moe.experts.3.w3", "layers.1.moe.shared_experts.w1",
    ):  # fmt: skip
        assert fqn in names, fqn
    assert "layers.1.feed_forward" not in names and "layers.0.moe" not in names
    assert "pos_embeddings" not in names
    gpt = dict(tiny("tiny_gpt").named_modules())
    assert "pos_embeddings" in gpt and "layers.0.feed_forward.w3" not in gpt
    assert isinstance(gpt["norm"], torch.nn.LayerNorm) and isinstance(names["norm"], torch.nn.RMSNorm)


def test_biases_follow_style() -> None:
    gpt, llama = tiny("tiny_gpt"), tiny("tiny_llama")
    assert gpt.layers[0].attention.wq.bias is not None and gpt.layers[0].feed_forward.w2.bias is not None
    assert gpt.output.bias is None
    assert all(not n.endswith(".bias") for n, _ in llama.named_parameters())


def test_tied_embeddings_share_storage() -> None:
    model = tiny("tiny_gpt")
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    untied = build_reference_model(dataclasses.replace(model.spec, tied_embeddings=False))
    assert n_params(untied) - n_params(model) == model.spec.vocab * model.spec.hidden


def test_init_is_deterministic() -> None:
    a, b = tiny("tiny_moe", seed=3), tiny("tiny_moe", seed=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert a.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_meta_then_to_empty_then_init_weights() -> None:
    with torch.device("meta"):
        model = build_reference_model(example("tiny_llama"))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = tiny("tiny_llama")
    assert torch.equal(model.rope_cos, reference.rope_cos) and torch.equal(model.rope_sin, reference.rope_sin)
    assert torch.isfinite(lm_loss(model, torch.randint(0, 256, (2, 32))))


def test_gqa_attention_matches_explicit_computation() -> None:
    torch.manual_seed(0)
    spec = example("tiny_llama")  # 4 query heads, 2 kv heads
    attn, x = Attention(spec), torch.randn(2, 6, spec.hidden)
    q = attn.wq(x).view(2, 6, 4, 16).transpose(1, 2)
    k = attn.wk(x).view(2, 6, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 6, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 16**0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(attn(x), expected)


def test_attention_reads_head_counts_from_attributes() -> None:
    """What a TP transform does: split heads across two copies; their partial outputs sum to the whole."""
    torch.manual_seed(0)
    spec = example("tiny_llama")
    full, x = Attention(spec), torch.randn(2, 6, spec.hidden)
    total = torch.zeros(2, 6, spec.hidden)
    for rank in range(2):
        shard = copy.deepcopy(full)
        shard.n_heads, shard.n_kv_heads = 2, 1
        q_rows, kv_rows = slice(32 * rank, 32 * (rank + 1)), slice(16 * rank, 16 * (rank + 1))
        with torch.no_grad():
            for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
                getattr(shard, name).weight = torch.nn.Parameter(getattr(full, name).weight[rows].clone())
            shard.wo.weight = torch.nn.Parameter(full.wo.weight[:, q_rows].clone())
            total += shard(x)
    torch.testing.assert_close(total, full(x))


def moe_by_hand(moe: MoE, x: Tensor) -> Tensor:
    """Each token: sum over its top-k experts of gate x expert(token), plus shared experts; the gates are
    the router probabilities, renormalised over the top k when k > 1 (Mixtral) and raw for k = 1 (Switch)."""
    probs = moe.router(x).float().softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        gate, ids = probs[t].topk(moe.top_k)
        gate = gate / gate.sum() if moe.top_k > 1 else gate
        for g, e in zip(gate, ids.tolist(), strict=True):
            out[t] += g * moe.experts[e](x[t])
        if moe.shared_experts is not None:
            out[t] += moe.shared_experts(x[t])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_matches_hand_computation(top_k: int) -> None:
    torch.manual_seed(0)
    moe, x = MoE(16, experts=4, top_k=top_k, expert_ffn_hidden=8, shared_experts=1), torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe_by_hand(moe, x))


def test_moe_unbalanced_routing() -> None:
    torch.manual_seed(0)
    moe = MoE(16, experts=4, top_k=2, expert_ffn_hidden=8)
    x = (
        torch.rand(12, 16) + 0.1
    )  # positive, so the logits below order the experts 3 > 1 > 0 = 2 for every token
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3] = 1.0
        moe.router.weight[1] = 0.5
        out = moe(x.view(3, 4, 16))
        ids = moe.router(x).topk(2).indices
        assert torch.bincount(ids.flatten(), minlength=4).tolist() == [0, 12, 0, 12]
        torch.testing.assert_close(out.view(12, 16), moe_by_hand(moe, x))


def test_moe_aux_loss() -> None:
    """Switch eq. 4: every token on one expert with probability ~1 gives E * 1 * 1 = E."""
    moe = MoE(8, experts=4, top_k=1, expert_ffn_hidden=8)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 10.0
        moe(torch.rand(20, 8) + 0.5)
    assert moe.aux_loss is not None and moe.aux_loss.item() == pytest.approx(4.0, abs=1e-3)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt"])
def test_fx_trace_dense_matches_eager(name: str) -> None:
    model = tiny(name)
    traced = torch.fx.symbolic_trace(model)
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(traced(tokens), model(tokens), rtol=0, atol=0)
    assert any(n.op == "call_module" and n.target == "layers.0.attention.wq" for n in traced.graph.nodes)


def test_fx_trace_moe_on_meta_is_balanced() -> None:
    with torch.device("meta"):
        model = build_reference_model(example("tiny_moe"))
    traced = torch.fx.symbolic_trace(model)
    # balanced routing, priced as one expert on all routed rows (same FLOPs and bytes as E experts on 1/E)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    assert "bincount" not in traced.code and any(".experts.0." in t for t in targets)
    assert not any(".experts.1." in t for t in targets)
    tokens = torch.randint(0, 256, (2, 32), device="meta")
    out = traced(tokens)
    assert out.is_meta and out.shape == (2, 32, 256)
    assert model.layers[1].moe.aux_loss is None  # tracing leaves no Proxy behind
    cpu_traced = torch.fx.symbolic_trace(tiny("tiny_moe"))
    assert cpu_traced(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)


def test_odd_head_dim_runs() -> None:
    """hidden / heads odd (gpt-oss-like 2880 / 64): RoPE leaves the last channel of each head unrotated."""
    spec = dataclasses.replace(example("tiny_llama"), hidden=36, heads=4, kv_heads=2)
    model = build_reference_model(spec)
    assert torch.isfinite(lm_loss(model, torch.randint(0, 256, (2, 8))))
