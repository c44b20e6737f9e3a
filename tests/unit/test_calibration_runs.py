"""benchmarks/calibration_runs.py: published runs turned into cost-model inputs (models, layouts, throughput)."""

from __future__ import annotations

import importlib
import io
import sys
from pathlib import Path

import pytest
import yaml

from autoshard.cost_models.layout import PRECISIONS, Layout, Training
from autoshard.planner.capture.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
cr = importlib.import_module("benchmarks.calibration_runs")

PATH = cr.resolve_path()
if not PATH.is_file():
    pytest.skip(f"calibration YAML not found at {PATH} (set ${cr.ENV_VAR} to its path)", allow_module_level=True)

RUNS, SKIPPED = cr.load_runs(PATH)
BY_ID = {r.id: r for r in RUNS}
ENTRIES = {e["id"]: e for e in cr.load_entries(PATH)}

# params_b is the model's name label for these, not a count; the architecture is confirmed otherwise.
PARAMS_LABELS = {
    "nemo2407_nemotron_8b_64gpu": "Nemotron-3 8B with its untied 256000 vocab has 8.56B parameters; NeMo's "
    "TFLOP/s <-> tokens/s pair reproduces to 0.1% with this architecture",
    "nemo2407_nemotron_22b_64gpu": "Nemotron-3 22B counts 21.3B; the TFLOP/s <-> tokens/s pair agrees to 0.1%",
    "nemo_cp_llama2_7b_h100_seq4k_4gpu": "Llama 2 7B has 6.74B parameters (Touvron et al. 2023)",
    "nemo_cp_llama2_7b_h100_seq8k_8gpu": "Llama 2 7B has 6.74B parameters",
    "nemo_cp_llama2_7b_h100_seq256k_256gpu": "Llama 2 7B has 6.74B parameters",
    "ultrascale_best_1b_32gpu": "nanotron's benchmark '1B' shape (MHA, 131072 vocab) has 1.34B parameters",
    "ultrascale_best_3b_512gpu": "nanotron's '3B' shape has 3.57B; its MFU <-> tokens/s pair agrees to 0.1%",
    "ultrascale_best_8b_512gpu": "nanotron's '8B' shape uses MHA (not Llama 3's GQA): 8.86B parameters",
}
# Two tokens/s estimates of one run that disagree by more than 10%, and why.
CROSS_CHECK_KNOWN = {
    "ultrascale_best_1b_32gpu": "the playbook's MFU implies 11.3 GFLOP/token, 9.7 from the architecture; as if "
    "the tied embedding counted twice (the 3B and 80B rows agree within 2%)",
    "mbridge_260401_gpt_oss_120b_dgxh100_64gpu": "Megatron-Bridge's TFLOP/s imply 27 GFLOP/token; GPT-OSS's "
    "64-dim heads and 128-token sliding windows on half the layers are not modelled",
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_enough_usable_runs_and_every_entry_accounted_for() -> None:
    assert len(RUNS) >= 30
    ids = [r.id for r in RUNS] + [i for i, _ in SKIPPED]
    assert sorted(ids) == sorted(ENTRIES)
    assert len(set(ids)) == len(ids)


def test_skipped_runs_have_reasons() -> None:
    for run_id, reason in SKIPPED:
        assert isinstance(reason, str) and len(reason) > 10, run_id
    skipped = dict(SKIPPED)
    # Table 2 PTD-P rows give only TP x PP.
    for run_id in ("megatron_sc21_t2_ptdp_175b_768gpu", "megatron_sc21_t2_ptdp_530b_2240gpu"):
        assert "TP/PP split" in skipped[run_id]


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.id)
def test_model_parses_without_warnings(run: cr.CalibrationRun) -> None:
    model, _, warnings = parse_spec({"model": run.model}, source=run.id)
    assert warnings == []
    for key in ("layers", "hidden", "heads", "kv_heads", "vocab", "seq_len", "ffn_hidden"):
        assert getattr(model, key) == run.model[key]
    assert model.style == run.model["style"]
    assert model.tied_embeddings == run.model["tied_embeddings"]
    assert model.seq_len == run.training.seq_len
    if run.model.get("moe"):
        assert set(run.model["moe"]) <= {"experts", "top_k", "expert_ffn_hidden", "shared_experts",
                                         "dense_layers_first"}


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.id)
def test_layout_training_profile(run: cr.CalibrationRun) -> None:
    entry = ENTRIES[run.id]
    assert isinstance(run.layout, Layout) and isinstance(run.training, Training)
    assert run.layout.gpus == entry["hardware"]["num_gpus"]
    if entry["parallel"].get("dp") is not None:
        assert run.layout.dp == entry["parallel"]["dp"]
    assert run.layout.tp == entry["parallel"]["tp"] and run.layout.pp == entry["parallel"]["pp"]
    assert (run.layout.schedule == "interleaved_1f1b") == (run.layout.vpp > 1)
    # What the cost model's check() needs: whole micro-batches, TP dividing heads, EP dividing experts.
    assert run.training.global_batch % (run.layout.dp * run.layout.mbs) == 0
    assert run.model["heads"] % run.layout.tp == 0
    if run.layout.ep > 1:
        assert run.model["moe"]["experts"] % run.layout.ep == 0
    assert run.layout.pp * run.layout.vpp <= run.model["layers"]
    assert run.profile in cr.PROFILES
    assert run.training.precision in PRECISIONS
    assert run.tokens_per_sec_per_gpu > 0
    assert bool(run.derived) == (entry["measured"].get("tokens_per_sec_per_gpu") is None)
    assert run.peak_memory_gib == entry["measured"].get("peak_memory_gib")


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.id)
def test_filled_values_are_recorded_as_assumptions(run: cr.CalibrationRun) -> None:
    src, text = ENTRIES[run.id]["model"], "\n".join(run.assumptions)
    for key in ("ffn_hidden", "kv_heads", "vocab"):
        if src.get(key) is None and run.model.get(key) is not None:
            assert f"{key}={run.model[key]}" in text
    tr, par = ENTRIES[run.id]["training"], ENTRIES[run.id]["parallel"]
    if tr.get("micro_batch") is None:
        assert "mbs=1" in text
    if tr.get("recompute") is None:
        assert f"recompute={run.layout.recompute}" in text
    if par.get("zero_stage") is None:
        assert f"zero={run.layout.zero}" in text


