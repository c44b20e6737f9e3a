"""The Llama-3.1-405B plan on 16,384 H100s and a Mixtral 8x7B plan, exported to torchtitan (TOML), Megatron-LM
(arguments) and DeepSpeed (JSON) and parsed back with each format's own parser, every value checked against the
plan; and the 405B HTML report opened in headless Chromium (no console errors, charts drawn)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from autoshard.planner.api import plan
from autoshard.planner.outputs.export import chunks, export_plan
from autoshard.planner.outputs.report import render_html

SPECS = Path(__file__).resolve().parents[2] / "examples" / "specs"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def plans():
    """Each plan once per module (the 405B search takes ~10-20 s)."""
    return {
        "405b": plan(SPECS / "llama3_405b.yaml", gpus=16384, profile="h100_ib", global_batch=2048),
        "mixtral": plan(SPECS / "mixtral_8x7b.yaml", gpus=256, profile="h100_ib", global_batch=512),
    }


NAMES = ["405b", "mixtral"]


def test_chunks_cover_the_blocks_in_order(plans):
    for p in plans.values():
        blocks = [b for c in chunks(p) for b in c]
        assert blocks == [f"layers.{i}" for i in range(p.model["blocks"])]
        assert len(chunks(p)) == p.layout["pp"] * p.layout["vpp"]


@pytest.mark.parametrize("name", NAMES)
def test_torchtitan(plans, name):
    p = plans[name]
    lay, t = p.layout, p.training
    exported = export_plan(p, "torchtitan")
    cfg = tomllib.loads(exported.text)
    par = cfg["parallelism"]
    sharded = lay["zero"] > 0
    assert par["data_parallel_shard_degree"] == (lay["dp"] if sharded else 1)
    assert par["data_parallel_replicate_degree"] == (1 if sharded else lay["dp"])
    assert par["fsdp_reshard_after_forward"] == ("never" if lay["zero"] in (1, 2) else "default")
    assert par["tensor_parallel_degree"] == lay["tp"]
    assert par["pipeline_parallel_degree"] == lay["pp"]
    assert par["context_parallel_degree"] == lay["cp"]
    assert par["expert_parallel_degree"] == lay["ep"]
    assert par["enable_async_tensor_parallel"] == lay["async_tp"]
    assert (par["data_parallel_replicate_degree"] * par["data_parallel_shard_degree"] * par["tensor_parallel_degree"]
            * par["pipeline_parallel_degree"] * par["context_parallel_degree"]) == p.gpus
    if lay["pp"] > 1:
        assert par["pipeline_parallel_schedule"] == {"1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B",
                                                     "gpipe": "GPipe", "zb_interleaved": "InterleavedZeroBubble",
                                                     "zbv": "ZBVZeroBubble"}[lay["schedule"]]
        assert par["pipeline_parallel_microbatch_size"] == lay["micro_batch"]
        starts = [c[0] for c in chunks(p)]
        assert par["pipeline_parallel_split_points"] == starts[1:]  # one split per chunk boundary
        assert len(par["pipeline_parallel_split_points"]) == lay["pp"] * lay["vpp"] - 1
        assert cfg["training"]["local_batch_size"] == t["global_batch"] // lay["dp"]
        assert cfg["training"]["local_batch_size"] // lay["micro_batch"] == p.predicted["micro_batches"]
    else:
        assert "pipeline_parallel_split_points" not in par
        assert cfg["training"]["local_batch_size"] == lay["micro_batch"]
    assert cfg["training"]["global_batch_size"] == t["global_batch"]
    assert cfg["training"]["seq_len"] == t["seq_len"]
    assert cfg["activation_checkpoint"]["mode"] == lay["recompute"]
    if lay["zero"] in (1, 2):
        assert any("ZeRO-1/2" in c for c in exported.cannot_express)
        assert "# cannot express:" in exported.text


def megatron_args(text: str) -> argparse.Namespace:
    body = text[text.index("MEGATRON_PARALLEL_ARGS=(") + len("MEGATRON_PARALLEL_ARGS=("): text.rindex(")")]
    parser = argparse.ArgumentParser()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
                 "--expert-model-parallel-size", "--expert-tensor-parallel-size", "--micro-batch-size",
                 "--global-batch-size", "--seq-length", "--num-layers", "--num-layers-per-virtual-pipeline-stage",
                 "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers", "--recompute-num-layers"):
        parser.add_argument(flag, type=int)
    for flag in ("--pipeline-model-parallel-layout", "--recompute-granularity", "--recompute-method", "--fp8-format"):
        parser.add_argument(flag)
    for flag in ("--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce",
                 "--overlap-param-gather", "--bf16", "--tp-comm-overlap"):
        parser.add_argument(flag, action="store_true")
    return parser.parse_args(shlex.split(body, comments=True))  # unknown arguments fail here


def layout_chunks(layout: str) -> list[int]:
    """Blocks per chunk of a --pipeline-model-parallel-layout string (no group repeats)."""
    out = []
    for part in layout.split("|"):
        m = re.fullmatch(r"E?t(?:\*(\d+))?L?", part)
        assert m, part
        out.append(int(m.group(1) or 1))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_megatron(plans, name):
    p = plans[name]
    lay, t = p.layout, p.training
    exported = export_plan(p, "megatron")
    a = megatron_args(exported.text)
    assert a.tensor_model_parallel_size == lay["tp"]
    assert a.pipeline_model_parallel_size == lay["pp"]
    assert a.context_parallel_size == lay["cp"]
    assert (a.expert_model_parallel_size or 1) == lay["ep"]
    if lay["ep"] > 1:
        assert a.expert_tensor_parallel_size == lay["tp"]
    assert a.sequence_parallel == (lay["tp"] > 1 and lay["sequence_parallel"])
    assert a.use_distributed_optimizer == (lay["zero"] >= 1)
    assert a.micro_batch_size == lay["micro_batch"] and a.global_batch_size == t["global_batch"]
    assert a.seq_length == t["seq_len"] and a.num_layers == p.model["blocks"] and a.bf16
    assert a.fp8_format == ("hybrid" if t["precision"] == "fp8" else None)
    assert a.recompute_granularity == (None if lay["recompute"] == "none" else lay["recompute"])
    sizes = [len(c) for c in chunks(p)]
    if a.pipeline_model_parallel_layout:
        assert layout_chunks(a.pipeline_model_parallel_layout) == sizes
        assert a.pipeline_model_parallel_layout.startswith("E") and a.pipeline_model_parallel_layout.endswith("L")
    elif lay["pp"] > 1 and lay["vpp"] > 1:
        assert a.num_layers_per_virtual_pipeline_stage == sizes[0] and len(set(sizes)) == 1
    elif lay["pp"] > 1:
        assert (a.decoder_first_pipeline_num_layers or sizes[1]) == sizes[0]
        assert (a.decoder_last_pipeline_num_layers or sizes[1]) == sizes[-1]
    # data parallel size Megatron derives: world / (tp x pp x cp)
    assert p.gpus // (a.tensor_model_parallel_size * a.pipeline_model_parallel_size * a.context_parallel_size) \
        == lay["dp"]


@pytest.mark.parametrize("name", NAMES)
def test_deepspeed(plans, name):
    p = plans[name]
    lay, t = p.layout, p.training
    exported = export_plan(p, "deepspeed")
    cfg = json.loads(exported.text)
    assert cfg["train_batch_size"] == t["global_batch"]
    assert cfg["train_micro_batch_size_per_gpu"] == lay["micro_batch"]
    assert cfg["gradient_accumulation_steps"] == t["global_batch"] // (lay["micro_batch"] * lay["dp"])
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * lay["dp"] == t["global_batch"]
    assert cfg["zero_optimization"]["stage"] == lay["zero"]
    assert cfg["bf16"] == {"enabled": True}
    if lay["pp"] > 1:
        assert cfg["pipeline"]["stages"] == lay["pp"]
        assert cfg["pipeline"]["activation_checkpoint_interval"] == (1 if lay["recompute"] == "full" else 0)
    else:
        assert "pipeline" not in cfg
    for degree in ("tp", "cp", "ep"):
        said = any(c.startswith(f"{degree}=") for c in exported.cannot_express)
        assert said == (lay[degree] > 1), degree  # DeepSpeed's config has none of these
    assert [c for c in cfg["_comment"] if c.startswith("cannot express")] == \
        [f"cannot express: {c}" for c in exported.cannot_express]


def test_export_from_the_command_line(tmp_path):
    """--export writes -o, says on stderr what it cannot express; without -o it is bad input."""
    cli = [sys.executable, "-m", "autoshard.planner.cli", str(SPECS / "tiny_moe.yaml"), "--gpus", "8",
           "--profile", "h100_ib", "--global-batch", "16", "--layout", "tp=1,pp=1,cp=1,ep=2,dp=8", "--quiet"]
    out = subprocess.run([*cli, "--export", "deepspeed", "-o", tmp_path / "ds.json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "ds.json").read_text())["train_batch_size"] == 16
    assert "note: deepspeed cannot express ep=" in out.stderr
    bad = subprocess.run([*cli, "--export", "megatron"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --export megatron") and bad.stdout == ""


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (Debian package chromium; "
                    ".ci/run installs it): the report's browser test needs it")
def test_report_in_headless_chromium(plans, tmp_path):
    from matplotlib import image

    page = tmp_path / "plan.html"
    page.write_text(render_html(plans["405b"], gpus_per_node=8))
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           "--window-size=1400,3000", f"--screenshot={shot}", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1400)
    assert (pixels < 0.9).any(axis=-1).mean() > 0.05  # not blank
    rgb = (pixels * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(c) for c in rgb[:: 7].tolist()}
    assert len(colours) > 50
    # the forward blue (timeline), backward green and the bubble's pink are on screen
    for want in ((76, 114, 176), (85, 168, 104), (244, 199, 195)):
        assert any(all(abs(c[i] - want[i]) <= 3 for i in range(3)) for c in colours), want
