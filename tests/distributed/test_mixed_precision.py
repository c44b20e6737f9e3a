"""bf16 mixed precision (transforms/precision.py) in a real 2-rank run (gloo on CPU): under FSDP2 the blocks
compute in bf16 while AdamW steps fp32 weights and the gradients are reduced in fp32; the losses stay within
1e-3 of the fp32 run's (and are not the same numbers); expert parallelism takes the same policy; a checkpoint of
a bf16 run (its fp32 master weights) resumes under another ZeRO stage with the same losses."""

from __future__ import annotations

import pytest
from test_checkpoint import run_jobs


def test_bf16_compute_with_fp32_master_weights_and_reduction(tmp_path):
    ckpt = str(tmp_path / "bf16")
    jobs = run_jobs([
        {"model": "tiny_llama", "layout": "dp=2,zero=3", "precision": "bf16", "save": ckpt},
        {"model": "tiny_llama", "layout": "dp=2,zero=3"},
        {"model": "tiny_moe", "layout": "ep=2,dp=2,zero=3", "precision": "bf16"},
        {"model": "tiny_moe", "layout": "ep=2,dp=2,zero=3"},
        {"model": "tiny_llama", "layout": "dp=2,zero=2", "precision": "bf16", "resume": ckpt},
    ], 2, probes=True)
    for bf16, fp32 in [(0, 1), (2, 3)]:
        assert jobs[bf16]["dtypes"] == {"input": "torch.bfloat16", "weight": "torch.bfloat16",
                                        "output": "torch.bfloat16", "master": "torch.float32",
                                        "grad": "torch.float32", "reduce": "torch.float32"}
        got, want = [jobs[bf16][s] for s in range(6)], [jobs[fp32][s] for s in range(6)]
        assert got == pytest.approx(want, rel=1e-3) and got != want
    assert [jobs[4][s] for s in (3, 4, 5)] == pytest.approx([jobs[0][s] for s in (3, 4, 5)], rel=1e-5)
