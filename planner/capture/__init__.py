"""Capture: a model (nn.Module, model.py, spec.yaml or HF config) on the meta device -> ModelGraph.

`loading` turns the user's input into a module, `trace` captures it (fx, torch.export or hooks; `repeat`
captures a few identical blocks and expands them), `structure` finds attention/MLP/MoE in each block, and
`model_graph` holds the result. `spec` and `reference_model` build autoshard's reference transformer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["capture"]


def __getattr__(name: str) -> Any:
    """`capture` imported on first use (PEP 562): trace.py imports torch, which a cached plan never needs."""
    if name == "capture":
        from autoshard.planner.capture.trace import capture

        return capture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
