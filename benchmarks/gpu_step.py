"""One GPU, bf16: measured forward + backward time and peak memory against the cost model's prediction.

    .venv/bin/python benchmarks/gpu_step.py [--spec examples/specs/llama3_8b.yaml] [--layers 4]
        [--seq-len 4096] [--micro-batch 1] [--profile h100_ib] [--steps 20] [--warmup 5] [--fit] [--torchtitan]

Two cases, both autoshard's reference transformer (planner/capture/reference_model.py) built from the spec:
one transformer block on hidden states, and the whole model cut to `--layers` blocks (embedding and head
kept). Each runs `--warmup` untimed steps, then `--steps` timed ones (CUDA events around forward + backward,
gradients set to None between steps); it prints the median and the peak of torch.cuda.max_memory_allocated.

The prediction is the cost model's for the same single-GPU layout (tp = pp = cp = dp = 1, no recompute) on
`--profile`: the block's compute seconds (estimate.unit_time) and saved activations (memory.block_activations),
the model's compute seconds and peak memory (estimate.estimate). Memory is compared as activations (the
peak over what is allocated before the forward: weights), since the benchmark runs no optimizer (the
prediction's weights, gradients and optimizer states are printed beside it). `--fit` prints the GEMM
efficiency (the profile's gemm_efficiency_max) at which the prediction would equal the measured time.
`--torchtitan` also times torchtitan's own Llama 3 model at the same sizes when torchtitan imports.

Without CUDA it prints one line saying so and exits 0. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclass(kw_only=True, slots=True)
class Prediction:
    compute_s: float
    """Forward + backward seconds of one micro-batch on one GPU."""
    activations_bytes: float
    """Bytes saved for the backward (and, for the model, the logits)."""
    peak_bytes: float = 0.0
    """The whole peak (weights, gradients, optimizer states, activations); 0 for the block alone."""
    breakdown: dict[str, float] = dataclasses.field(default_factory=dict)


def load(spec_path: str, layers: int, seq_len: int) -> Any:
    """The spec as a LoadedModel cut to `layers` blocks (dense layers first under MoE, as the spec says)."""
    from autoshard.planner.capture.loading import load_model

    loaded = load_model(spec_path)
    spec = dataclasses.replace(loaded.spec, layers=layers, seq_len=max(seq_len, loaded.spec.seq_len))
    return dataclasses.replace(loaded, spec=spec, seq_len=seq_len)


def single_gpu(mbs: int, seq_len: int, precision: str = "bf16") -> tuple[Any, Any]:
    """The layout and training of one micro-batch on one GPU: nothing sharded, nothing recomputed."""
    from autoshard.cost_models.layout import Layout, Training

    layout = Layout(tp=1, cp=1, pp=1, dp=1, ep=1, vpp=1, mbs=mbs, zero=0, recompute="none", schedule="1f1b")
    return layout, Training(global_batch=mbs, seq_len=seq_len, precision=precision)


def predict(loaded: Any, profile: Any, mbs: int, seq_len: int) -> dict[str, Prediction]:
    """The cost model's block and model predictions for one micro-batch of `loaded` on one GPU of `profile`."""
    from autoshard.cost_models import communication as comm
    from autoshard.cost_models import memory
    from autoshard.cost_models.estimate import estimate, unit_time
    from autoshard.cost_models.framework import attention_ratio, get_framework
    from autoshard.cost_models.work import ACT_BYTES, model_work
    from autoshard.planner.capture.trace import capture

    graph = capture(loaded, 1, seq_len)
    layout, training = single_gpu(mbs, seq_len)
    work = model_work(graph)
    block = next(w for w in work if w.kind == "block")
    tokens = mbs * seq_len
    parts = unit_time(block, layout=layout, training=training, profile=profile, groups=comm.layout_groups(layout),
                      tokens=tokens, hidden=int(block.input_bytes // ACT_BYTES), recompute="none",
                      attention_ratio=attention_ratio(get_framework(training.framework), profile))
    saved = memory.block_activations(block, tokens=tokens, tp=1, cp=1, sp=False, recompute="none",
                                     attention=training.attention)
    est = estimate(graph, layout, training, profile, work=work)
    mem = est.memory_breakdown
    return {
        "block": Prediction(compute_s=parts["compute"] + parts["recompute"], activations_bytes=saved),
        "model": Prediction(compute_s=est.time_breakdown["compute"] + est.time_breakdown["recompute"],
                            activations_bytes=mem.get("activations", 0.0) + mem.get("logits", 0.0),
                            peak_bytes=est.peak_memory_bytes, breakdown=dict(mem)),
    }


def implied_gemm_efficiency(loaded: Any, profile: Any, mbs: int, seq_len: int, measured_s: float,
                            case: str = "model") -> float:
    """The profile's gemm_efficiency_max at which the predicted compute of `case` equals `measured_s`.
    Predicted time is A / e + B in the efficiency e (GEMMs scale with it, attention and elementwise do not):
    two predictions give A and B."""
    e0 = profile.gemm_efficiency_max
    t0 = predict(loaded, profile, mbs, seq_len)[case].compute_s
    t1 = predict(loaded, profile.replace(gemm_efficiency_max=2 * e0), mbs, seq_len)[case].compute_s
    a = 2 * e0 * (t0 - t1)
    b = t0 - a / e0
    return a / (measured_s - b) if measured_s > b else float("inf")


def time_step(step: Callable[[], None], *, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds, peak bytes above the memory allocated before the first step) of `step` on CUDA."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def block_step(spec: Any, mbs: int, seq_len: int) -> Callable[[], None]:
    """Forward + backward of one reference block on random bf16 hidden states."""
    from autoshard.planner.capture.reference_model import TransformerBlock, rope_tables

    dev = torch.device("cuda")
    block = TransformerBlock(spec, 0).to(dev, torch.bfloat16)
    x = torch.randn(mbs, seq_len, spec.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rope = tuple(t.to(torch.bfloat16) for t in rope_tables(seq_len, spec.head_dim, spec.rope_theta, dev)) \
        if spec.style == "llama" else None

    def step() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x, rope).sum().backward()

    return step


def model_step(model: torch.nn.Module, vocab: int, mbs: int, seq_len: int) -> Callable[[], None]:
    """Forward + backward of a causal LM on random tokens (cross-entropy in fp32, as training runs it)."""
    tokens = torch.randint(0, vocab, (mbs, seq_len + 1), device="cuda")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()

    return step


def reference_model(spec: Any) -> torch.nn.Module:
    from autoshard.planner.capture.reference_model import build_reference_model

    torch.manual_seed(0)
    with torch.device("cuda"):
        return build_reference_model(spec).to(torch.bfloat16)


def torchtitan_model(spec: Any) -> tuple[torch.nn.Module | None, str]:
    """torchtitan's own Llama 3 at the spec's sizes, or None and why not (its module layout moves between
    releases: the two known ones are tried)."""
    try:
        import torchtitan  # noqa: F401
    except ImportError as exc:
        return None, f"torchtitan does not import ({exc})"
    kwargs = {"dim": spec.hidden, "n_layers": spec.layers, "n_heads": spec.heads, "n_kv_heads": spec.kv_heads,
              "vocab_size": spec.vocab, "rope_theta": spec.rope_theta, "norm_eps": spec.norm_eps,
              "max_seq_len": spec.seq_len}
    errors = []
    for where in ("torchtitan.models.llama3.model.args", "torchtitan.models.llama3.model"):
        try:
            mod = __import__(where, fromlist=["TransformerModelArgs"])
            args = mod.TransformerModelArgs(**kwargs)
            model_mod = __import__("torchtitan.models.llama3.model.model", fromlist=["Transformer"]) \
                if where.endswith(".args") else mod
            with torch.device("cuda"):
                model = model_mod.Transformer(args)
                model.init_weights()
            return model.to(torch.bfloat16), ""
        except Exception as exc:  # noqa: BLE001 - report it and carry on: the comparison is optional
            errors.append(f"{where}: {type(exc).__name__}: {exc}")
    return None, "torchtitan's Llama 3 could not be built (" + "; ".join(errors) + ")"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples/specs/llama3_8b.yaml"), help="architecture spec .yaml")
    p.add_argument("--layers", type=int, default=4, help="blocks of the whole-model case (default 4)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--profile", default="h100_ib", help="hardware profile of the prediction (h100_ib, h200_ib, ...)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is printed)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fit", action="store_true", help="print the GEMM efficiency the measured times imply")
    p.add_argument("--torchtitan", action="store_true", help="also time torchtitan's Llama 3 (tokens/s)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step: skipped, no CUDA device (torch.cuda.is_available() is False); nothing measured.")
        return 0
    from autoshard.hardware_profiles import load_profile

    profile = load_profile(args.profile)
    mbs, seq = args.micro_batch, args.seq_len
    loaded = load(args.spec, args.layers, seq)
    pred = predict(loaded, profile, mbs, seq)
    spec = loaded.spec
    print(f"{spec.name}, {args.layers} blocks, micro-batch {mbs} x seq {seq}, bf16 on {torch.cuda.get_device_name()}; "
          f"predicted on {profile.name}")
    print(f"{'case':<8}{'meas ms':>10}{'pred ms':>10}{'err':>8}{'meas act GiB':>14}{'pred act GiB':>14}{'tok/s':>11}")
    measured = {}
    for case, make in (("block", lambda: block_step(spec, mbs, seq)),
                       ("model", lambda: model_step(reference_model(spec), spec.vocab, mbs, seq))):
        torch.cuda.empty_cache()
        t, act = time_step(make(), steps=args.steps, warmup=args.warmup)
        measured[case] = t
        pr = pred[case]
        print(f"{case:<8}{t * 1e3:>10.2f}{pr.compute_s * 1e3:>10.2f}{pr.compute_s / t - 1:>+8.1%}"
              f"{act / GIB:>14.2f}{pr.activations_bytes / GIB:>14.2f}{mbs * seq / t:>11.0f}")
    states = {k: v / GIB for k, v in pred["model"].breakdown.items() if k not in ("activations", "logits")}
    print("model prediction, other GiB (not run here: no optimizer): "
          + ", ".join(f"{k} {v:.2f}" for k, v in states.items()) + f"; peak {pred['model'].peak_bytes / GIB:.2f}")
    if args.fit:
        for case, t in measured.items():
            eff = implied_gemm_efficiency(loaded, profile, mbs, seq, t, case)
            print(f"fit {case}: gemm_efficiency_max {eff:.3f} would match (profile {profile.gemm_efficiency_max:.3f})")
    if args.torchtitan:
        model, why = torchtitan_model(spec)
        if model is None:
            print(f"torchtitan: skipped, {why}")
        else:
            t, _ = time_step(model_step(model, spec.vocab, mbs, seq), steps=args.steps, warmup=args.warmup)
            print(f"torchtitan Llama 3: {t * 1e3:.2f} ms, {mbs * seq / t:.0f} tokens/s "
                  f"(autoshard reference {mbs * seq / measured['model']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
