"""Keep torch._dynamo out of a `plan` process until something really needs it.

torch wraps many of its Python reference kernels in `torch._disable_dynamo` (torch/_compile.py): the first
call of each imports torch._dynamo, to wrap the kernel in `torch._dynamo.disable`. On the meta device those
references are what runs (`nn.init.normal_`, `arange`, `embedding`, `new_empty`), so the first op of every
capture pays the import of torch._dynamo and sympy: about 1.5 of a cold call's 5 CPU s
(`python -X importtime -c "import torch, torch._dynamo"`). Outside torch.compile, `disable(fn)` runs `fn`
as it is.

`plan` never compiles, so its command line puts a stand-in in `sys.modules` whose `disable` returns the
function itself. Any other attribute loads the real torch._dynamo and answers from it: code that needs dynamo
gets it, only later. Only the command line installs it, never the Python API, whose process may go on to
torch.compile, where those kernels must stay disabled.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

NAME = "torch._dynamo"


class _StandIn(types.ModuleType):
    """torch._dynamo for a process that never compiles: `disable` is the identity, the rest is the real one."""

    def disable(self, fn: Callable | None = None, recursive: bool = True, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__path__":  # inspect.getmodule asks every module for __file__
            raise AttributeError(name)  # (__path__: a submodule of torch._dynamo is imported; load it all)
        return getattr(_load_real(), name)


def _load_real() -> types.ModuleType:
    if isinstance(sys.modules.get(NAME), _StandIn):
        del sys.modules[NAME]
    return importlib.import_module(NAME)


def defer_dynamo() -> None:
    """Install the stand-in, unless torch._dynamo is already loaded."""
    if NAME not in sys.modules:
        sys.modules[NAME] = _StandIn(NAME)
