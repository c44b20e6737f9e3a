"""Shared test set-up: one thread per process (2-core CI runs two pytest workers) and common paths."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# plan() keeps spec captures on disk (planner/capture/cache.py): each test process starts with an empty
# folder of its own (inherited by the processes it launches), never the user's ~/.cache/autoshard
os.environ["AUTOSHARD_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoshard-test-cache-")
os.environ.pop("AUTOSHARD_CACHE", None)
atexit.register(shutil.rmtree, os.environ["AUTOSHARD_CACHE_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "specs"
HF_CONFIGS = ROOT / "tests" / "data" / "hf"


@pytest.fixture
def specs() -> Path:
    return SPECS


@pytest.fixture
def hf_configs() -> Path:
    return HF_CONFIGS


# Modules outside tests/distributed whose module-scoped fixtures are expensive enough to run once only.
ONE_WORKER = ("unit/capture/test_hf_structure.py", "planning/test_report_export.py")  # HF captures; 405B search


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` (pytest -n 2 --dist loadgroup): each module of tests/distributed is one unit of work, on
    one worker, since its module-scoped fixtures start one multi-process launch for many cases
    (equivalence_worker.py, hf_zoo_worker.py, ...) that a module split over two workers would start twice;
    so is each module of ONE_WORKER; every other test is a unit of its own. The modules go first (xdist
    orders units by their number of tests), the short single tests fill in at the end. (xdist's own
    loadgroup marks its groups by rewriting node ids, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            one = Path(module).parent.name == "distributed" or module.endswith(ONE_WORKER)
            return module if one else nodeid

    return OneWorkerModules(config, log)
