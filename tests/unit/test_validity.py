"""Validity rules: only what the frameworks enforce, each broken rule named (never blamed on memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autoshard.cost_models.layout import Layout, Training
from autoshard.cost_models.validity import layout_errors
from autoshard.planner.capture import capture

SPECS = Path(__file__).resolve().parents[2] / "examples" / "specs"


@pytest.fixture(scope="module")
def llama():
    return capture(SPECS / "tiny_llama.yaml", 1, 64)


def test_a_valid_layout_breaks_no_rule(llama):
    assert layout_errors(llama, Layout(tp=2, pp=2, dp=2), Training(global_batch=8, seq_len=64)) == []


@pytest.mark.parametrize(("layout", "rule"), [
    (Layout(dp=3), "whole micro-batches"),
    (Layout(pp=4, vpp=3, schedule="interleaved_1f1b"), "one block per model chunk"),
    (Layout(tp=3), "whole attention heads"),
    (Layout(cp=3), "context-parallel chunks"),
])
def test_each_rule_is_named(llama, layout, rule):
    errors = layout_errors(llama, layout, Training(global_batch=8, seq_len=64))
    assert any(rule in e for e in errors), errors


def test_uneven_interleaving_is_valid(llama):
    """vpp need not divide the blocks evenly: Megatron's uneven first/last stages and torch's splits take it."""
    blocks = len(llama.blocks)
    layout = Layout(pp=2, vpp=blocks // 2 - 1 if blocks > 4 else 1, schedule="interleaved_1f1b")
    assert layout_errors(llama, layout, Training(global_batch=8, seq_len=64)) == []


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoshard.planner.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_fixed_keys_outside_the_search_grid_are_honoured():
    """vpp=3 and mbs=3 are not degrees the search tries on its own; given, they are priced, not refused."""
    out = _plan(str(SPECS / "gpt3_175b.yaml"), "--gpus", "64", "--profile", "a100_ib", "--global-batch", "384",
                "--layout", "tp=8,pp=8,vpp=3,mbs=3", "--json", "--quiet")
    assert out.returncode == 0, out.stderr
    import json

    layout = json.loads(out.stdout)["layout"]
    assert (layout["vpp"], layout["micro_batch"]) == (3, 3)


def test_an_invalid_fixed_layout_names_the_rule_not_memory():
    out = _plan(str(SPECS / "llama3_8b.yaml"), "--gpus", "64", "--profile", "h100_ib", "--global-batch", "256",
                "--layout", "tp=3", "--quiet")
    assert out.returncode == 2, out.stderr
    assert "tp(3)" in out.stderr and "fit" not in out.stderr


def test_framework_changes_selective_memory():
    """torchtitan's op-level selective AC keeps less than the attention-core policy on a Llama block."""
    from autoshard.cost_models.estimate import estimate
    from autoshard.hardware_profiles import load_profile

    graph = capture(SPECS / "llama3_8b.yaml", 1, 8192)
    layout = Layout(dp=8, zero=3, mbs=1, recompute="selective")
    mem = {fw: estimate(graph, layout, Training(global_batch=8, seq_len=8192, framework=fw),
                        load_profile("h100_ib")).memory_breakdown["activations"] for fw in ("torch", "torchtitan")}
    assert mem["torchtitan"] < 0.7 * mem["torch"]


def test_torch_interleaved_rounds_are_a_framework_rule(llama):
    """torch's ScheduleInterleaved1F1B runs m micro-batches in rounds of max(1, m // pp): 9 on pp=2 is not a
    multiple of 4 rounds; Megatron-Core takes it. Named, under the frameworks that run torch's schedules."""
    layout = Layout(pp=2, vpp=2, dp=1, schedule="interleaved_1f1b")
    torch_run = Training(global_batch=9, seq_len=64)
    assert any("interleaved rounds" in e for e in layout_errors(llama, layout, torch_run))
    assert layout_errors(llama, layout, Training(global_batch=9, seq_len=64, framework="megatron")) == []


@pytest.mark.parametrize(("framework", "layout", "rule"), [
    ("nanotron", Layout(dp=8, zero=3), "ZeRO stages of nanotron: it runs 0, 1, not 3"),
    ("megatron", Layout(dp=8, zero=2), "ZeRO stages of megatron: it runs 0, 1, 3, not 2"),
    ("torchtitan", Layout(dp=8, zero=1), "ZeRO stages of torchtitan: it runs 0, 2, 3, not 1"),
    ("nanotron", Layout(pp=2, vpp=2, dp=4, schedule="interleaved_1f1b"), "no interleaved pipeline schedule"),
    ("deepspeed", Layout(pp=2, dp=4, zero=2), "deepspeed runs ZeRO up to stage 1 with pipeline parallelism"),
    ("megatron_2023", Layout(cp=2, dp=4), "megatron_2023 has no context parallelism: cp must be 1, got 2"),
    ("megatron_2023", Layout(dp=8, zero=3), "ZeRO stages of megatron_2023: it runs 0, 1, not 3"),
    ("torch_fsdp", Layout(tp=2, dp=4), "torch_fsdp has no tensor parallelism: tp must be 1, got 2 "
                                       "(it runs data parallelism only)"),
    ("deepspeed", Layout(cp=2, dp=4), "deepspeed has no context parallelism"),
    ("megatron_2023", Layout(pp=3, dp=1), "even pipeline chunks (megatron_2023): the 4 blocks must be divisible "
                                          "by pp(3) x vpp(1) = 3"),
])
def test_what_a_framework_cannot_run_is_named(llama, framework, layout, rule):
    """framework.py's capabilities, from each framework's own code (nanotron's zero_stage and pipeline
    engines, Megatron's optimizers, torchtitan's FSDP2 modes, DeepSpeed's PipelineEngine assert)."""
    errors = layout_errors(llama, layout, Training(global_batch=8, seq_len=64, framework=framework))
    assert any(rule in e for e in errors), errors


def test_the_search_only_proposes_what_the_framework_runs():
    """Planned under nanotron, no ZeRO-2/3 and no interleaving is chosen; under torch the same model may."""
    from autoshard.hardware_profiles import load_profile
    from autoshard.planner.search.layouts import search

    graph = capture(SPECS / "llama3_8b.yaml", 1, 4096)
    result = search(graph, 64, Training(global_batch=64, seq_len=4096, framework="nanotron"), load_profile("h100_ib"))
    assert result.ranked
    assert all(c.layout.zero in (0, 1) and c.layout.vpp == 1 for c in result.ranked)


@pytest.mark.parametrize(("framework", "allowed"), [("torch_fsdp", set()), ("megatron_2023", {"tp", "pp"})])
def test_the_search_only_tries_the_parallelisms_the_framework_has(framework, allowed):
    """llm-foundry's FSDP runs plan as data parallelism only; Megatron-LM of 2021-2023 never gets cp > 1."""
    from autoshard.hardware_profiles import load_profile
    from autoshard.planner.search.layouts import search

    graph = capture(SPECS / "llama3_8b.yaml", 1, 4096)
    result = search(graph, 64, Training(global_batch=64, seq_len=4096, framework=framework), load_profile("h100_ib"))
    assert result.ranked
    used = {dim for c in result.ranked for dim in ("tp", "pp", "cp", "ep") if getattr(c.layout, dim) > 1}
    assert used <= allowed, used
