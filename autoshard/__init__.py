"""autoshard: automatic parallelism planning and model transformation for PyTorch.

`plan(model, gpus=..., profile=...) -> Plan`; `load_plan(path)`; `apply_plan(model, plan) -> ParallelModel`;
`capture(model) -> ModelGraph`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autoshard.planner.api import plan
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.outputs.plan import Plan, load_plan

if TYPE_CHECKING:
    from autoshard.planner.capture.trace import capture
    from autoshard.transforms.apply import ParallelModel, apply_plan, parallelize

__version__ = "0.1.0"
__all__ = ["ModelGraph", "ParallelModel", "Plan", "apply_plan", "capture", "load_plan", "parallelize", "plan"]

_LAZY = {"capture": "autoshard.planner.capture.trace", "ParallelModel": "autoshard.transforms.apply", "apply_plan": "autoshard.transforms.apply",
         "parallelize": "autoshard.transforms.apply"}
"""Names imported on first use (PEP 562): the transforms pull in torch.distributed.tensor (about 0.5 s),
which `plan` never needs, and capture torch itself, which a plan read from the capture cache never needs."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoshard' has no attribute {name!r}")
