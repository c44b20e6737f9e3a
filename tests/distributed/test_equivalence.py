"""Every layout against the unsharded model, in real multi-process runs (torchrun, gloo on CPU), through
examples/train.py: the losses of 5 AdamW steps match within 1e-4 relative and the whole gradients after the
first step within 1e-5 (fp32). Covers tensor parallelism with and without sequence parallelism, data
parallelism at ZeRO 0-3, their combination, recomputation, on the reference Llama-, GPT- and MoE-style
models and a Hugging Face Llama built from its config."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn import MICRO_BATCH, own_micro_batch, spawn

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "examples" / "train.py"
TINY_LLAMA = ROOT / "examples" / "specs" / "tiny_llama.yaml"
TINY_GPT = ROOT / "examples" / "specs" / "tiny_gpt.yaml"
TINY_MOE = ROOT / "examples" / "specs" / "tiny_moe.yaml"
TINY_WIDE = ROOT / "examples" / "specs" / "tiny_wide_heads.yaml"
TINY_MQA = ROOT / "tests" / "data" / "specs" / "tiny_mqa.yaml"
HF_LLAMA = ROOT / "tests" / "data" / "hf" / "tiny_llama"
STEPS = 5
HAS_HF = importlib.util.find_spec("transformers") is not None


def launch(model: Path, layout: str = "", nproc: int = 1, *extra: str) -> subprocess.CompletedProcess:
    args = ["--model", str(model), "--steps", str(STEPS), "--seed", "7", "--global-batch", "8", "--seq-len", "32",
            *extra]
    if layout:
        args += ["--layout", layout]
    if nproc > 1:  # as torchrun would (tests/distributed/spawn.py); test_pp.py runs the real torchrun too
        return spawn([str(TRAIN), *args], nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=300, env=env)


def run(model: Path, layout: str, nproc: int, tmp: Path, *extra: str) -> tuple[list[float], dict]:
    """(losses per step, whole gradients after step 1) of one training run."""
    grads = tmp / f"grads_{abs(hash((str(model), layout, nproc, extra)))}.pt"
    out = launch(model, layout, nproc, "--grads-out", str(grads), *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in out.stdout.splitlines() if line.startswith("{")]
    return losses, torch.load(grads)


_REFERENCE: dict[str, tuple[list[float], dict]] = {}


def reference(model: Path, tmp: Path) -> tuple[list[float], dict]:
    if str(model) not in _REFERENCE:
        _REFERENCE[str(model)] = run(model, "", 1, tmp)
    return _REFERENCE[str(model)]


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-4)


def check(model: Path, layout: str, nproc: int, tmp: Path, *extra: str) -> None:
    """One training run of its own (train.py under spawn) against the unsharded model."""
    compare(run(model, layout, nproc, tmp, *extra), reference(model, tmp))


def compare(got: tuple[list[float], dict], want: tuple[list[float], dict]) -> None:
    (losses, grads), (want_losses, want_grads) = got, want
    assert_close(losses, want_losses)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


WORKER = Path(__file__).with_name("equivalence_worker.py")


class Runs:
    """Every case of a test module, run as examples/train.py runs it but one multi-process launch per world
    size (equivalence_worker.py), started the first time a test asks for one of its cases; the unsharded
    reference of each model is trained in the same launch. `cases`: (model, layout, nproc, extra args).

    `micro_batch`: train.py's --micro-batch for every case without an mbs of its own (and the references):
    spawn.MICRO_BATCH; test_pp.py gives 1."""

    def __init__(self, cases: list[tuple[Path, str, int, tuple[str, ...]]], tmp: Path,
                 micro_batch: int = MICRO_BATCH) -> None:
        self.cases, self.tmp, self.micro_batch = cases, tmp, micro_batch
        self.launches: dict[int, tuple[subprocess.CompletedProcess, dict[str, dict], Path]] = {}

    def check(self, model: Path, layout: str, nproc: int, *extra: str) -> None:
        """The case's losses and gradients after step 1 against the unsharded model's (as `check`)."""
        assert (model, layout, nproc, extra) in self.cases, "add the case to the module's CASES"
        reference = self.result(model, "", nproc, *own_micro_batch(list(extra)))
        compare(self.result(model, layout, nproc, *extra), reference)

    def result(self, model: Path, layout: str, nproc: int, *extra: str) -> tuple[list[float], dict]:
        """(losses per step, whole gradients after step 1) of the case; layout "": the model's reference."""
        saved = self.saved(model, layout, nproc, *extra)
        return saved["losses"], saved["grads"]

    def saved(self, model: Path, layout: str, nproc: int, *extra: str) -> dict:
        """Everything equivalence_worker.py saved for the case (layout "": the model's reference, at the
        micro-batch `extra` gives, if any)."""
        out, rows, folder = self._launch(nproc)
        case = _case_id(model, layout, extra) if layout else " ".join([f"reference:{model}", *extra])
        assert out.returncode == 0, out.stderr[-3000:]
        assert "refused" not in rows[case], rows[case]
        return torch.load(folder / rows[case]["file"])

    def _launch(self, nproc: int):
        if nproc not in self.launches:
            cases = [[_case_id(m, layout, extra), str(m), layout, list(extra)]
                     for m, layout, n, extra in self.cases if n == nproc]
            assert cases, f"no case for {nproc} ranks in this module's CASES"
            folder = self.tmp / f"world{nproc}"
            folder.mkdir()
            out = spawn([str(WORKER), "--out", str(folder), "--cases", json.dumps(cases),
                         "--micro-batch", str(self.micro_batch)], nproc,
                        timeout=300 + 60 * len(cases))
            rows = {r["case"]: r for r in (json.loads(line) for line in out.stdout.splitlines()
                                           if line.startswith("{"))}
            self.launches[nproc] = out, rows, folder
        return self.launches[nproc]


