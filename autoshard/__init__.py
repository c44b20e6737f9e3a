"""autoshard: automatic parallelism planning and model transformation for PyTorch.

`plan(model, gpus=..., profile=...) -> Plan`; `load_plan(path)`; `apply_plan(model, plan) -> ParallelModel`;
`capture(model) -> ModelGraph`.
"""

from autoshard.planner.api import plan
from autoshard.planner.capture.model_graph import ModelGraph
from autoshard.planner.capture.trace import capture
from autoshard.planner.outputs.plan import Plan, load_plan
from autoshard.transforms.apply import ParallelModel, apply_plan, parallelize

__version__ = "0.1.0"
__all__ = ["ModelGraph", "ParallelModel", "Plan", "apply_plan", "capture", "load_plan", "parallelize", "plan"]
