"""Worker for test_checkpoint.py (launched by spawn.py): runs the jobs given as JSON in argv[1], one after the
other in the same process group, each on a fresh model under its own layout, and prints rank 0's losses as
JSON lines {"job": i, "step": s, "loss": x}.

A job is {"model": spec name or "hf/<tiny config in tests/data/hf>", "layout": layout keys, "save": dir | null, "resume": dir | null,
"weights": .safetensors | null, "precision": "fp32" | "bf16", "grad_reduce": "fp32" | "bf16" | null, "alone": bool}.
Without "resume" it trains steps 0-5 and saves after step 2 (checkpoint
step 3); with it, it loads that checkpoint (saved under another layout), saves it again at once under its own
layout if "save" is given, and trains steps 3-5. With "weights" it loads the unsharded weights from that file
into its shards, saves them (step 0) and trains nothing. With "alone" rank 0 runs it on its own (one process,
the layout on 1 rank: a reference; it cannot save) while the others go on to the next job."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from spawn import MICRO_BATCH, exit_cleanly  # tests/distributed is the script's directory
from torch import nn
from torch.distributed.tensor import DTensor

from autoshard.cost_models.layout import complete, parse_layout
from autoshard.planner.capture.loading import load_model
from autoshard.planner.capture.reference_model import build_reference_model
from autoshard.planner.capture.spec import load_spec
from autoshard.planner.capture.trace import capture
from autoshard.synthetic import synthetic_batch
from autoshard.transforms.apply import apply_layout
from autoshard.transforms.dp import ShardedAdamW
from autoshard.transforms.init import clean_fqn, meta_parameters

SPECS = Path(__file__).resolve().parents[2] / "examples" / "specs"
HF = Path(__file__).resolve().parents[2] / "tests" / "data" / "hf"
SEED, BATCH, SEQ, STEPS, SAVE_AT = 7, 8, 32, 6, 3


def build(name: str) -> tuple[nn.Module, int]:
    """The model with its parameters on meta, and its vocabulary size."""
    if name.startswith("hf/"):
        import transformers

        config = load_model(HF / name[3:]).module.config
        with meta_parameters():
            return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32), config.vocab_size
    with meta_parameters():
        return build_reference_model(load_spec(SPECS / f"{name}.yaml")[0]), 256


def run(index: int, job: dict) -> None:
    if job.get("alone") and dist.get_rank() != 0:
        return
    model, vocab = build(job["model"])
    # spawn.MICRO_BATCH, pipelines too (resuming checks the checkpoint, not the schedule); the same sequences
    # in each micro-batch under every dp
    partial = {"zero": 0, "mbs": MICRO_BATCH} | parse_layout(job["layout"])
    world = 1 if job.get("alone") else dist.get_world_size()
    parallel = apply_layout(model, complete(partial, world), graph=capture(model, 1, SEQ), seed=SEED,
                            precision=job.get("precision", "fp32"), grad_reduce=job.get("grad_reduce"))
    probe = dtypes(parallel.module) if job.get("precision") else None
    if job.get("weights"):
        parallel.load_weights(job["weights"])
        parallel.save(job["save"], step=0)
        return
    start = 0
    if job.get("resume"):
        start = parallel.load(job["resume"]).step
        if job.get("save"):
            parallel.save(job["save"], step=start)
    for step in range(start, STEPS):
        loss = parallel.train_step(synthetic_batch(seed=SEED, step=step, batch=BATCH, seq_len=SEQ, vocab=vocab))
        if dist.get_rank() == 0:
            print(json.dumps({"job": index, "step": step, "loss": loss}), flush=True)
            if probe is not None and step == start:
                print(json.dumps({"job": index, "dtypes": probe | master(parallel),
                                  "expert_grads": expert_grads(parallel.module)}), flush=True)
        if step + 1 == SAVE_AT and job.get("save") and not job.get("resume"):
            parallel.save(job["save"], step=SAVE_AT)


def dtypes(module: nn.Module) -> dict[str, str]:
    """The dtypes the first Linear computes with, filled in by its forward (a hook, for mixed precision)."""
    seen: dict[str, str] = {}
    linear = next(m for m in module.modules() if isinstance(m, nn.Linear))

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.update(input=str(args[0].dtype), weight=str(mod.weight.dtype), output=str(out.dtype))
        if isinstance(mod.weight, DTensor) and not hasattr(mod, "_fsdp_param_group"):  # TP: the local shard too
            seen.update(weight_local=str(mod.weight.to_local().dtype))

    linear.register_forward_hook(hook)
    return seen


def master(parallel) -> dict[str, str]:
    """The dtypes of the weights the optimizer steps, of their AdamW moments, of the gradients (the buffer the
    reduction runs on) and the reduction: FSDP2's parameters and policy, or ShardedAdamW's fp32 master of the
    bf16 parameters (all of them, the experts' own optimizer's too under expert parallelism: "mixed" lists each
    dtype seen)."""
    module, opt = parallel.module, parallel.optimizer
    parts = [o for o in getattr(opt, "optimizers", (opt,)) if isinstance(o, ShardedAdamW) and o.working is not None]
    if parts:
        masters = [m for o in parts for m in o.masters or [o.master]]
        params = [p for o in parts for p in o.params]
        grads = [p.main_grad if getattr(p, "main_grad", None) is not None else p.grad for p in params]
        moments = [v for o in parts for m in o.masters or [o.master] for k, v in o.inner.state[m].items()
                   if k != "step"]
        reduce = sorted({str(o.mp_policy.reduce_dtype) for o in parts})
        return {"master": _one(masters), "moments": _one(moments), "grad": _one(grads), "params": _one(params),
                "reduce": reduce[0] if len(reduce) == 1 else f"mixed {reduce}"}
    p = next(module.parameters())
    state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
    return {"master": str(p.dtype), "grad": str(p.grad.dtype),
            "reduce": str(state._mp_policy.reduce_dtype) if state is not None else "none"}


def expert_grads(module: nn.Module) -> dict[str, float]:
    """The norm of each expert parameter's gradient this rank holds after the step (the buffer the reduction
    ran on: averaged over the data-parallel ranks, and under expert parallelism divided by ep), by name."""
    out = {}
    for name, p in module.named_parameters():
        g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
        if ".experts." in name and g is not None:
            out[clean_fqn(name)] = float((g.to_local() if isinstance(g, DTensor) else g).float().norm())
    return out


def _one(tensors: list) -> str:
    """The dtype of the local data of all `tensors` (a DTensor's shard), or every dtype seen if they differ."""
    seen = sorted({str((t.to_local() if isinstance(t, DTensor) else t).dtype) for t in tensors})
    return seen[0] if len(seen) == 1 else f"mixed {seen}"


dist.init_process_group("gloo")
for i, job in enumerate(json.loads(sys.argv[1])):
    run(i, job)
exit_cleanly()
