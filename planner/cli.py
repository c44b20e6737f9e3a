"""The `plan` command. It only parses arguments and calls the library; errors become one paragraph."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from autoshard.cost_models.framework import FRAMEWORKS
from autoshard.cost_models.layout import PRECISIONS
from autoshard.hardware_profiles import profile_names
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.errors import UserError
from autoshard.planner.outputs.export import FRAMEWORKS as EXPORTERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plan",
        description="Plan the parallel layout of a PyTorch model (TP/SP, PP, CP, EP, DP + ZeRO).",
    )
    p.add_argument("model", help="model.py with build_model(), an architecture spec .yaml, "
                                 "or a Hugging Face config.json / model folder")
    p.add_argument("--inspect", action="store_true", help="print the captured model instead of planning")
    p.add_argument("--gpus", type=int, help="number of GPUs")
    p.add_argument("--profile", help=f"hardware profile: {', '.join(profile_names())}, or a profile .yaml")
    p.add_argument("--gpu-memory-gib", type=float, help="override the profile's GPU memory (e.g. 96 for H100 96GB)")
    p.add_argument("--layout", help="tp=8,pp=4,vpp=1,cp=1,ep=1,dp=2,zero=1,mbs=1,recompute=selective[,schedule=..]")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: the spec's)")
    p.add_argument("--framework", default="torch", choices=tuple(FRAMEWORKS),
                   help="what will run the plan, for its kernels, recompute policy and collectives (default: torch, "
                        "autoshard's own apply_plan)")
    p.add_argument("--precision", choices=PRECISIONS, help="matmul precision (default: the spec's, else bf16)")
    p.add_argument("--grad-reduce", choices=("fp32", "bf16"),
                   help="gradient buffer and reduction dtype (default: the framework's; Megatron fp32)")
    p.add_argument("-o", "--output", help="write the plan as YAML to this file (with --export: the exported config)")
    p.add_argument("--report", help="also draw the plan: a self-contained .html page or a .png figure")
    p.add_argument("--export", choices=EXPORTERS,
                   help="write the plan as this framework's configuration to -o FILE (torchtitan TOML, Megatron-LM "
                        "arguments, DeepSpeed JSON); what it cannot express goes to stderr and the file")
    p.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--no-cache", action="store_true",
                   help="capture the model again, even if a spec was captured alike before (planner/capture/cache.py)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The `plan` command; `argv` None: this process is the command (the console script, python -m)."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv)
    if own_process:  # a process that only plans never compiles: skip torch._dynamo's 1.5 s import
        from autoshard.planner.capture.lazy_dynamo import defer_dynamo

        defer_dynamo()
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        _fail(str(exc), exc.exit_code, args.debug)
    except BrokenPipeError:  # `plan ... | head` closed our stdout: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _fail("interrupted", 130, args.debug)
    except Exception as exc:  # noqa: BLE001 - anything else is our bug: say so, briefly
        _fail(f"internal error: {type(exc).__name__}: {exc}. Please report it with the output of --debug.", 1, args.debug)
    return 1


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(textwrap.fill(f"error: {message}", width=100), file=sys.stderr)
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    for name in ("micro_batch", "seq_len", "gpus", "global_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.inspect:
        return _inspect(args)
    if args.gpus is None or args.profile is None:
        raise UserError("give --gpus N and --profile NAME to plan (--layout to fix some or all of the layout), "
                        "or --inspect to see the captured model.")
    _check_outputs(args)
    from autoshard.planner.api import plan

    with _progress(f"planning {Path(args.model).name} on {args.gpus} GPUs", args.quiet):
        result = plan(args.model, gpus=args.gpus, profile=args.profile, global_batch=args.global_batch,
                      seq_len=args.seq_len, micro_batch=args.micro_batch, precision=args.precision,
                      layout=args.layout, gpu_memory_gib=args.gpu_memory_gib, framework=args.framework,
                      grad_reduce=args.grad_reduce, cache=not args.no_cache)
    _write_outputs(args, result)
    print(json.dumps(result.to_json(), sort_keys=True) if args.json else result.summary())
    if not result.predicted["fits"]:
        print(textwrap.fill("error: " + no_fit_line(result) + " Try a higher ZeRO stage, recompute=full, more "
                            "pipeline stages or more GPUs, or leave keys out of --layout for the planner to choose.",
                            width=100), file=sys.stderr)
        return 3
    return 0


def no_fit_line(result: Any) -> str:
    """How far a priced layout is from fitting: GiB per GPU over, and on which pipeline stage."""
    pred = result.predicted
    over = pred["peak_memory_gib"] - pred["memory_capacity_gib"]
    stage = pred.get("peak_stage", 0)
    where = f" on pipeline stage {stage}" if len(result.stages) > 1 else ""
    return (f"this layout does not fit: {pred['peak_memory_gib']:.1f} GiB per GPU{where} against "
            f"{pred['memory_capacity_gib']:.1f} GiB ({over:.1f} GiB over).")


def _check_outputs(args: argparse.Namespace) -> None:
    """Bad output flags fail before the search, not after it."""
    if args.export and not args.output:
        raise UserError(f"--export {args.export} writes to the file named by -o FILE, e.g. -o {args.export}.config; "
                        "give -o (write the plan YAML in a second run without --export).")
    if args.report and Path(args.report).suffix.lower() not in (".html", ".htm", ".png"):
        raise UserError(f"--report {args.report}: the report is an .html page or a .png figure; name the file so.")
    for path in filter(None, (args.output, args.report)):
        if not Path(path).resolve().parent.is_dir():
            raise UserError(f"{path}: the folder {Path(path).resolve().parent} does not exist; create it first.")


def _write_outputs(args: argparse.Namespace, result: object) -> None:
    """-o (plan YAML, or the export), --report; what an export cannot express goes to stderr."""
    from autoshard.hardware_profiles import load_profile
    from autoshard.planner.outputs.export import export_plan
    from autoshard.planner.outputs.report import write_report

    if args.export:
        exported = export_plan(result, args.export)
        Path(args.output).write_text(exported.text)
        for item in exported.cannot_express:
            print(textwrap.fill(f"note: {args.export} cannot express {item}", width=100, subsequent_indent="  "),
                  file=sys.stderr)
    elif args.output:
        result.save(args.output)
    if args.report:
        nodes = load_profile(args.profile, gpu_memory_gib=args.gpu_memory_gib).gpus_per_node
        with _progress(f"drawing {Path(args.report).name}", args.quiet):
            write_report(result, args.report, gpus_per_node=nodes)


@contextlib.contextmanager
def _progress(desc: str, quiet: bool, after_s: float = 1.0) -> Iterator[None]:
    """An elapsed-time line on stderr (tqdm) for work that takes over `after_s` seconds; cleared after. Only on
    a terminal: in a log or a pipe it would be noise before the one-paragraph error others parse."""
    done = threading.Event()

    def show() -> None:
        if done.wait(after_s):
            return
        from tqdm import tqdm

        with tqdm(desc=desc, total=None, file=sys.stderr, bar_format="{desc}: {elapsed}", leave=False) as bar:
            while not done.wait(0.25):
                bar.refresh()

    shown = not quiet and sys.stderr is not None and sys.stderr.isatty()
    thread = threading.Thread(target=show, daemon=True) if shown else None
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread is not None:
            thread.join()


SUBCOMMANDS = ("explain", "diff", "calibrate")


def _subcommand(argv: list[str]) -> int:
    """`plan explain PLAN.yaml`, `plan diff A.yaml B.yaml` and `plan calibrate --profile-out F.yaml`."""
    if argv[0] == "calibrate":
        return _calibrate(argv[1:])
    from autoshard.planner.outputs.plan import diff, load_plan

    p = argparse.ArgumentParser(prog=f"plan {argv[0]}")
    p.add_argument("plans", nargs=1 if argv[0] == "explain" else 2, help="plan YAML file(s) written with -o")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv[1:])
    try:
        plans = [load_plan(path) for path in args.plans]
    except FileNotFoundError as exc:
        _fail(f"{exc.filename}: no such plan file. Write one with plan MODEL ... -o plan.yaml.", 2, args.debug)
    except ValueError as exc:
        _fail(f"not a valid plan: {exc}", 2, args.debug)
    print(plans[0].explain() if argv[0] == "explain" else diff(*plans))
    return 0


def _calibrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="plan calibrate", description="Measure this machine (GEMMs, memory bandwidth and, "
                                "under torchrun, collectives) and write a hardware profile for --profile.")
    p.add_argument("--profile-out", required=True, help="the profile .yaml to write")
    p.add_argument("--base", default=None, help="profile whose values fill what is not measured "
                   "(default: cpu_gloo on a CPU, h100_ib on a GPU)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        import torch

        from autoshard.hardware_profiles import UnknownProfileError, load_profile

        base = args.base or ("h100_ib" if torch.cuda.is_available() else "cpu_gloo")
        if Path(args.profile_out).suffix not in (".yaml", ".yml"):
            raise UserError(f"--profile-out {args.profile_out}: name the profile file .yaml, as --profile expects.")
        try:
            load_profile(base)
        except (UnknownProfileError, ValueError) as exc:
            raise UserError(f"--base: {exc}") from exc
        from autoshard.planner.calibrate import calibrate

        data = calibrate(profile_out=args.profile_out, base=base, quick=args.quick, quiet=args.quiet)
    except UserError as exc:
        _fail(str(exc), exc.exit_code, args.debug)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        measured = [f"  {k} = {v['value']:.4g}" for table in (data["specs"], data["fitted"]) if isinstance(table, dict)
                    for k, v in table.items() if isinstance(v, dict) and "measured by plan calibrate" in v["source"]]
        print(f"wrote {args.profile_out} (profile {data['name']}); measured:\n" + "\n".join(measured))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from autoshard.planner.capture.trace import capture

    graph = capture(args.model, args.micro_batch or 1, args.seq_len)
    for w in graph.warnings:
        print(f"note: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(graph.summary(), indent=None, sort_keys=True))
    else:
        print(format_inspect(graph))
    return 0


def format_inspect(g: ModelGraph) -> str:
    """A readable summary: units (identical consecutive blocks folded), totals and cut points."""
    tokens = g.tokens
    lines = [
        f"model        {g.name}",
        f"capture      {g.capture_method}" + "".join(f"  ({k} failed: {v})" for k, v in g.capture_failures.items()),
        f"parameters   {_si(g.params)} ({g.params:,})",
        f"blocks       {len(g.blocks)} in {len(g.block_groups())} kind(s)",
        f"tokens       micro-batch {g.micro_batch} x seq {g.seq_len} ({g.dtype})",
        f"FLOPs/token  {_si(g.flops_per_token)} (forward {_si(g.fwd_flops / tokens)}, backward {_si(g.bwd_flops / tokens)})",
        f"saved/token  {_si(g.saved_bytes / tokens)}B for backward",
        "",
        f"{'unit':<34}{'kind':<11}{'params':>10}{'FLOP/token':>13}{'act B/token':>13}",
    ]
    for first, last, u in _folded(g):
        name = u.name if first == last else f"{g.units[first].name} .. {g.units[last].name} (x{last - first + 1})"
        lines.append(f"{name:<34}{u.kind:<11}{_si(u.params):>10}{_si((u.fwd_flops + u.bwd_flops) / tokens):>13}"
                     f"{_si(u.saved_bytes / tokens):>13}")
    if g.root_fwd_flops or g.root_saved_bytes:
        lines.append(f"{'(model body)':<34}{'':<11}{'':>10}{_si((g.root_fwd_flops + g.root_bwd_flops) / tokens):>13}"
                     f"{_si(g.root_saved_bytes / tokens):>13}")
    lines += ["", f"pipeline cuts {len(g.cut_points)} valid of {len(g.units) - 1}: " + _cuts(g)]
    block = g.blocks[0] if g.blocks else None
    if block is not None and block.attention is not None:
        a = block.attention
        lines.append(f"attention    {a.core}, {a.heads} heads, {a.kv_heads} kv heads, head dim {a.head_dim}")
    if block is not None:
        moe = next((b.moe for b in g.blocks if b.moe), None)
        if moe is not None:
            lines.append(f"MoE          {moe.num_experts} experts, top-{moe.top_k}, {len(moe.shared)} shared")
    return "\n".join(lines)


def _folded(g: ModelGraph) -> list[tuple[int, int, object]]:
    out: list[tuple[int, int, object]] = []
    for i, u in enumerate(g.units):
        if out and u.kind == "block" and g.units[out[-1][0]].signature == u.signature:
            out[-1] = (out[-1][0], i, out[-1][2])
        else:
            out.append((i, i, u))
    return out


def _cuts(g: ModelGraph) -> str:
    if len(g.cut_points) <= 6:
        return ", ".join(f"after {g.units[k - 1].name}" for k in g.cut_points) or "none"
    return (f"after {g.units[g.cut_points[0] - 1].name}, ..., after {g.units[g.cut_points[-1] - 1].name}"
            f" (every unit boundary but {len(g.units) - 1 - len(g.cut_points)})")


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


if __name__ == "__main__":
    sys.exit(main())
