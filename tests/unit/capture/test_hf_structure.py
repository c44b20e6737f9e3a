"""Structure discovery on tiny Hugging Face models built from their config classes (tests/data/hf/tiny_*):
the parameter count equals transformers' own, the attention / MLP / MoE patterns are the ones the model
has (fused q/k/v and gate/up, Conv1D, q/k norms, stacked experts), and each plans on 64 H100s."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from autoshard.planner.capture.loading import load_model  # noqa: E402
from autoshard.planner.capture.trace import capture  # noqa: E402

HF = Path(__file__).resolve().parents[2] / "data" / "hf"
ARCHS = sorted(p.name for p in HF.glob("tiny_*"))


def hf_params(arch: str) -> int:
    """transformers' own count, from a model it builds itself."""
    config = load_model(HF / arch).module.config
    return transformers.AutoModelForCausalLM.from_config(config).num_parameters()


@pytest.fixture(scope="module")
def graphs() -> dict:
    return {arch: capture(HF / arch, 1, 32) for arch in ARCHS}


def test_the_zoo_covers_the_issue_architectures():
    assert len(ARCHS) >= 12
    assert {"tiny_gpt2", "tiny_falcon", "tiny_phi3", "tiny_olmo2", "tiny_mixtral", "tiny_qwen3_moe"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_equals_transformers(arch, graphs):
    assert graphs[arch].params == hf_params(arch)


# (q/k/v part widths of a fused projection, head norms, width norms, attention replicated under TP?)
ATTENTION = {
    "tiny_gpt2": ([64, 64, 64], 0, 0, False),       # Conv1D c_attn, split(split_size)
    "tiny_phi3": ([64, 32, 32], 0, 0, False),       # qkv_proj sliced at config widths
    "tiny_falcon": ([64, 16, 16], 0, 0, False),     # multi-query: one kv head, viewed [heads + 2, d]
    "tiny_falcon_gqa": ([], 0, 0, False),           # new decoder: viewed [kv groups, heads/kv + 2, d]
    "tiny_gpt_neox": ([], 0, 0, False),             # fused, interleaved per head: plain column sharding
    "tiny_qwen3": ([], 2, 0, False),                # q/k norms over one head
    "tiny_olmo2": ([], 0, 2, False),                # q/k norms over the whole projection
    "tiny_llama": ([], 0, 0, False),
}


@pytest.mark.parametrize("arch", sorted(ATTENTION))
def test_fused_projections_and_norms_inside_attention(arch, graphs):
    fused, head_norms, width_norms, replicated = ATTENTION[arch]
    for block in graphs[arch].blocks:
        info = block.attention
        assert info.fused == fused
        assert (len(info.head_norms), len(info.width_norms), bool(info.replicate)) == (head_norms, width_norms,
                                                                                       replicated), info.replicate
        assert not set(info.head_norms + info.width_norms) & set(block.norms)


def test_fused_gate_up_and_conv1d_mlps(graphs):
    phi3 = graphs["tiny_phi3"].blocks[0].mlp
    assert phi3.fused == [128, 128] and phi3.row == ["model.layers.0.mlp.down_proj"] and not phi3.replicate
    gpt2 = graphs["tiny_gpt2"].blocks[0].mlp
    assert gpt2.column == ["transformer.h.0.mlp.c_fc"] and gpt2.row == ["transformer.h.0.mlp.c_proj"]
    assert not gpt2.fused and not gpt2.replicate


@pytest.mark.parametrize(("arch", "experts", "top_k", "shared"), [
    ("tiny_mixtral", 4, 2, 0), ("tiny_qwen3_moe", 4, 2, 0), ("tiny_olmoe", 4, 2, 0), ("tiny_qwen2_moe", 4, 2, 2)])
def test_stacked_experts_are_found_as_moe(arch, experts, top_k, shared, graphs):
    """transformers 5 stores experts as [experts, ...] tensors: no ModuleList, no nn.Linear (issue 14's
    Mixtral bug: the MoE went unrecognised)."""
    for block in graphs[arch].blocks:
        moe = block.moe
        assert moe is not None and moe.fused and (moe.num_experts, moe.top_k, len(moe.shared)) == (experts, top_k,
                                                                                                     shared)
        assert block.mlp is None


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_plans_on_64_gpus(arch):
    import autoshard

    plan = autoshard.plan(str(HF / arch), gpus=64, profile="h100_ib", global_batch=64, seq_len=32)
    assert plan.gpus == 64 and plan.model["params"] == hf_params(arch)
