"""Start a multi-process job for the distributed tests the way torchrun starts its workers (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment), without torchrun's elastic agent: one Python interpreter
and a rendezvous fewer per launch, about a second of the 2-core budget each. As torchrun does, the first
rank to fail stops the others, so a crashed rank never leaves its peers waiting in a collective.

Also the convention the workers share for their batches (MICRO_BATCH, own_micro_batch)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MICRO_BATCH = 2
"""Sequences per micro-batch of the workers' 8-sequence batches where a case gives none: half the
micro-batches of 1 (a step's cost on 2 cores is per micro-batch, not per token), still 2 or more accumulated
per rank wherever dp <= 2. Pipeline cases keep 1 (8 / dp micro-batches a step: the schedules' steady state).
A model's unsharded reference runs at its cases' micro-batch: a MoE's aux loss is the micro-batch's."""


def own_micro_batch(extra: list[str]) -> list[str]:
    """A case's own --micro-batch argument among its extra train.py arguments (["--micro-batch", "1"]), or []."""
    i = extra.index("--micro-batch") if "--micro-batch" in extra else -1
    return extra[i:i + 2] if i >= 0 else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], nproc: int, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python *args` as `nproc` ranks; stdout and stderr of all ranks, rank by rank; the first non-zero
    exit status (or 0)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp) / f"{r}.out", Path(tmp) / f"{r}.err") for r in range(nproc)]
        procs = []
        for rank, (out, err) in enumerate(logs):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=out.open("w"),
                                          stderr=err.open("w")))
        code = _wait(procs, timeout)
        stdout = "".join(out.read_text() for out, _ in logs)
        stderr = "".join(err.read_text() for _, err in logs)
    return subprocess.CompletedProcess([sys.executable, *args], code, stdout, stderr)


def _wait(procs: list[subprocess.Popen], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c == 0 for c in codes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if not failed and not all(c == 0 for c in codes):
        return 124  # timed out
    return failed[0] if failed else 0


def exit_cleanly() -> None:
    """A worker's end: wait for every rank, tear the process group down, flush, and skip the interpreter's
    teardown, which gloo's threads can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