def test_params_match_published_counts() -> None:
    checked = 0
    for run in RUNS:
        params_b = ENTRIES[run.id]["model"].get("params_b")
        if params_b is None or run.id in PARAMS_LABELS:
            continue
        assert _rel(cr.params(run.model) / 1e9, params_b) < 0.03, (run.id, cr.params(run.model) / 1e9, params_b)
        checked += 1
    assert checked >= 25
    assert set(PARAMS_LABELS) <= set(BY_ID)


def test_moe_active_params() -> None:
    run = BY_ID["mbridge_260401_deepseekv3_dgxb200_256gpu"]
    # MHA stands in for MLA (head_dim 56): 38.7B active vs the published 37B.
    assert _rel(cr.params(run.model, active=True) / 1e9, 37) < 0.05
    assert _rel(cr.params(run.model) / 1e9, 671) < 0.01


def test_params_by_hand() -> None:
    gpt = BY_ID["megatron_sc21_t2_zero3_175b_768gpu"].model  # tied GPT-3: 12 nl h^2 + V h + s h
    h = 12288
    assert cr.params(gpt) == 96 * 12 * h * h + 51200 * h + 2048 * h
    llama = BY_ID["mbridge_2511_llama3_8b_dgxh100_8gpu"].model
    h, kv = 4096, 8 * 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * 14336
    assert cr.params(llama) == 32 * per_layer + 2 * 128000 * h


