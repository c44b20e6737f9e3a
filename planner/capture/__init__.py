"""Capture: a model (nn.Module, model.py, spec.yaml or HF config) on the meta device -> ModelGraph.

`loading` turns the user's input into a module, `trace` captures it (fx, torch.export or hooks; `repeat`
captures a few identical blocks and expands them), `structure` finds attention/MLP/MoE in each block, and
`model_graph` holds the result. `spec` and `reference_model` build autoshard's reference transformer.
"""

from autoshard.planner.capture.trace import capture

__all__ = ["capture"]
