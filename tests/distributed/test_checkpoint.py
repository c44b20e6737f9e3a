"""Sharded checkpoints (transforms/checkpoint.py) in real multi-process runs (gloo on CPU): a checkpoint saved at
step 3 under one layout resumes under another layout and world size, and steps 4-6 give the uninterrupted
run's losses (1e-5 relative); unsharded weights go in from a .safetensors file and come out bit for bit; a rank
killed under torchrun loses nothing; a damaged checkpoint is refused.

Three launches (4, 2 and 1 ranks) run all cases, each a list of jobs in one process group
(checkpoint_worker.py), to keep the suite's time: ranks start once per world size, not once per case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn import spawn

WORKER = Path(__file__).with_name("checkpoint_worker.py")
SPECS = Path(__file__).resolve().parents[2] / "examples" / "specs"
TRAIN = Path(__file__).resolve().parents[2] / "examples" / "train.py"


def run_jobs(jobs: list[dict], nproc: int, *, probes: bool = False) -> dict[int, dict]:
    """Losses by job and step (and, with `probes`, the dtypes a bf16 job reported under "dtypes" and its
    expert gradients' norms under "expert_grads")."""
    out = spawn([str(WORKER), json.dumps(jobs)], nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    losses: dict[int, dict] = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "dtypes" in row:
                assert probes, row
                losses.setdefault(row["job"], {}).update(dtypes=row["dtypes"], expert_grads=row["expert_grads"])
            else:
                losses.setdefault(row["job"], {})[row["step"]] = row["loss"]
    return losses


def unsharded_weights(spec: str, seed: int) -> dict[str, torch.Tensor]:
    from autoshard.planner.capture.reference_model import build_reference_model
    from autoshard.planner.capture.spec import load_spec
    from autoshard.transforms.init import init_parameters

    model = build_reference_model(load_spec(SPECS / f"{spec}.yaml")[0])
    init_parameters(model, seed)
    return model.state_dict()


def test_checkpoints_resume_under_other_layouts_and_world_sizes(tmp_path):
    """Saved at step 3 under tp=2,dp=2 (ZeRO-1 over DTensor shards), pp=2,dp=2 (ZeRO-2), dp=4 (ZeRO-3),
    cp=2,dp=2 (DDP) and, for the MoE, ep=2,dp=4 (ZeRO-1 slices of the experts over their 2 replicas) on 4 ranks;
    resumed on 2 ranks under pp=2, tp=2, dp=2 ZeRO-1, dp=2 ZeRO-3 and ep=2,dp=2 ZeRO-3 (saved again there at
    once), and on 1 rank (tp=2,dp=2 -> pp=2 -> dp=1, and the MoE's ep=2,dp=2 -> dp=1). Hugging Face models whose
    shards are not contiguous in the unsharded tensor: Phi-3 under tp=2 (fused [q|k|v] and gate/up regrouped per
    rank: 3 and 2 boxes each) and Qwen3-MoE under ep=2 (stacked expert tensors cut per rank), resumed on 1 rank.
    Also: tiny GPT's weights
    (tied embeddings, biases) from a .safetensors file into tp=2,pp=2 (each stage its part, the tied head on the
    last), saved, exported: equal to the file bit for bit, under the unsharded model's names."""
    from safetensors.torch import save_file

    from autoshard.transforms.checkpoint import export_state_dict

    d = {k: str(tmp_path / k) for k in ("tp", "pp", "dp", "cp", "ep4", "ep", "tp_pp2", "gpt", "phi3", "qwen")}
    weights = unsharded_weights("tiny_gpt", seed=11)
    save_file({k: v.contiguous() for k, v in weights.items() if k != "output.weight"} | {
        "output.weight": weights["output.weight"].clone()}, tmp_path / "gpt.safetensors")
    fresh = run_jobs([
        {"model": "tiny_llama", "layout": "tp=2,dp=2,zero=1", "save": d["tp"]},
        {"model": "tiny_llama", "layout": "pp=2,dp=2,zero=2", "save": d["pp"]},
        {"model": "tiny_llama", "layout": "dp=4,zero=3", "save": d["dp"]},
        {"model": "tiny_llama", "layout": "cp=2,dp=2,zero=0", "save": d["cp"]},
        {"model": "tiny_moe", "layout": "ep=2,dp=4,zero=1", "save": d["ep4"]},
        {"model": "tiny_gpt", "layout": "tp=2,pp=2", "weights": str(tmp_path / "gpt.safetensors"), "save": d["gpt"]},
    ], 4)
    two = run_jobs([
        {"model": "tiny_llama", "layout": "pp=2", "resume": d["tp"], "save": d["tp_pp2"]},
        {"model": "tiny_llama", "layout": "tp=2", "resume": d["pp"]},
        {"model": "tiny_llama", "layout": "dp=2,zero=1", "resume": d["dp"]},
        {"model": "tiny_llama", "layout": "dp=2,zero=3", "resume": d["cp"]},
        {"model": "tiny_moe", "layout": "ep=2,dp=2,zero=3", "resume": d["ep4"], "save": d["ep"]},
        {"model": "hf/tiny_phi3", "layout": "tp=2", "save": d["phi3"]},
        {"model": "hf/tiny_qwen3_moe", "layout": "ep=2,dp=2,zero=1", "save": d["qwen"]},
    ], 2)
    one = run_jobs([
        {"model": "tiny_llama", "layout": "dp=1", "resume": d["tp_pp2"]},
        {"model": "tiny_moe", "layout": "dp=1", "resume": d["ep"]},
        {"model": "hf/tiny_phi3", "layout": "dp=1", "resume": d["phi3"]},
        {"model": "hf/tiny_qwen3_moe", "layout": "dp=1", "resume": d["qwen"]},
    ], 1)
    later = [3, 4, 5]
    for job, saved in enumerate([0, 1, 2, 3]):
        want = [fresh[saved][s] for s in later]
        assert [two[job][s] for s in later] == pytest.approx(want, rel=1e-5), f"job {job} resumed from {saved}"
    assert [one[0][s] for s in later] == pytest.approx([fresh[0][s] for s in later], rel=1e-5)
    assert [two[4][s] for s in later] == pytest.approx([fresh[4][s] for s in later], rel=1e-5)
    assert [one[1][s] for s in later] == pytest.approx([fresh[4][s] for s in later], rel=1e-5)
    for job, saved in [(2, 5), (3, 6)]:  # Hugging Face models saved on 2 ranks
        assert [one[job][s] for s in later] == pytest.approx([two[saved][s] for s in later], rel=1e-5)
    exported = export_state_dict(d["gpt"])
    assert exported.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(exported[name], value), name


def test_a_killed_rank_resumes_under_torchrun_with_nothing_lost(tmp_path):
    """torchrun --max-restarts=1: rank 1 SIGKILLs itself inside step 3's forward (once: a marker file); the job
    restarts from the step-2 checkpoint and every step's loss equals the uninterrupted run's (a warmup + cosine
    learning rate: the schedule's position comes back from the checkpoint, or the restarted job would warm up
    again). Then a shard of the uninterrupted run's checkpoint with one bit flipped (same size) is refused by
    both ranks of a resume (exit 2, the file named by each, before any load), and a truncated shard in the
    newest checkpoint is refused (exit 2, the file named, nothing written)."""
    args = ["--model", str(SPECS / "tiny_llama.yaml"), "--layout", "dp=2,zero=1", "--steps", "6", "--seed", "7",
            "--lr-schedule", "cosine", "--warmup-steps", "3"]
    plain = spawn([str(TRAIN), *args, "--checkpoint-dir", str(tmp_path / "plain"), "--keep", "1"], 2)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert [p.name for p in (tmp_path / "plain").iterdir()] == ["step_00000006"]  # saved at the end, keep 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOSHARD_TEST_KILL_AT_STEP": "3",
           "AUTOSHARD_TEST_KILL_MARKER": str(tmp_path / "killed")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           str(TRAIN), *args, "--checkpoint-dir", str(tmp_path / "ckpt"), "--save-every", "2"]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert (tmp_path / "killed").exists() and "resumed from" in killed.stderr and "step_00000002" in killed.stderr
    assert last_losses(killed.stdout) == last_losses(plain.stdout)

    flipped = tmp_path / "plain" / "step_00000006" / "__0_0.distcp"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    refused = spawn([str(TRAIN), *args, "--steps", "8", "--resume", str(tmp_path / "plain")], 2)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.count("__0_0.distcp does not match the checksum") == 2  # each rank, its own message

    newest = tmp_path / "ckpt" / "step_00000006"
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "ckpt").rglob("*"))
    refused = subprocess.run([sys.executable, str(TRAIN), *args[:2], "--steps", "8", "--resume", str(tmp_path / "ckpt"),
                              "--checkpoint-dir", str(tmp_path / "ckpt")], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2 and "__1_0.distcp" in refused.stderr and "truncated" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "ckpt").rglob("*")) == before


def last_losses(stdout: str) -> dict[int, float]:
    """The loss of each step as last printed (a restarted job prints the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {row["step"]: row["loss"] for row in rows}
