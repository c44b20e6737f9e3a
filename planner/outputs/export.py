"""A plan as another framework's own configuration: torchtitan (TOML), Megatron-LM (command-line
arguments) and DeepSpeed (JSON). Each export lists what the framework cannot express, in the file (a
comment, or the JSON's "_comment") and for the caller to print on stderr.

Names used, and where they come from:
- torchtitan: `torchtitan/config/job_config.py` (pytorch/torchtitan @000204a4): [parallelism]
  data_parallel_replicate_degree, data_parallel_shard_degree, fsdp_reshard_after_forward,
  tensor_parallel_degree, enable_async_tensor_parallel, pipeline_parallel_degree,
  pipeline_parallel_schedule (torch.distributed.pipelining names: 1F1B, Interleaved1F1B, GPipe,
  InterleavedZeroBubble, ZBVZeroBubble),
  pipeline_parallel_split_points, pipeline_parallel_microbatch_size, context_parallel_degree,
  expert_parallel_degree; [activation_checkpoint] mode, selective_ac_option; [training] local_batch_size,
  global_batch_size, seq_len, mixed_precision_param.
- Megatron-LM: `megatron/training/arguments.py`; uneven pipelines with --decoder-first/last-pipeline-num-layers
  or, for any split, Megatron-Core's --pipeline-model-parallel-layout ("Et*3|t*3|...|tL": E embedding,
  t a transformer layer, L the loss head, '|' ends a virtual stage, chunk i on pipeline rank i mod pp).
  Megatron's default rank order (tp-cp-ep-dp-pp, TP fastest) is the plan's.
- DeepSpeed: `deepspeed/runtime/config.py` (train_batch_size, train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, bf16, zero_optimization, pipeline {stages, partition,
  activation_checkpoint_interval}, activation_checkpointing).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from autoshard.cost_models.pipeline import chunk_stage
from autoshard.planner.outputs.plan import Plan

FRAMEWORKS = ("torchtitan", "megatron", "deepspeed")
TITAN_SCHEDULES = {"1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B", "gpipe": "GPipe",
                   "zb_interleaved": "InterleavedZeroBubble", "zbv": "ZBVZeroBubble"}


@dataclass(kw_only=True, slots=True)
class Export:
    framework: str
    text: str
    cannot_express: list[str] = field(default_factory=list)
    """One sentence each: what of the plan the framework's configuration cannot say."""


def export_plan(plan: Plan, framework: str) -> Export:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    return {"torchtitan": to_torchtitan, "megatron": to_megatron, "deepspeed": to_deepspeed}[framework](plan)


# ---------------------------------------------------------------------------------------------- the split


def chunks(plan: Plan) -> list[list[str]]:
    """Block FQNs per model chunk, chunk c = virtual stage c (on pipeline rank c mod pp, or in a V under zbv),
    from the stages' units: a stage's blocks form vpp runs of consecutive indices, its chunks in order."""
    p, v = plan.layout["pp"], plan.layout["vpp"]
    out: list[list[str]] = [[] for _ in range(p * v)]
    for stage in plan.stages:
        runs: list[list[str]] = []
        for name in (u for u in stage.units if _index(u) is not None):
            if runs and _index(runs[-1][-1]) == _index(name) - 1:
                runs[-1].append(name)
            else:
                runs.append([name])
        if len(runs) != v:  # adjacent chunks on one rank (pp = 1): split the run evenly
            flat = [b for r in runs for b in r]
            size, extra = divmod(len(flat), v)
            runs, start = [], 0
            for i in range(v):
                n = size + (1 if i >= v - extra else 0)
                runs.append(flat[start:start + n])
                start += n
        # the stage's chunks in model order (c mod p, or a V under zbv: cost_models/pipeline.chunk_stage)
        mine = [c for c in range(p * v) if chunk_stage(c, p, plan.layout.get("schedule", "1f1b")) == stage.stage]
        for c, run in zip(mine, runs, strict=True):
            out[c] = run
    return out


def _index(name: str) -> int | None:
    m = re.fullmatch(r".*\.(\d+)", name)
    return int(m.group(1)) if m else None


