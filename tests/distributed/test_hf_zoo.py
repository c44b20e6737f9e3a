"""Hugging Face decoders built from their config classes (tests/data/hf/tiny_*), each layout against the
unsharded model: losses of 5 AdamW steps within 1e-4 relative, whole gradients after step 1 within 1e-5
(fp32), or a refusal before any collective. One 4-rank launch runs every case (hf_zoo_worker.py); each
case is one test here, parametrized over the worker's results.

The suite runs a representative subset (each pattern of issue 14 under the layouts it touches: Conv1D and
tied embeddings, fused q/k/v split [q | k | v] and interleaved, fused gate/up, multi-query, q/k norms over
the whole width and per head, soft-capping with eager attention, parallel attention + MLP, sliding windows
under CP, stacked-expert MoE under TP, EP and both, shared experts, MLA); `benchmarks/hf_matrix.py` runs every architecture under every
layout and writes the table in docs/transforms.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spawn import spawn

pytest.importorskip("transformers")

WORKER = Path(__file__).resolve().parent / "hf_zoo_worker.py"
HF = WORKER.parents[1] / "data" / "hf"
CASES = {
    "tiny_gpt2": ["tp=2,dp=2", "pp=2,dp=2"],          # Conv1D, fused c_attn split by split_size, tied
    "tiny_phi3": ["tp=2,dp=2"],                       # fused qkv_proj and gate_up_proj
    "tiny_gpt_neox": ["tp=2,dp=2"],                   # fused qkv interleaved per head, parallel residual
    "tiny_falcon": ["tp=2,dp=2"],                     # multi-query: 1 kv head replicated in the fused projection
    "tiny_falcon_gqa": ["tp=2,dp=2"],                 # viewed into heads, then regrouped [kv, group + 2, d]
    "tiny_olmo2": ["tp=2,dp=2", "cp=2,dp=2"],         # q/k RMSNorm over the whole projected width
    "tiny_qwen3": ["tp=2,sp=false,dp=2"],             # per-head q/k norms without SP
    "tiny_gemma2": ["tp=2,dp=2"],                     # soft-capping, eager attention, per-layer sliding window
    "tiny_mixtral": ["tp=2,dp=2", "ep=2,tp=2"],       # the silent loss difference
    "tiny_qwen2_moe": ["ep=2", "cp=2,dp=2"],          # shared expert and its gate; a 0 window on full layers
    "tiny_mistral": ["cp=2,dp=2"],                    # sliding window (16 < 32 tokens) under CP
    "tiny_deepseek_v3": ["ep=2,tp=2"],                # MLA (attention replicated), shared experts, dense layer 0
}


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict]:
    out = spawn([str(WORKER), "--cases", json.dumps(CASES)], 4, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r["arch"], r["layout"]): r for r in rows}


@pytest.mark.parametrize(("arch", "layout"), [(a, layout) for a, layouts in CASES.items() for layout in layouts])
def test_matches_the_unsharded_model(arch, layout, results):
    r = results[(arch, layout)]
    assert r["status"] == "match", r
    assert r["loss_rel"] <= 1e-4 and r["grad_err"] <= 1e-5
    assert len(r["losses"]) == 5 and r["losses"][-1] < r["losses"][0]  # it trains


def test_kv_heads_fewer_than_tp_ranks_are_replicated_and_the_q_heads_sharded():
    """Falcon's one kv head over two tp ranks: each rank keeps the whole (small) kv part of the fused
    projection and its half of the q part; OLMo-2's k norm over the kv width cannot take that: its attention
    runs replicated."""
    from autoshard.planner.capture.trace import capture
    from autoshard.transforms.tp import _replicated_kv_columns, attention_sharding

    info = capture(HF / "tiny_falcon", 1, 32).blocks[0].attention
    assert (info.heads, info.kv_heads, info.fused) == (4, 1, [64, 16, 16]) and attention_sharding(info, 2) == ""
    columns = _replicated_kv_columns(info, 2)
    assert columns(0).tolist() == [*range(0, 32), *range(64, 96)]
    assert columns(1).tolist() == [*range(32, 64), *range(64, 96)]
    with pytest.raises(ValueError, match="4 attention heads do not divide over tp = 3"):
        attention_sharding(info, 3)
    olmo2 = capture(HF / "tiny_olmo2", 1, 32).blocks[0].attention
    assert attention_sharding(olmo2, 2) == "" and "norm over the kv width" in attention_sharding(olmo2, 4)


def test_train_py_verify_compares_the_sharded_model_with_the_unsharded_one():
    from test_equivalence import launch

    out = launch(HF / "tiny_mixtral", "tp=2", 2, "--steps", "1", "--verify")
    assert out.returncode == 0, out.stderr[-3000:]
    check = json.loads(next(line for line in out.stdout.splitlines() if '"verify"' in line))
    assert check["verify"] == "ok" and check["relative_difference"] <= 1e-4


def test_a_layout_an_architecture_cannot_take_is_refused_before_any_collective_with_one_message():
    from test_equivalence import launch

    out = launch(HF / "tiny_gemma2", "cp=2", 2)  # soft-capping: eager attention, no SDPA to distribute
    assert out.returncode == 2 and 'File "' not in out.stderr, out.stderr[-3000:]
    assert "model.layers.0.self_attn: context parallelism needs attention through F.scaled_dot_product_attention" \
        in out.stderr