def _case_id(model: Path, layout: str, extra: tuple[str, ...]) -> str:
    return " ".join([str(model), layout, *extra])


CASES = [  # (model, layout, ranks, extra train.py arguments): one launch per world size runs them all
    (TINY_LLAMA, "dp=4,zero=1", 4, ()),
    (TINY_LLAMA, "dp=2,zero=2", 2, ()),
    *[(TINY_LLAMA, f"dp=2,zero=3,recompute={r}", 2, ()) for r in ("selective", "full")],
    (TINY_LLAMA, "dp=2,zero=1,mbs=2", 2, ()),
    (TINY_MOE, "dp=2,zero=0", 2, ()),
    (TINY_MOE, "dp=2,zero=3", 2, ()),
    (TINY_LLAMA, "tp=2", 2, ()),
    (TINY_LLAMA, "tp=2,sp=false", 2, ()),
    (TINY_WIDE, "tp=2", 2, ()),
    *[(TINY_LLAMA, f"tp=2,dp=2,zero={zero}", 4, ()) for zero in (0, 3)],
    (TINY_GPT, "tp=2,dp=2,zero=3,recompute=selective", 4, ()),
    (TINY_MOE, "tp=2,dp=2,zero=1", 4, ()),
    *([(HF_LLAMA, "tp=2", 2, ()), (HF_LLAMA, "tp=2,dp=2,zero=3,recompute=full", 4, ())] if HAS_HF else []),
    (TINY_MQA, "tp=2", 2, ()),
]
"""Each ZeRO stage once on its own and again under TP: ZeRO-1 (our ShardedAdamW's flat 1/dp slices, which cut
tensors unevenly) over 4 ranks; ZeRO-0 (DDP) on the MoE model and with TP; ZeRO-2 and -3 (FSDP2) over 2 ranks
and with TP. Tied embeddings under TP: the GPT model at tp = 2 (tp = 4 ran the same code and the suite's
2-core budget could not keep it)."""


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def runs(tmp) -> Runs:
    return Runs(CASES, tmp)


