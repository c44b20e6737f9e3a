"""autoshard: automatic parallelism planning and model transformation for PyTorch.

The public API grows with the planner: today `capture` (a model on the meta device -> ModelGraph).
"""

from autoshard.planner.capture import capture
from autoshard.planner.model_graph import ModelGraph

__version__ = "0.1.0"
__all__ = ["ModelGraph", "capture"]