def test_megatron_eq3_derivation() -> None:
    run = BY_ID["megatron_sc21_t1_7p5b_128gpu"]
    nl, h, s, v = 36, 4096, 2048, 51200
    flops_per_token = 96 * nl * h**2 * (1 + s / (6 * h) + v / (16 * nl * h))
    expected = 142e12 / flops_per_token
    assert run.tokens_per_sec_per_gpu == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(2216.3, abs=0.1)
    assert "eq.(3)" in run.derived
    # The HFU (46% of 312 TF/s) gives the same within rounding.
    assert dict(run.cross_checks)["hfu"] == pytest.approx(expected, rel=0.02)


def test_mfu_derivation() -> None:
    run = BY_ID["megascale_t2_megatronlm_175b_512gpu"]
    nl, h, s, v = 96, 12288, 2048, 64000
    n = nl * 12 * h * h + v * h  # matmul weights a token passes: layers + output projection
    expected = 0.499 * 312e12 / (6 * n + 12 * nl * h * s)
    assert dict(run.cross_checks)["mfu"] == pytest.approx(expected, rel=1e-9)
    # The step time is preferred and agrees: 768 x 2048 / 21.2 s / 512 GPUs.
    assert run.tokens_per_sec_per_gpu == pytest.approx(768 * 2048 / 21.2 / 512)
    assert _rel(expected, run.tokens_per_sec_per_gpu) < 0.01
    korthikanti = BY_ID["korthikanti_22b_8gpu_sp_selective"]
    nl, h = 48, 6144
    expected = 0.415 * 312e12 / (6 * (nl * 12 * h * h + 51200 * h) + 12 * nl * h * 2048)
    assert dict(korthikanti.cross_checks)["mfu"] == pytest.approx(expected, rel=1e-9)
    assert korthikanti.tokens_per_sec_per_gpu == pytest.approx(4 * 2048 / 1.1 / 8)


def test_model_tflops_derivation() -> None:
    run = BY_ID["megatron_h100_weak_70b_768gpu"]
    nl, h, s, v = 84, 8192, 4096, 131072
    expected = 419.7e12 / (6 * (nl * 12 * h * h + v * h) + 12 * nl * h * s)
    assert run.tokens_per_sec_per_gpu == pytest.approx(expected, rel=1e-9)
    assert dict(run.cross_checks)["mfu"] == pytest.approx(expected, rel=0.02)


def test_estimates_agree(capsys: pytest.CaptureFixture[str]) -> None:
    bad = []
    for run in RUNS:
        for method, value in run.cross_checks:
            err = _rel(value, run.tokens_per_sec_per_gpu)
            if err > 0.10:
                bad.append((run.id, method, value, run.tokens_per_sec_per_gpu, err))
    with capsys.disabled():
        for run_id, method, value, primary, err in bad:
            print(f"\n  {run_id}: {method} gives {value:.4g} tok/s/GPU vs {primary:.4g} ({err:.0%})")
    assert {b[0] for b in bad} <= set(CROSS_CHECK_KNOWN), bad
    assert sum(len(r.cross_checks) for r in RUNS) >= 25


def test_precision_mapping() -> None:
    fp8 = {r.id for r in RUNS if r.training.precision == "fp8"}
    for run_id in ("torchtitan_l31_8b_8gpu_cp1_seq32k", "nemo2407_llama2_13b_16gpu",
                   "mbridge_260401_deepseekv3_dgxb200_256gpu", "mbridge_2511_llama3_8b_dgxh100_8gpu"):
        assert run_id in fp8  # "bf16 + Float8 linears", "fp8", "MXFP8", "FP8-CS"
    for run_id in ("torchtitan_l31_8b_8gpu_fsdp_bf16", "mbridge_260401_gpt_oss_120b_dgxh100_64gpu",
                   "megatron_sc21_t1_7p5b_128gpu", "llmfoundry_mpt30b_a10080gb_8gpu"):
        assert run_id not in fp8
    assert any("precision=bf16" in a for a in BY_ID["megatron_sc21_t1_7p5b_128gpu"].assumptions)