# ------------------------------------------------------------------ data parallelism and ZeRO (transforms/dp.py)


def test_zero_1_slices_the_flat_parameters_over_four_ranks(runs):
    runs.check(TINY_LLAMA, "dp=4,zero=1", 4)


def test_zero_2_keeps_weights_gathered_from_forward_to_backward(runs):
    runs.check(TINY_LLAMA, "dp=2,zero=2", 2)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute(recompute, runs):
    runs.check(TINY_LLAMA, f"dp=2,zero=3,recompute={recompute}", 2)


def test_gradient_accumulation_over_micro_batches(runs):
    runs.check(TINY_LLAMA, "dp=2,zero=1,mbs=2", 2)


def test_moe_with_unrouted_experts_under_ddp_and_fsdp(runs):
    runs.check(TINY_MOE, "dp=2,zero=0", 2)
    runs.check(TINY_MOE, "dp=2,zero=3", 2)


# ------------------------------------------------------------------ tensor and sequence parallelism (transforms/tp.py)


@pytest.mark.parametrize("layout", ["tp=2", "tp=2,sp=false"])
def test_tensor_parallel_with_and_without_sequence_parallel(layout, runs):
    runs.check(TINY_LLAMA, layout, 2)


def test_tensor_parallel_with_heads_wider_than_the_width(runs):
    """head_dim apart from hidden / heads (spec `head_dim`: 4 heads of 32 on a width of 64)."""
    runs.check(TINY_WIDE, "tp=2", 2)


@pytest.mark.parametrize("zero", [0, 3])  # zero 1 with TP: test_tensor_parallel_on_moe
def test_tensor_parallel_with_data_parallel(zero, runs):
    runs.check(TINY_LLAMA, f"tp=2,dp=2,zero={zero}", 4)


def test_gpt_style_with_tied_embeddings_sequence_parallel_fsdp_and_selective_recompute(runs):
    runs.check(TINY_GPT, "tp=2,dp=2,zero=3,recompute=selective", 4)


def test_tensor_parallel_on_moe(runs):
    runs.check(TINY_MOE, "tp=2,dp=2,zero=1", 4)


def test_hugging_face_llama_from_config(runs):
    pytest.importorskip("transformers")
    runs.check(HF_LLAMA, "tp=2", 2)
    runs.check(HF_LLAMA, "tp=2,dp=2,zero=3,recompute=full", 4)


# ------------------------------------------------------------------ bad input


def test_a_layout_the_model_cannot_take_is_refused():
    out = launch(TINY_LLAMA, "ep=2", 2)  # a dense model has no experts to shard
    assert out.returncode != 0 and "found no MoE layer" in out.stderr and 'train.py", line' not in out.stderr


def test_fewer_kv_heads_than_tp_ranks_are_replicated(runs):
    """1 kv head over tp = 2: each rank keeps the kv head its q heads use (Megatron's replication); the
    gradients of the replicated k/v projections are summed over tp. (Two kv heads over tp = 4 run the same
    code: 49 of the 4-rank launch's 156 s on 2 cores.)"""
    runs.check(TINY_MQA, "tp=2", 2)


def test_heads_that_do_not_divide_over_tp_are_refused_on_every_rank():
    out = launch(TINY_LLAMA, "tp=3", 3)
    assert out.returncode != 0 and "4 attention heads do not divide over tp = 3" in out.stderr
    assert 'train.py", line' not in out.stderr  # torchrun's own summary may show its traceback; ours must not


def test_a_layout_for_another_world_size_is_refused():
    out = launch(TINY_LLAMA, "tp=2,dp=2", 2)
    assert out.returncode != 0 and "4 != 2 GPUs" in out.stderr and 'train.py", line' not in out.stderr
