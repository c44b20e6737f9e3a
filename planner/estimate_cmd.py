"""`plan MODEL --gpus N --profile P --layout <full layout>`: price one layout with the cost model.

Until the planner lands (issue 5), every degree must be given; a partial layout says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from autoshard.cost_models.estimate import Estimate, estimate
from autoshard.cost_models.layout import Layout, Training, complete, parse_layout
from autoshard.hardware_profiles import UnknownProfileError, load_profile

from .errors import UserError

REQUIRED = ("tp", "pp", "vpp", "cp", "ep", "dp", "zero", "mbs", "recompute")
EXIT_DOES_NOT_FIT = 3


def run_estimate(args: argparse.Namespace) -> int:
    from .capture import capture
    from .loading import load_model

    try:
        profile = load_profile(args.profile, gpu_memory_gib=args.gpu_memory_gib)
    except (UnknownProfileError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    layout = _layout(args)
    loaded = load_model(args.model)
    training = _training(args, loaded, layout)
    start = time.perf_counter()
    graph = capture(loaded, 1, training.seq_len)
    try:
        est = estimate(graph, layout, training, profile)
    except ValueError as exc:
        raise UserError(f"layout {layout.to_string()} cannot run this model: {exc}.") from exc
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(to_json(est, elapsed), sort_keys=True))
    else:
        print(format_estimate(est))
    if not est.fits:
        over = (est.peak_memory_bytes - est.memory_capacity_bytes) / 2**30
        print(f"error: this layout does not fit: {est.peak_memory_bytes / 2**30:.1f} GiB per GPU on stage "
              f"{est.peak_stage} against {est.memory_capacity_bytes / 2**30:.1f} GiB ({over:.1f} GiB over). "
              "Try a higher ZeRO stage, recompute=full, more pipeline stages or more GPUs.", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


def _layout(args: argparse.Namespace) -> Layout:
    try:
        given = parse_layout(args.layout or "")
    except ValueError as exc:
        raise UserError(f"--layout: {exc}.") from exc
    if args.micro_batch is not None:
        given.setdefault("mbs", args.micro_batch)
    missing = [k for k in REQUIRED if k not in given]
    if missing:
        raise UserError(
            f"--layout is missing {', '.join(missing)}. Choosing the missing degrees is the planner's job, "
            f"which is not available yet in this version; give a full layout to estimate it, e.g. "
            f"--layout tp=8,pp=1,vpp=1,cp=1,ep=1,dp={max(1, args.gpus // 8)},zero=1,mbs=1,recompute=selective."
        )
    try:
        return complete(given, args.gpus)
    except ValueError as exc:
        raise UserError(f"--layout: {exc}.") from exc


def _training(args: argparse.Namespace, loaded: Any, layout: Layout) -> Training:
    spec_training = loaded.training
    batch = args.global_batch or getattr(spec_training, "global_batch_sequences", None)
    if batch is None:
        raise UserError(f"give --global-batch (sequences per optimizer step), e.g. --global-batch "
                        f"{layout.dp * layout.mbs * 8}; the model names none.")
    seq_len = args.seq_len or loaded.seq_len
    precision = args.precision or getattr(spec_training, "precision", None) or "bf16"
    try:
        return Training(global_batch=batch, seq_len=seq_len, precision=precision)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def layout_json(layout: Layout) -> dict[str, Any]:
    """The layout object of ARCHITECTURE.md's JSON."""
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "ep": layout.ep,
            "dp": layout.dp, "zero": layout.zero, "micro_batch": layout.mbs, "recompute": layout.recompute,
            "schedule": layout.schedule, "sequence_parallel": layout.sp}


def to_json(est: Estimate, solve_time_s: float) -> dict[str, Any]:
    return {"layout": layout_json(est.layout), "predicted": est.predicted(), "solve_time_s": solve_time_s,
            "profile": est.profile, "training": {"global_batch": est.training.global_batch,
                                                  "seq_len": est.training.seq_len,
                                                  "precision": est.training.precision}}


def format_estimate(est: Estimate) -> str:
    gib = 2**30
    lines = [
        f"layout       {est.layout.to_string()}",
        f"profile      {est.profile}   {est.layout.gpus} GPUs   {est.micro_batches} micro-batches per step",
        f"step time    {est.step_time_s:.3f} s   {est.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU   "
        f"MFU {est.mfu:.1%}   HFU {est.hfu:.1%}",
        f"memory       {est.peak_memory_bytes / gib:.1f} GiB of {est.memory_capacity_bytes / gib:.1f} GiB "
        f"per GPU (stage {est.peak_stage}) {'fits' if est.fits else 'DOES NOT FIT'}",
        "time         " + ", ".join(f"{k} {v:.3f}s" for k, v in est.time_breakdown.items() if v > 0),
        "memory       " + ", ".join(f"{k} {v / gib:.1f}" for k, v in est.memory_breakdown.items()) + " GiB",
    ]
    return "\n".join(lines)