def test_profiles() -> None:
    assert BY_ID["ultrascale_best_8b_512gpu"].profile == "h100_efa"
    titan = BY_ID["torchtitan_l31_8b_8gpu_fsdp_bf16"]
    assert (titan.profile, titan.gpu_memory_gib) == ("h100_96gb_500w", None)
    assert BY_ID["megascale_t2_megascale_175b_8192gpu"].profile == "a100_ib"
    assert BY_ID["mbridge_260401_deepseekv3_dgxgb200_256gpu"].profile == "gb200_nvl72"
    assert BY_ID["mbridge_260401_deepseekv3_dgxb200_256gpu"].profile == "b200_ib"
    assert BY_ID["nemo2407_llama3_70b_64gpu"].profile == "h100_ib"
    assert BY_ID["nemo2407_llama3_70b_64gpu"].gpu_memory_gib is None


def test_layout_details() -> None:
    titan = BY_ID["torchtitan_l31_405b_512gpu_fsdp8_tp8_pp8_interleaved_fp8"]
    assert (titan.layout.vpp, titan.layout.mbs, titan.layout.zero) == (2, 4, 3)
    assert BY_ID["korthikanti_530b_280gpu_fullrecompute"].layout.schedule == "interleaved_1f1b"
    assert BY_ID["megatron_sc21_t1_7p5b_128gpu"].layout.zero == 0
    assert BY_ID["nemo2407_nemotron_8b_64gpu"].layout.sp
    assert BY_ID["mbridge_2511_llama3_8b_dgxh100_8gpu"].layout.zero == 3
    assert BY_ID["megatron_h100_weak_70b_768gpu"].layout.recompute == "selective"
    moe = BY_ID["mbridge_260401_deepseekv3_dgxgb200_256gpu"]
    assert (moe.layout.ep, moe.layout.dp) == (64, 64)
    assert moe.model["vocab"] == 129280 and "mla" not in moe.model["moe"]


def _entry(**changes: dict) -> dict:
    entry = yaml.safe_load(yaml.safe_dump(ENTRIES["nemo2407_llama3_70b_64gpu"]))
    for section, values in changes.items():
        entry[section].update(values)
    return entry


def test_synthetic_skips() -> None:
    with pytest.raises(cr.SkipRun, match="TP/PP split"):
        cr.build_run(_entry(parallel={"tp": None}))
    with pytest.raises(cr.SkipRun, match="ep"):
        cr.build_run(_entry(parallel={"ep": 3}))
    with pytest.raises(cr.SkipRun, match="tokens/s"):
        cr.build_run(_entry(measured={"tflops_per_gpu": None, "tokens_per_sec_per_gpu": None}))
    with pytest.raises(cr.SkipRun, match="vocab"):
        cr.build_run(_entry(model={"vocab": None, "name": "Mystery 70B"}))
    with pytest.raises(cr.SkipRun, match="represented"):
        cr.build_run(_entry(model={"heads": 60}))
    run = cr.build_run(_entry(training={"global_batch_sequences": None, "global_batch_tokens": "1M"}))
    assert run.training.global_batch == 2**20 // 8192


def test_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({"runs": [ENTRIES["llmfoundry_mpt30b_a10080gb_8gpu"]]}))
    monkeypatch.setenv(cr.ENV_VAR, str(one))
    runs, skipped = cr.load_runs()
    assert [r.id for r in runs] == ["llmfoundry_mpt30b_a10080gb_8gpu"] and skipped == []


def test_summary_prints_every_run() -> None:
    out = io.StringIO()
    cr.summary(PATH, file=out)
    text = out.getvalue()
    for run in RUNS:
        assert run.id in text and run.layout.to_string() in text
    for run_id, reason in SKIPPED:
        assert f"{run_id}: {reason}" in text
