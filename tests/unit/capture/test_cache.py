"""The capture cache (planner/capture/cache.py): a spec planned again reads its graph back, identical to a
fresh capture; anything that changes the capture changes the key; a broken or unwritable cache is skipped."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoshard.planner.api import plan
from autoshard.planner.capture import cache
from autoshard.planner.capture.loading import load_model
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.capture.trace import capture

SPECS = Path(__file__).resolve().parents[3] / "examples" / "specs"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AUTOSHARD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AUTOSHARD_CACHE", raising=False)
    return tmp_path


@pytest.mark.parametrize("spec", ["tiny_llama.yaml", "tiny_moe.yaml"])
def test_graph_survives_json(spec):
    graph = capture(str(SPECS / spec))
    back = ModelGraph.from_dict(json.loads(json.dumps(graph.to_dict())))
    assert back == graph  # every field, nested attention/MLP/MoE info included (the fx module aside)
    assert any(u.moe for u in back.units) == (spec == "tiny_moe.yaml")


def test_second_plan_reads_the_cache_and_plans_alike(cache_dir, monkeypatch):
    first = plan(str(SPECS / "tiny_moe.yaml"), gpus=8, profile="h100_ib")
    stored = list((cache_dir / "capture").glob("*.json"))
    assert len(stored) == 1

    def no_capture(*args, **kwargs):
        raise AssertionError("captured again although the cache holds the graph")

    monkeypatch.setattr("autoshard.planner.capture.trace.capture", no_capture)
    second = plan(str(SPECS / "tiny_moe.yaml"), gpus=8, profile="h100_ib")
    assert second.to_dict() == first.to_dict()
    with pytest.raises(AssertionError, match="captured again"):
        plan(str(SPECS / "tiny_moe.yaml"), gpus=8, profile="h100_ib", cache=False)


def test_off_switch_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("AUTOSHARD_CACHE", "off")
    plan(str(SPECS / "tiny_gpt.yaml"), gpus=8, profile="h100_ib")
    assert not (cache_dir / "capture").exists()


def test_key_covers_what_changes_the_capture():
    spec = load_model(str(SPECS / "tiny_llama.yaml")).spec
    base = cache.spec_key(spec, 1, 256, "bfloat16")
    assert cache.spec_key(spec, 1, 256, "bfloat16") == base
    assert cache.spec_key(spec, 1, 512, "bfloat16") != base
    assert cache.spec_key(spec, 2, 256, "bfloat16") != base
    assert cache.spec_key(spec, 1, 256, "float32") != base
    assert cache.spec_key(dataclasses.replace(spec, layers=spec.layers + 1), 1, 256, "bfloat16") != base


def test_key_follows_the_capture_code(monkeypatch, tmp_path):
    spec = load_model(str(SPECS / "tiny_llama.yaml")).spec
    base = cache.spec_key(spec, 1, 256, "bfloat16")
    code = tmp_path / "code"
    code.mkdir()
    for path in cache.CAPTURE_CODE.glob("*.py"):
        (code / path.name).write_bytes(path.read_bytes())
    (code / "trace.py").write_text((code / "trace.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(cache, "CAPTURE_CODE", code)
    cache._code_hash.cache_clear()
    try:
        assert cache.spec_key(spec, 1, 256, "bfloat16") != base
    finally:
        cache._code_hash.cache_clear()


def test_broken_entry_is_recaptured(cache_dir):
    plan(str(SPECS / "tiny_gpt.yaml"), gpus=8, profile="h100_ib")
    (entry,) = (cache_dir / "capture").glob("*.json")
    entry.write_text('{"name": "half a fi')
    again = plan(str(SPECS / "tiny_gpt.yaml"), gpus=8, profile="h100_ib")
    assert again.predicted["fits"]
    json.loads(entry.read_text())  # rewritten whole


def test_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AUTOSHARD_CACHE_DIR", str(blocker))
    assert plan(str(SPECS / "tiny_gpt.yaml"), gpus=8, profile="h100_ib").predicted["fits"]


def test_cached_plan_never_imports_torch(cache_dir):
    """The point of the cache: a spec planned before costs the search, not torch's 2-3 s of imports. The cold
    call, run as the `plan` command, captures without importing torch._dynamo (capture/lazy_dynamo.py)."""
    code = ("import sys; from autoshard.planner.cli import main; "
            f"sys.argv = ['plan', {str(SPECS / 'tiny_llama.yaml')!r}, '--gpus', '8', '--profile', 'h100_ib', "
            "'--json', '--quiet']; code = main(); "
            "print('torch' in sys.modules, type(sys.modules.get('torch._dynamo')).__name__, file=sys.stderr); "
            "sys.exit(code)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert [r.stderr.split()[-2:] for r in runs] == [["True", "_StandIn"], ["False", "_StandIn"]]
    cold, warm = (json.loads(r.stdout) for r in runs)
    cold.pop("solve_time_s"), warm.pop("solve_time_s")
    assert warm == cold


def test_the_dynamo_stand_in_gives_way_to_the_real_module_when_asked():
    """Meta ops run without torch._dynamo; the first real use (an attribute, a submodule) loads the real one."""
    code = """
import sys
from autoshard.planner.capture.lazy_dynamo import defer_dynamo
defer_dynamo()
import torch
torch.nn.Embedding(10, 4, device="meta")(torch.arange(3, device="meta"))
print(type(sys.modules["torch._dynamo"]).__name__)
import torch._dynamo
print(torch._dynamo.is_compiling(), type(sys.modules["torch._dynamo"]).__name__)
from torch._dynamo.utils import counters
print(type(counters).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["_StandIn", "False", "module", "defaultdict"]
