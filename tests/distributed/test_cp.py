"""Context parallelism (transforms/cp.py) against the unsharded model, in real multi-process runs (torchrun,
gloo on CPU) through examples/train.py: losses of 5 AdamW steps within 1e-4 relative, whole gradients after
the first step within 1e-5 (fp32). RoPE (tiny Llama, GQA) and learned positions with tied embeddings (tiny
GPT), a Hugging Face Llama (position_ids), cp over 2 and 4 ranks, with TP/SP, and with ZeRO-3 over dp x cp and
selective recomputation."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import HAS_HF, HF_LLAMA, TINY_GPT, TINY_LLAMA, Runs

from autoshard.transforms.cp import cp_positions, split_sequence, unsplit_sequence

LAYOUTS = [
    (TINY_LLAMA, "cp=2", 2),  # RoPE, GQA (4 heads, 2 kv heads)
    (TINY_GPT, "cp=2", 2),  # learned positions, tied embeddings
    (TINY_LLAMA, "cp=4", 4),
    (TINY_LLAMA, "cp=2,tp=2", 4),  # sequence parallelism inside each cp chunk
    (TINY_LLAMA, "cp=2,dp=2,zero=3,recompute=selective", 4),  # FSDP2 over dp x cp; the backward replays the gather
]
CASES = [(model, layout, nproc, ()) for model, layout, nproc in LAYOUTS] + ([(HF_LLAMA, "cp=2", 2, ())] if HAS_HF else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(CASES, tmp_path_factory.mktemp("cp_runs"))


# ------------------------------------------------------------------ the load-balanced split, as pure functions


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_unsplit_is_the_identity_and_balances_causal_work(cp):
    x = torch.arange(3 * 16).view(3, 16)
    parts = [split_sequence(x, r, cp) for r in range(cp)]
    assert all(p.shape == (3, 16 // cp) for p in parts)
    assert torch.equal(unsplit_sequence(parts), x)
    # causal attention work of a query at position p is p + 1 keys: every rank gets the same total
    work = {int((cp_positions(r, cp, 16) + 1).sum()) for r in range(cp)}
    assert len(work) == 1


def test_rank_chunks_are_i_and_2cp_minus_1_minus_i():
    assert cp_positions(0, 2, 8).tolist() == [0, 1, 6, 7]
    assert cp_positions(1, 2, 8).tolist() == [2, 3, 4, 5]


def test_a_sequence_that_does_not_split_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match=r"30 tokens into 2 x cp\(4\) = 8 chunks"):
        cp_positions(0, 4, 30)


# ------------------------------------------------------------------ against the unsharded model


@pytest.mark.parametrize(("model", "layout", "nproc"), LAYOUTS,
                         ids=["llama-cp2", "gpt-cp2", "llama-cp4", "llama-cp2-tp2", "llama-cp2-dp2-zero3-selective"])
def test_context_parallel_matches_the_unsharded_model(model, layout, nproc, runs):
    runs.check(model, layout, nproc)


def test_hugging_face_llama_gets_its_position_ids(runs):
    pytest.importorskip("transformers")
    runs.check(HF_LLAMA, "cp=2", 2)
