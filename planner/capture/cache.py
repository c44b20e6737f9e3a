"""Captured graphs of spec models, kept on disk: planning the same model again skips torch and the capture.

A `plan` call on a spec spends most of its time before the search: importing torch (2-3 CPU s), then the
first meta op imports sympy (0.5 s; torch._dynamo too, 1.5 s, outside the `plan` command: lazy_dynamo.py),
then the capture itself (1-2 s). Users plan the same
model many times (other GPU counts, batches, profiles, layouts), and a spec's capture depends only on:

- the spec as loaded (every architecture field, after the sequence length is applied),
- the capture's micro-batch, sequence length and dtype,
- the capture code (every file of planner/capture/, hashed) and the installed torch version.

All of these make the key, so a stale graph is never read. Only specs are cached: a model.py or a Hugging
Face model runs code the key cannot see (imports, the installed transformers).

Where: $AUTOSHARD_CACHE_DIR, else $XDG_CACHE_HOME/autoshard, else ~/.cache/autoshard. AUTOSHARD_CACHE=off
(or `plan --no-cache`) turns it off. A cache that cannot be written or read is skipped, never an error.
Graphs are stored as JSON (to_dict/from_dict), never pickled: reading one runs no code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from autoshard.planner.capture.model_graph import ModelGraph

CAPTURE_CODE = Path(__file__).resolve().parent


def cache_dir() -> Path | None:
    """Where captured graphs are kept, or None when the cache is off."""
    if os.environ.get("AUTOSHARD_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    if root := os.environ.get("AUTOSHARD_CACHE_DIR"):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autoshard"


def spec_key(spec: Any, micro_batch: int, seq_len: int, dtype: str) -> str:
    """The cache key of a spec model's capture (module docstring: what it covers)."""
    parts = {"spec": dataclasses.asdict(spec), "micro_batch": micro_batch, "seq_len": seq_len, "dtype": dtype,
             "code": _code_hash(), "torch": metadata.version("torch")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@cache
def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CAPTURE_CODE.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def load(key: str) -> ModelGraph | None:
    """The graph stored under `key`, or None (not there, the cache off, or unreadable)."""
    if (root := cache_dir()) is None:
        return None
    try:
        return ModelGraph.from_dict(json.loads((root / "capture" / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def store(key: str, graph: ModelGraph) -> None:
    """Keep `graph` under `key` (written to a temporary name, then renamed: readers never see half a file)."""
    if (root := cache_dir()) is None:
        return
    folder = root / "capture"
    tmp = folder / f"{key}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(graph.to_dict()))
        tmp.replace(folder / f"{key}.json")
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def captured(loaded: Any, micro_batch: int, seq_len: int, *, cache: bool = True) -> ModelGraph:
    """capture() of a LoadedModel, read from the cache when a spec was captured alike before (and `cache`)."""
    key = spec_key(loaded.spec, micro_batch, seq_len, "bfloat16") if cache and loaded.kind == "spec" else None
    if key is not None and (graph := load(key)) is not None:
        return graph
    from autoshard.planner.capture.trace import capture  # torch: only when there is something to capture

    graph = capture(loaded, micro_batch, seq_len)
    if key is not None:
        store(key, graph)
    return graph