def _header(plan: Plan, framework: str, cannot: list[str], comment: str = "#") -> list[str]:
    p = plan.predicted
    lines = [f"{framework} configuration exported by autoshard {plan.provenance.get('autoshard_version', '')} from the "
             f"plan of {plan.model['name']} on {plan.gpus} GPUs ({plan.profile})",
             f"layout: {plan.layout_obj().to_string()}",
             f"predicted: {p['step_time_s']:.4g} s per step, {p['tokens_per_sec_per_gpu']:,.0f} tokens/s/GPU, "
             f"{p['peak_memory_gib']:.3g} of {p['memory_capacity_gib']:.3g} GiB per GPU"]
    lines += ["cannot express:" if cannot else f"{framework} expresses every choice of this plan"]
    lines += [f"  - {c}" for c in cannot]
    return [f"{comment} {line}".rstrip() for line in lines]


def _recompute_overrides(plan: Plan) -> str | None:
    overrides = {k: v for s in plan.stages for k, v in s.recompute.items()}
    if not overrides:
        return None
    return (f"per-block recompute ({len(overrides)} blocks differ from recompute={plan.layout['recompute']}, e.g. "
            f"{next(iter(overrides))}: {next(iter(overrides.values()))}); the layout's mode is exported for all")


# ---------------------------------------------------------------------------------------------- torchtitan


def to_torchtitan(plan: Plan) -> Export:
    lay, t = plan.layout, plan.training
    cannot: list[str] = []
    replicate, shard, reshard = (lay["dp"], 1, "default") if lay["zero"] == 0 else (1, lay["dp"], "default")
    if lay["zero"] in (1, 2):
        reshard = "never"
        cannot.append(f"zero={lay['zero']}: torchtitan has no ZeRO-1/2, its sharded data parallelism is FSDP2; exported "
                      "as data_parallel_shard_degree=dp with fsdp_reshard_after_forward='never' (parameters stay "
                      "gathered from forward to backward, like ZeRO-2) but parameters are still sharded between steps: "
                      "less memory and more all-gather traffic than planned")
    if lay["tp"] > 1 and not lay["sequence_parallel"]:
        cannot.append("sequence_parallel=false: torchtitan always shards the norms' activations over TP (SP)")
    if lay["recompute"] == "selective":
        cannot.append("recompute=selective: exported as torchtitan's op-level selective AC (selective_ac_option='op'), "
                      "which saves matmul outputs by its own policy rather than recomputing exactly the attention core")
    if lay["async_tp"]:
        cannot.append("async_tp=true: enable_async_tensor_parallel only takes effect with torch.compile on")
    if t["precision"] == "fp8":
        cannot.append("precision=fp8: exported as [model] converters = ['float8'] (torchao Float8Linear); newer "
                      "torchtitan moves this to its quantization section")
    if (o := _recompute_overrides(plan)) is not None:
        cannot.append(o)
    pp = lay["pp"] > 1
    parallelism: dict[str, Any] = {
        "data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard,
        "fsdp_reshard_after_forward": reshard,
        "tensor_parallel_degree": lay["tp"], "enable_async_tensor_parallel": bool(lay["async_tp"]),
        "pipeline_parallel_degree": lay["pp"],
    }
    if pp:
        parallelism |= {"pipeline_parallel_schedule": TITAN_SCHEDULES[lay["schedule"]],
                        "pipeline_parallel_microbatch_size": lay["micro_batch"],
                        "pipeline_parallel_split_points": [c[0] for c in chunks(plan)[1:]]}
    parallelism |= {"context_parallel_degree": lay["cp"], "expert_parallel_degree": lay["ep"]}
    ac: dict[str, Any] = {"mode": lay["recompute"]}
    if lay["recompute"] == "selective":
        ac["selective_ac_option"] = "op"
    # without a pipeline torchtitan accumulates gradients over global / (local x dp) steps of local_batch_size
    local = t["global_batch"] // lay["dp"] if pp else lay["micro_batch"]
    training = {"local_batch_size": local, "global_batch_size": t["global_batch"], "seq_len": t["seq_len"],
                "mixed_precision_param": "bfloat16"}
    sections = {"parallelism": parallelism, "activation_checkpoint": ac, "training": training}
    if t["precision"] == "fp8":
        sections["model"] = {"converters": ["float8"]}
    body = "\n\n".join(f"[{name}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in values.items())
                       for name, values in sections.items())
    notes = ["merge into your model's torchtitan train config (field names as of torchtitan/config/job_config.py "
             "@000204a4)"]
    text = "\n".join(_header(plan, "torchtitan", cannot) + [f"# {n}" for n in notes]) + "\n\n" + body + "\n"
    return Export(framework="torchtitan", text=text, cannot_express=cannot)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


