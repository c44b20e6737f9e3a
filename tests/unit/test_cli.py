"""The `plan` command end to end, in a subprocess: JSON contract, published sizes, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TOY = Path(__file__).parent / "capture" / "toy_models.py"


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoshard.planner.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def inspect_json(model: Path) -> tuple[dict, float, int]:
    """The --inspect --json object, wall time, and the child's peak RSS in bytes (Linux ru_maxrss is KiB)."""
    start = time.perf_counter()
    code = ("import resource, sys; from autoshard.planner.cli import main\n"
            "try:\n    main(sys.argv[1:])\nfinally:\n"
            "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, str(model), "--inspect", "--json"],
                         capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    rss_kib = int(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout), elapsed, rss_kib * 1024


def test_inspect_json_contract(specs):
    out = plan(specs / "tiny_llama.yaml", "--inspect", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)  # stdout is exactly one JSON object
    assert isinstance(d["params"], int) and d["params"] == 205_376
    assert d["blocks"] == 4 and d["capture_method"] == "hooks"
    assert d["flops_per_token"] > 6 * d["params"] * 0.5
    assert d["cut_points"][0] == "tok_embeddings|layers.0"


def test_inspect_text(specs):
    out = plan(specs / "tiny_moe.yaml", "--inspect")
    assert out.returncode == 0, out.stderr
    for needle in ("capture      hooks", "pipeline cuts", "MoE          4 experts, top-2, 1 shared", "x3"):
        assert needle in out.stdout


@pytest.mark.parametrize(("spec", "published"), [
    ("llama3_405b.yaml", 405.85e9),  # Llama 3 paper / model card
    ("mixtral_8x7b.yaml", 46.70e9),  # Mistral AI, Mixtral of Experts (arXiv:2401.04088)
])
def test_published_sizes_from_spec(specs, spec, published):
    d, elapsed, rss = inspect_json(specs / spec)
    print(f"{spec}: {d['params']:.4e} params, {elapsed:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
    assert abs(d["params"] / published - 1) < 0.005
    assert rss < 2 * 2**30  # a 405B model is captured without its weights


@pytest.mark.parametrize(("folder", "published", "blocks"), [
    ("llama31_405b", 405.85e9, 126),
    ("mixtral_8x7b", 46.70e9, 32),
])
def test_published_sizes_from_hf_config(hf_configs, folder, published, blocks):
    d, elapsed, rss = inspect_json(hf_configs / folder)
    print(f"{folder}: {d['params']:.4e} params, {elapsed:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
    assert abs(d["params"] / published - 1) < 0.005
    assert d["blocks"] == blocks
    assert d["capture_method"] == "export" and "fx" in d["capture_failures"]


def test_hf_tiny_llama_structure(hf_configs):
    out = plan(hf_configs / "tiny_llama" / "config.json", "--inspect", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    block = next(u for u in d["units"] if u["kind"] == "block")
    assert block["attention"]["heads"] == 4 and block["attention"]["kv_heads"] == 2
    assert [n.rsplit(".", 1)[1] for n in block["attention"]["column"]] == ["q_proj", "k_proj", "v_proj"]
    assert [n.rsplit(".", 1)[1] for n in block["mlp"]["row"]] == ["down_proj"]


# ------------------------------------------------------------------ bad input: exit 2, one paragraph


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def assert_user_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ")
    assert out.stdout == ""
    for needle in needles:
        assert needle in out.stderr.replace("\n", " "), out.stderr


def test_missing_file(tmp_path):
    assert_user_error(plan(tmp_path / "nope.py", "--inspect"), "no such file", "build_model()")


def test_unknown_extension(tmp_path):
    assert_user_error(plan(write(tmp_path, "model.txt", "x"), "--inspect"), "unknown kind", "spec .yaml")


def test_model_py_without_build_model(tmp_path):
    path = write(tmp_path, "model.py", "import torch\n")
    assert_user_error(plan(path, "--inspect"), "no build_model()")


def test_model_py_that_raises_on_import(tmp_path):
    path = write(tmp_path, "model.py", "raise RuntimeError('boom at import')\n")
    assert_user_error(plan(path, "--inspect"), "boom at import")


def test_build_model_that_raises(tmp_path):
    path = write(tmp_path, "model.py", """
        def build_model():
            raise ValueError("checkpoint not found")
    """)
    assert_user_error(plan(path, "--inspect"), "build_model() raised", "checkpoint not found")


def test_model_that_reads_values_on_meta(tmp_path):
    path = write(tmp_path, "model.py", f"""
        import sys
        sys.path.insert(0, {str(TOY.parent)!r})
        from toy_models import ValueBranchStack
        def build_model():
            return ValueBranchStack()
    """)
    assert_user_error(plan(path, "--inspect"), "meta device", ".item()")


def test_model_py_with_example_inputs(tmp_path):
    path = write(tmp_path, "model.py", f"""
        import sys, torch
        sys.path.insert(0, {str(TOY.parent)!r})
        from toy_models import MLPStack
        def build_model():
            return MLPStack(vocab=100, h=16, layers=2)
        def example_inputs(micro_batch, seq_len):
            return torch.randint(0, 100, (micro_batch, seq_len))
    """)
    out = plan(path, "--inspect", "--json", "--seq-len", "8", "--micro-batch", "2")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["blocks"] == 2 and d["micro_batch"] == 2 and d["seq_len"] == 8


BASE = {"name": "t", "layers": 2, "hidden": 64, "ffn_hidden": 128, "heads": 4, "kv_heads": 2, "vocab": 100}


@pytest.mark.parametrize(("change", "needle"), [
    ({"hidden": 66}, "hidden"),                     # not divisible by heads
    ({"kv_heads": 3}, "kv_heads"),                  # does not divide heads
    ({"layers": -2}, "layers"),                     # negative size
    ({"vocab": None}, "vocab"),                     # missing required field
    ({"moe": {"experts": 4, "top_k": 8, "expert_ffn_hidden": 32}}, "top_k"),
    ({"hidden": "big"}, "hidden"),                  # wrong type
])
def test_bad_spec(tmp_path, change, needle):
    import yaml

    model = {**BASE, **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    assert_user_error(plan(path, "--inspect"), needle, "spec.yaml")


def test_spec_that_is_not_yaml(tmp_path):
    out = plan(write(tmp_path, "spec.yaml", "model: [unclosed\n"), "--inspect")
    assert_user_error(out, "spec.yaml")


def test_bad_flag_value(specs):
    assert_user_error(plan(specs / "tiny_llama.yaml", "--inspect", "--micro-batch", "0"), "--micro-batch")


def test_debug_shows_the_traceback(tmp_path):
    out = plan(tmp_path / "nope.py", "--inspect", "--debug")
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_planning_needs_gpus_and_profile(specs):
    assert_user_error(plan(specs / "tiny_llama.yaml"), "--gpus", "--profile", "--inspect")


# ------------------------------------------------------------------ estimate one full layout


FULL = "tp=2,pp=2,vpp=1,cp=1,ep=1,dp=2,zero=1,mbs=1,recompute=selective"


def test_estimate_json_contract(specs):
    out = plan(specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "h100_ib", "--layout", FULL,
               "--global-batch", "16", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["layout"] == {"tp": 2, "pp": 2, "vpp": 1, "cp": 1, "ep": 1, "dp": 2, "zero": 1, "micro_batch": 1,
                           "recompute": "selective", "schedule": "1f1b", "sequence_parallel": True,
                           "async_tp": False}
    p = d["predicted"]
    for key in ("step_time_s", "tokens_per_sec_per_gpu", "mfu", "peak_memory_gib", "memory_capacity_gib"):
        assert p[key] > 0
    assert p["fits"] is True and d["solve_time_s"] >= 0
    assert p["tokens_per_sec_per_gpu"] == pytest.approx(16 * 32 / p["step_time_s"] / 8, rel=1e-5)  # 6 digits kept


def test_estimate_text_and_memory_override(specs):
    out = plan(specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "H100_IB", "--layout", FULL,
               "--global-batch", "16", "--gpu-memory-gib", "96")
    assert out.returncode == 0, out.stderr
    assert "of 96 GiB" in out.stdout and "tokens/s/GPU" in out.stdout


def test_unknown_profile_lists_the_valid_ones(specs):
    out = plan(specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "tpu_v5", "--layout", FULL)
    assert_user_error(out, "tpu_v5", "h100_ib", "a100_ib", "gb200_nvl72")


def test_partial_layout_fixes_those_keys(specs, tmp_path):
    out = plan(specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "h100_ib", "--layout", "tp=2,zero=3",
               "--global-batch", "16", "--json", "-o", tmp_path / "plan.yaml")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["layout"]["tp"] == 2 and d["layout"]["zero"] == 3
    assert (tmp_path / "plan.yaml").read_text().startswith("#")


def test_layout_for_another_gpu_count(specs):
    out = plan(specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "h100_ib", "--global-batch", "16",
               "--layout", "tp=2,pp=2,vpp=1,cp=1,ep=1,dp=4,zero=1,mbs=1,recompute=none")
    assert_user_error(out, "16", "8 GPUs")


def test_layout_that_does_not_fit_exits_3(specs):
    out = plan(specs / "llama3_8b.yaml", "--gpus", "8", "--profile", "h100_ib", "--global-batch", "64",
               "--layout", "tp=1,pp=1,vpp=1,cp=1,ep=1,dp=8,zero=0,mbs=8,recompute=none", "--json")
    assert out.returncode == 3, out.stderr
    assert json.loads(out.stdout)["predicted"]["fits"] is False
    assert "GiB over" in out.stderr and "ZeRO" in out.stderr


def test_cli_flags_are_frozen():
    """New flags are a contract change: update ARCHITECTURE.md and this list together."""
    from autoshard.planner.cli import build_parser

    flags = sorted(o for a in build_parser()._actions for o in a.option_strings)
    assert flags == sorted([
        "-h", "--help", "--inspect", "--gpus", "--profile", "--gpu-memory-gib", "--layout", "--global-batch",
        "--precision", "--json", "--micro-batch", "--seq-len", "--debug", "-o", "--output",
        "--report", "--export", "--quiet", "--framework", "--grad-reduce", "--no-cache",
    ])


def test_bad_report_and_export_flags(specs, tmp_path):
    common = [specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "h100_ib", "--global-batch", "16"]
    assert_user_error(plan(*common, "--report", tmp_path / "plan.pdf"), "--report", ".html", ".png")
    assert_user_error(plan(*common, "--export", "torchtitan"), "--export torchtitan", "-o")
    assert_user_error(plan(*common, "--report", tmp_path / "missing" / "r.html"), "does not exist")


def test_report_from_the_command_line(specs, tmp_path):
    out = plan(specs / "tiny_llama.yaml", "--gpus", "8", "--profile", "h100_ib", "--global-batch", "16", "--json",
               "--layout", "tp=2,pp=2", "--report", tmp_path / "plan.html", "--quiet")
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)  # still exactly one JSON object
    assert "Pipeline schedule" in (tmp_path / "plan.html").read_text()


def test_explain_and_diff_from_the_command_line(specs, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    common = ["--gpus", "8", "--profile", "h100_ib", "--global-batch", "16"]
    assert plan(specs / "tiny_llama.yaml", *common, "-o", a).returncode == 0
    assert plan(specs / "tiny_llama.yaml", *common, "--layout", "tp=2", "-o", b).returncode == 0
    out = plan("explain", a)
    assert out.returncode == 0 and "tp=" in out.stdout and "dp=" in out.stdout
    out = plan("diff", a, b)
    assert out.returncode == 0 and "tp" in out.stdout
    assert "identical" in plan("diff", a, a).stdout


def test_explain_bad_plan_files(tmp_path):
    assert_user_error(plan("explain", tmp_path / "missing.yaml"), "no such plan file")
    bad = write(tmp_path, "bad.yaml", "schema_version: 99\n")
    assert_user_error(plan("explain", bad), "schema_version")


def test_grad_reduce_changes_megatron_gradient_memory(tmp_path):
    """--grad-reduce bf16 (Megatron's --grad-reduce-in-bf16) halves the gradient buffer of the fp32 default,
    and the plan records it."""
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "autoshard.planner.cli", "examples/specs/llama3_8b.yaml", "--gpus", "8",
            "--profile", "h100_ib", "--global-batch", "8", "--framework", "megatron", "--layout",
            "tp=1,pp=1,cp=1,ep=1,dp=8,zero=1,mbs=1,recompute=full", "--json", "--quiet"]
    out = {g: json.loads(subprocess.run(args + (["--grad-reduce", g] if g else []), capture_output=True,
                                        text=True, check=True).stdout) for g in (None, "bf16")}
    grads = {g: o["predicted"]["memory_breakdown_gib"]["gradients"] for g, o in out.items()}
    assert grads["bf16"] == pytest.approx(grads[None] / 2, rel=1e-3)  # the JSON rounds to 4 decimals
    assert out["bf16"]["training"]["grad_reduce"] == "bf16" and "grad_reduce" not in out[None]["training"]
