"""`plan calibrate`: micro-benchmarks on the machine it runs on, written as a hardware profile.

Measured (each number's `source` says how, on which host, when, with which torch):
- GEMM: square `a @ b` over sizes and dtypes (fp32 and bf16 on CPU; bf16 and, where torch._scaled_mm
  runs, fp8 on GPU), best of a few runs, FLOP/s = 2 n^3 / t. bf16 gives the saturating efficiency curve
  eff(F) = eff_max x F / (F + F_half) the cost model uses (cost_models/compute.py). On a GPU the peak stays
  the base profile's datasheet number and eff_max = best / peak; on a CPU there is no datasheet, so the
  peak is the best measured rate and eff_max = 1.
- memory bandwidth: `y.copy_(x)` of a large tensor, bytes read + written / time.
- under torchrun (torch.distributed initialised): all-reduce, all-gather, reduce-scatter and all-to-all
  over message sizes, reported as nccl-tests bus bandwidth (NVIDIA/nccl-tests doc/PERFORMANCE.md, S the
  whole buffer, n ranks): all-reduce busbw = S/t x 2(n-1)/n; all-gather, reduce-scatter and all-to-all
  busbw = S/t x (n-1)/n. Point-to-point send/recv gives the link bandwidth; the largest all-reduce's busbw
  over it the collective efficiency; the smallest all-reduce's time / (2(n-1)) the per-step latency. All
  ranks on one node fill the intra-node fields, ranks on several nodes the inter-node ones.
Anything not measured comes from `--base` with its source kept and marked as such.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from autoshard.hardware_profiles import FITTED_FIELDS, HERE, OPTIONAL_SPEC_FIELDS, SPEC_FIELDS, load_profile


@dataclass(kw_only=True, slots=True)
class Sizes:
    gemm: tuple[int, ...]
    copy_bytes: int
    messages: tuple[int, ...]
    """Bytes per rank's whole buffer."""
    repeats: int


QUICK = Sizes(gemm=(64, 128, 256, 512), copy_bytes=2**26, messages=(2**10, 2**16, 2**20, 2**22), repeats=3)
FULL_CPU = Sizes(gemm=(64, 128, 256, 512, 1024, 2048), copy_bytes=2**29,
                 messages=(2**10, 2**14, 2**18, 2**22, 2**24, 2**26), repeats=5)
FULL_GPU = Sizes(gemm=(256, 512, 1024, 2048, 4096, 8192), copy_bytes=2**31,
                 messages=tuple(2**k for k in range(10, 31, 2)), repeats=10)


@dataclass(kw_only=True, slots=True)
class Measurements:
    gemm: dict[str, dict[int, float]] = field(default_factory=dict)
    """dtype -> n -> FLOP/s."""
    copy_bytes_per_s: float = 0.0
    collectives: dict[str, dict[int, float]] = field(default_factory=dict)
    """all_reduce / all_gather / reduce_scatter / all_to_all / p2p -> bytes -> bus bandwidth (B/s)."""
    small_all_reduce_s: float = 0.0
    world: int = 1
    local_world: int = 1