# ---------------------------------------------------------------------------------------------- Megatron-LM


def to_megatron(plan: Plan) -> Export:
    lay, t = plan.layout, plan.training
    cannot: list[str] = []
    args: list[list[str]] = [["--tensor-model-parallel-size", str(lay["tp"])]]
    if lay["tp"] > 1 and lay["sequence_parallel"]:
        args.append(["--sequence-parallel"])
    args += [["--pipeline-model-parallel-size", str(lay["pp"])]]
    args += _megatron_split(plan, cannot)
    args += [["--context-parallel-size", str(lay["cp"])]]
    if lay["ep"] > 1:
        args += [["--expert-model-parallel-size", str(lay["ep"])], ["--expert-tensor-parallel-size", str(lay["tp"])]]
    if lay["zero"] >= 1:
        args += [["--use-distributed-optimizer"], ["--overlap-grad-reduce"], ["--overlap-param-gather"]]
    elif lay["dp"] * lay["cp"] > 1:
        args.append(["--overlap-grad-reduce"])
    if lay["zero"] == 2:
        cannot.append("zero=2: Megatron's distributed optimizer shards the optimizer state (ZeRO-1) and reduce-scatters "
                      "gradients, but keeps a full-size gradient buffer; exported as --use-distributed-optimizer")
    if lay["zero"] == 3:
        cannot.append("zero=3: Megatron-LM's distributed optimizer has no parameter sharding (ZeRO-3); exported as "
                      "--use-distributed-optimizer (ZeRO-1); newer Megatron-Core has an FSDP option, not exported")
    if lay["recompute"] == "selective":
        args.append(["--recompute-granularity", "selective"])
    elif lay["recompute"] == "full":
        args += [["--recompute-granularity", "full"], ["--recompute-method", "uniform"], ["--recompute-num-layers", "1"]]
    if (o := _recompute_overrides(plan)) is not None:
        cannot.append(o + " (Megatron's --recompute-method block recomputes the first N layers of every stage alike)")
    if lay["async_tp"]:
        args.append(["--tp-comm-overlap"])
    if lay["schedule"] == "gpipe" and lay["pp"] > 1:
        cannot.append("schedule=gpipe: Megatron-LM runs 1F1B (the same bubble, fewer micro-batches in flight)")
    if lay["schedule"] in ("zb_interleaved", "zbv") and lay["pp"] > 1:
        cannot.append(f"schedule={lay['schedule']}: Megatron-LM has no zero-bubble schedule (it runs 1F1B, "
                      "interleaved with vpp > 1, and prices a bubble up to 3x larger)")
    args += [["--micro-batch-size", str(lay["micro_batch"])], ["--global-batch-size", str(t["global_batch"])],
             ["--seq-length", str(t["seq_len"])], ["--num-layers", str(plan.model["blocks"])], ["--bf16"]]
    if t["precision"] == "fp8":
        args.append(["--fp8-format", "hybrid"])
    notes = ["Megatron-LM parallelism and batch arguments; add your model's architecture (--hidden-size, --num-experts, ...),",
             "data and optimizer arguments: source this file, then pretrain_gpt.py \"${MEGATRON_PARALLEL_ARGS[@]}\" ...",
             f"data parallel size = world / (tp x pp x cp) = {lay['dp']} (Megatron derives it)"]
    lines = _header(plan, "Megatron-LM", cannot) + [f"# {n}" for n in notes]
    lines += ["MEGATRON_PARALLEL_ARGS=("] + ["  " + " ".join(shlex.quote(a) for a in arg) for arg in args] + [")"]
    return Export(framework="megatron", text="\n".join(lines) + "\n", cannot_express=cannot)