def _times(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of `repeats` synchronised calls of `fn`, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _best(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    return min(_times(fn, repeats, sync))


def measure_gemm(device: torch.device, sizes: Iterable[int], repeats: int, sync: Callable[[], None],
                 tick: Callable[[], None]) -> dict[str, dict[int, float]]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out: dict[str, dict[int, float]] = {}
    for name, dt in dtypes.items():
        out[name] = {}
        for n in sizes:
            a, b = (torch.randn(n, n, device=device).to(dt) for _ in "ab")
            out[name][n] = 2 * n**3 / _best(lambda a=a, b=b: a @ b, repeats, sync)
            tick()
    if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
        out["fp8"] = _measure_fp8(device, sizes, repeats, sync)
    return out


def _measure_fp8(device: torch.device, sizes: Iterable[int], repeats: int, sync: Callable[[], None]) -> dict[int, float]:
    out = {}
    one = torch.ones((), device=device)
    for n in sizes:
        try:
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
            out[n] = 2 * n**3 / _best(lambda a=a, b=b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16),
                                      repeats, sync)
        except (RuntimeError, TypeError):  # no FP8 GEMM on this GPU / torch
            return {}
    return out


def measure_copy(device: torch.device, nbytes: int, repeats: int, sync: Callable[[], None]) -> float:
    x = torch.empty(nbytes // 4, device=device).normal_()
    y = torch.empty_like(x)
    return 2 * x.nbytes / _best(lambda: y.copy_(x), repeats, sync)


BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n, "p2p": lambda n: 1.0}
"""nccl-tests PERFORMANCE.md: busbw = algbw x factor, algbw = S / t."""


def measure_collectives(device: torch.device, messages: Iterable[int], repeats: int, sync: Callable[[], None],
                        tick: Callable[[], None]) -> tuple[dict[str, dict[int, float]], float]:
    import torch.distributed as dist

    n, rank = dist.get_world_size(), dist.get_rank()
    out: dict[str, dict[int, float]] = {k: {} for k in BUS_FACTOR}
    for size in messages:
        elems = max(n, size // 4 // n * n)
        buf, chunk = torch.ones(elems, device=device), torch.ones(elems // n, device=device)
        for name, op in _ops(dist, rank, buf, chunk, torch.empty_like(buf)).items():
            dist.barrier()
            t = _median(op, repeats, sync)
            out[name][elems * 4] = elems * 4 / t * BUS_FACTOR[name](n)
        tick()
    tiny = torch.ones(1, device=device)
    small = _median(lambda: dist.all_reduce(tiny), max(repeats, 10), sync)
    return out, small


def _ops(dist: Any, rank: int, buf: torch.Tensor, chunk: torch.Tensor, out_buf: torch.Tensor) -> dict[str, Callable]:
    return {"all_reduce": lambda: dist.all_reduce(buf),
            "all_gather": lambda: dist.all_gather_into_tensor(out_buf, chunk),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(chunk, buf),
            "all_to_all": lambda: dist.all_to_all_single(out_buf, buf),
            "p2p": lambda: _ping(dist, rank, buf)}


def _median(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    times = _times(fn, repeats, sync)
    # every rank must agree: the slowest rank's median is the collective's time
    import torch.distributed as dist

    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _ping(dist: Any, rank: int, buf: torch.Tensor) -> None:
    """Rank 0 sends to rank 1 (one way); the other ranks idle."""
    if rank == 0:
        dist.send(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)


# ---------------------------------------------------------------------------------------------- profile


def calibrate(*, profile_out: str | Path, base: str = "cpu_gloo", quick: bool = False, quiet: bool = False) -> dict:
    """Measure, write the profile YAML (rank 0), reload it with the profile loader; returns the YAML data."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = world > 1 and not dist.is_initialized()  # a group we start, we also end
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    sizes = QUICK if quick else (FULL_GPU if device.type == "cuda" else FULL_CPU)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = 2 * len(sizes.gemm) + 1 + (len(sizes.messages) if world > 1 else 0)
    bar = _progress(steps, quiet or rank != 0)
    m = Measurements(world=world, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    m.gemm = measure_gemm(device, sizes.gemm, sizes.repeats, sync, bar.update)
    m.copy_bytes_per_s = measure_copy(device, sizes.copy_bytes, sizes.repeats, sync)
    bar.update()
    if world > 1:
        m.collectives, m.small_all_reduce_s = measure_collectives(device, sizes.messages, sizes.repeats, sync,
                                                                  bar.update)
    bar.close()
    data = profile_data(m, base=base, name=Path(profile_out).stem, device=device)
    if rank == 0:
        Path(profile_out).write_text(_dump(data, m))
        load_profile(profile_out)  # the file must load with the loader the planner uses
    if world > 1:
        dist.barrier()
    if owned:  # gloo's threads alive at interpreter teardown can abort the process ("terminate called without
        dist.destroy_process_group()  # an active exception", exit -6), as seen once in CI
    return data


def _progress(total: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrating", unit="benchmark", file=sys.stderr, delay=1.0,
                disable=disable or not sys.stderr.isatty())


def profile_data(m: Measurements, *, base: str, name: str, device: torch.device) -> dict[str, Any]:
    """The profile YAML's mapping: measured values with their provenance, the rest from `base`."""
    import yaml as _yaml

    base_path = Path(base) if Path(base).suffix in (".yaml", ".yml") else HERE / f"{load_profile(base).name}.yaml"
    raw = _yaml.safe_load(base_path.read_text())
    stamp = (f"measured by plan calibrate on {socket.gethostname()}, {datetime.date.today().isoformat()}, "
             f"torch {torch.__version__}")
    specs = {k: {"value": v["value"], "source": f"from base profile {raw['name']}: {v['source']}"}
             for k, v in raw["specs"].items() if k in SPEC_FIELDS or k in OPTIONAL_SPEC_FIELDS}
    fitted = {k: {"value": v["value"], "source": f"from base profile {raw['name']}: {v['source']}"}
              for k, v in raw["fitted"].items() if k in FITTED_FIELDS}

    def put(table: dict, key: str, value: float, how: str) -> None:
        table[key] = {"value": float(f"{value:.4g}") if isinstance(value, float) else value,
                      "source": f"{stamp}: {how}"}

    _gemm_fields(m, specs, fitted, put, device)
    put(specs, "hbm_bw_bytes_per_s", m.copy_bytes_per_s, "y.copy_(x) of a large fp32 tensor, best of several, "
        "bytes read + written / time")
    put(specs, "hbm_bytes", float(_memory_bytes(device, m.local_world)),
        "torch.cuda.get_device_properties().total_memory" if device.type == "cuda"
        else f"/proc/meminfo MemTotal / {m.local_world} ranks on this node")
    if m.world > 1:
        _collective_fields(m, specs, fitted, put, device)
    return {
        "name": name,
        "description": f"measured by plan calibrate on {socket.gethostname()} ({m.world} rank(s)); "
                       f"unmeasured values from {raw['name']}",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_name()}, 1 rank per process",
        "family": raw["family"] if device.type == "cuda" else "cpu",
        "specs": specs,
        "fitted": {"fitted_on": f"{stamp}: GEMM/memory/collective micro-benchmarks on this machine; values marked "
                                f"'from base profile {raw['name']}' were not measured", **fitted},
    }


def _gemm_fields(m: Measurements, specs: dict, fitted: dict, put: Callable, device: torch.device) -> None:
    bf16 = m.gemm["bf16"]
    best = max(bf16.values())
    peak = specs["bf16_flops_per_s"]["value"] if device.type == "cuda" else best
    eff_max = min(1.0, best / peak)
    # eff(F) = eff_max F / (F + F_half)  =>  F_half = F (eff_max / eff - 1), the median over sizes below the plateau
    halves = [2 * n**3 * (eff_max / (rate / peak) - 1) for n, rate in bf16.items() if rate / peak < 0.97 * eff_max]
    curve = ", ".join(f"n={n}: {r:.3g}" for n, r in bf16.items())
    if device.type != "cuda":
        put(specs, "bf16_flops_per_s", best, f"best square bf16 a @ b over n = {curve} FLOP/s (no datasheet "
            "peak on a CPU: the best measured rate is the peak, so gemm_efficiency_max is 1)")
        fp32 = m.gemm["fp32"]
        put(specs, "fp32_flops_per_s", max(fp32.values()), "best square fp32 a @ b over n = "
            + ", ".join(f"{n}: {r:.3g}" for n, r in fp32.items()) + " FLOP/s")
        put(specs, "fp8_flops_per_s", best, "no FP8 GEMM on a CPU: FP8 layers run at the bf16 rate")
    elif m.gemm.get("fp8"):
        fp8 = max(m.gemm["fp8"].values())
        put(fitted, "fp8_measured_flops_per_s", fp8, "best torch._scaled_mm e4m3 (informational; the fp8 peak "
            "stays the datasheet's)")
    put(fitted, "gemm_efficiency_max", eff_max, f"best bf16 GEMM rate / bf16 peak; rates {curve}")
    if halves:
        put(fitted, "gemm_half_flops", float(statistics.median(halves)),
            "median over sizes below the plateau of F (eff_max / eff - 1), F = 2 n^3 FLOPs of one GEMM")


def _collective_fields(m: Measurements, specs: dict, fitted: dict, put: Callable, device: torch.device) -> None:
    tier = "intra" if m.world <= m.local_world else "inter"
    largest = max(m.collectives["all_reduce"])
    link = m.collectives["p2p"][largest]
    busbw = m.collectives["all_reduce"][largest]
    table = ", ".join(f"{op} " + " ".join(f"{s}B:{bw:.3g}" for s, bw in sorted(v.items()))
                      for op, v in m.collectives.items())
    backend = "nccl" if device.type == "cuda" else "gloo"
    put(specs, f"{tier}_node_bw_bytes_per_s", link, f"{backend} send/recv of {largest} bytes rank 0 -> 1, "
        f"{m.world} ranks ({'one node' if tier == 'intra' else 'several nodes'})")
    put(specs, f"{tier}_node_latency_s", m.small_all_reduce_s / max(1, 2 * (m.world - 1)),
        f"{backend} all_reduce of 4 bytes over {m.world} ranks, median time / 2(n-1) ring steps")
    put(fitted, f"collective_efficiency_{tier}", busbw / link,
        f"all_reduce bus bandwidth at {largest} bytes / send-recv bandwidth; nccl-tests busbw (B/s) by op and "
        f"message size: {table}")
    if tier == "intra" and device.type != "cuda":
        put(specs, "gpus_per_node", m.local_world, "torchrun LOCAL_WORLD_SIZE (one rank per process)")
        put(specs, "nvlink_domain_gpus", m.local_world, "no NVLink on a CPU: the node's ranks share one loopback")


def _memory_bytes(device: torch.device, local_world: int) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 // max(1, local_world)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _dump(data: dict[str, Any], m: Measurements) -> str:
    head = ["# Written by `plan calibrate`: measured values say how, where and when; the others come from the base",
            f"# profile named in their source. {m.world} rank(s), {m.local_world} on this node. Load with --profile "
            "<this file>."]
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, width=120)