def _megatron_split(plan: Plan, cannot: list[str]) -> list[list[str]]:
    """Uniform: nothing (or --num-layers-per-virtual-pipeline-stage); only the first/last stage differ:
    --decoder-first/last-pipeline-num-layers; anything else: --pipeline-model-parallel-layout."""
    lay = plan.layout
    if lay["pp"] == 1:
        return []
    sizes = [len(c) for c in chunks(plan)]
    if lay["vpp"] > 1:
        if len(set(sizes)) == 1:
            return [["--num-layers-per-virtual-pipeline-stage", str(sizes[0])]]
        cannot.append("the uneven interleaved split needs Megatron-Core's --pipeline-model-parallel-layout "
                      "(experimental in Megatron-Core; older Megatron-LM only splits evenly)")
        return [["--pipeline-model-parallel-layout", megatron_layout(plan)]]
    middle = sizes[1:-1]
    if len(set(middle)) <= 1:
        out = []
        if not middle or sizes[0] != middle[0]:
            out.append(["--decoder-first-pipeline-num-layers", str(sizes[0])])
        if not middle or sizes[-1] != middle[0]:
            out.append(["--decoder-last-pipeline-num-layers", str(sizes[-1])])
        return out
    cannot.append("the uneven split of the middle stages needs Megatron-Core's --pipeline-model-parallel-layout "
                  "(experimental; older Megatron-LM only splits first/last stages unevenly)")
    return [["--pipeline-model-parallel-layout", megatron_layout(plan)]]


def megatron_layout(plan: Plan) -> str:
    """`Et*3|t*3|...|t*2L`: each chunk's blocks, the embedding on the first and the loss head on the last."""
    sizes = [len(c) for c in chunks(plan)]
    parts = ["t" if n == 1 else f"t*{n}" for n in sizes]
    parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def to_deepspeed(plan: Plan) -> Export:
    lay, t = plan.layout, plan.training
    cannot: list[str] = []
    if lay["tp"] > 1:
        cannot.append(f"tp={lay['tp']}: DeepSpeed's config has no tensor parallelism; it comes from the model code "
                      "(e.g. Megatron-DeepSpeed's mpu) or DeepSpeed AutoTP")
    if lay["cp"] > 1:
        cannot.append(f"cp={lay['cp']}: context parallelism is not in the config (DeepSpeed-Ulysses is set up in code); "
                      f"DeepSpeed would count the {lay['dp'] * lay['cp']} dp x cp ranks as data parallel in its batch check")
    if lay["ep"] > 1:
        cannot.append(f"ep={lay['ep']}: expert parallelism is set in the model code, deepspeed.moe.layer.MoE(ep_size="
                      f"{lay['ep']})")
    if lay["pp"] > 1:
        if lay["vpp"] > 1:
            cannot.append(f"vpp={lay['vpp']}: DeepSpeed's pipeline engine has no interleaved schedule (one chunk per stage)")
        if lay["zero"] >= 2:
            cannot.append(f"zero={lay['zero']} with pp={lay['pp']}: DeepSpeed's pipeline engine supports ZeRO-1 only")
        cannot.append("the stage split: PipelineModule(num_stages, partition_method=...) is set in code; the plan's "
                      f"blocks per chunk are {[len(c) for c in chunks(plan)]}")
        if lay["schedule"] == "gpipe":
            cannot.append("schedule=gpipe: DeepSpeed's pipeline engine runs its own 1F1B-like TrainSchedule")
    if lay["recompute"] == "selective":
        cannot.append("recompute=selective: DeepSpeed checkpoints whole layers (activation_checkpoint_interval) or "
                      "what the model code wraps in deepspeed.checkpointing.checkpoint; selective is not configurable")
    if t["precision"] == "fp8":
        cannot.append("precision=fp8: FP8 matmuls come from Transformer Engine in the model code, not the config")
    if (o := _recompute_overrides(plan)) is not None:
        cannot.append(o)
    config: dict[str, Any] = {
        "_comment": _header(plan, "DeepSpeed", cannot, comment="")[:3] + (["cannot express: " + c for c in cannot]),
        "train_batch_size": t["global_batch"],
        "train_micro_batch_size_per_gpu": lay["micro_batch"],
        "gradient_accumulation_steps": t["global_batch"] // (lay["micro_batch"] * lay["dp"]),
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": lay["zero"], "overlap_comm": True, "contiguous_gradients": True},
    }
    if lay["pp"] > 1:
        config["pipeline"] = {"stages": lay["pp"], "partition": "parameters",
                              "activation_checkpoint_interval": 1 if lay["recompute"] == "full" else 0}
    if lay["recompute"] == "full":
        config["activation_checkpointing"] = {"partition_activations": lay["tp"] > 1, "cpu_checkpointing": False,
                                              "contiguous_memory_optimization": False}
    config["_comment"] = [c.strip() for c in config["_comment"]]
    return Export(framework="deepspeed", text=json.dumps(config, indent=2) + "\n", cannot_express=cannot)
