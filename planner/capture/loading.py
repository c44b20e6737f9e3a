"""Turn what the user names into an nn.Module on the meta device, with example inputs.

Accepted (see ARCHITECTURE.md, "Model inputs"):
- an nn.Module;
- `model.py` with `build_model()` and optionally `example_inputs(micro_batch, seq_len)`;
- `spec.yaml`: autoshard's reference transformer built from an architecture spec;
- a Hugging Face `config.json`, or a folder holding one (needs the `hf` extra).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoshard.planner.errors import ModelLoadError, UserError

if TYPE_CHECKING:  # torch is imported where a module is built: a spec read from the capture cache needs none
    import torch
    from torch import nn

DEFAULT_SEQ_LEN = 2048
HF_DEFAULT_SEQ_LEN = 4096


@dataclass(kw_only=True, slots=True)
class LoadedModel:
    module: nn.Module | None
    """The model on meta; None for a spec until capture builds it (only the blocks it measures)."""
    name: str
    example_inputs: Callable[[int, int], tuple]
    seq_len: int
    """Sequence length used when the caller gives none."""
    kind: str
    """`module`, `model.py`, `spec` or `hf`."""
    spec: Any = None
    """The ModelSpec when built from a spec."""
    training: Any = None
    """The TrainingSpec of a spec file (batch, precision), if any."""
    warnings: list[str] = field(default_factory=list)


def token_inputs(micro_batch: int, seq_len: int) -> tuple[torch.Tensor]:
    """The default input: token ids of a decoder LM, shape (micro_batch, seq_len)."""
    import torch

    return (torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta"),)


def load_model(source: nn.Module | str | Path | LoadedModel) -> LoadedModel:
    if isinstance(source, LoadedModel):
        return source
    if not isinstance(source, (str, Path)):
        return _load_module(source)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no such file or folder. Give a model.py with build_model(), an architecture spec "
            "(.yaml), or a Hugging Face config.json (or a folder holding one)."
        )
    if path.is_dir() or path.suffix == ".json":
        return _load_hf(path)
    if path.suffix == ".py":
        return _load_model_py(path)
    if path.suffix in (".yaml", ".yml"):
        return _load_spec(path)
    raise ModelLoadError(
        f"{path}: unknown kind of model file '{path.suffix}'. Valid: model.py (build_model()), spec .yaml, "
        "Hugging Face config.json or a folder holding one."
    )


def _load_module(source: Any) -> LoadedModel:
    from torch import nn

    if not isinstance(source, nn.Module):
        raise UserError(f"model must be an nn.Module or a path (model.py, spec .yaml, Hugging Face config), "
                        f"got {type(source).__name__}")
    return LoadedModel(module=source, name=type(source).__name__, example_inputs=token_inputs,
                       seq_len=DEFAULT_SEQ_LEN, kind="module")


def _load_model_py(path: Path) -> LoadedModel:
    from torch import nn

    module_name = f"autoshard_user_model_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    user = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = user  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(user)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: importing the file raised {type(exc).__name__}: {exc}. Fix the error in the file "
            "(run it with python to see where); --debug shows the traceback."
        ) from exc
    build = getattr(user, "build_model", None)
    if not callable(build):
        raise ModelLoadError(
            f"{path}: defines no build_model() function. autoshard calls build_model() with no arguments "
            "to get the nn.Module (on the meta device); add one that returns your model."
        )
    model = _call_user(path, "build_model()", lambda: _on_meta(build))
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{path}: build_model() returned {type(model).__name__}, not a torch.nn.Module.")
    inputs = getattr(user, "example_inputs", None)
    return LoadedModel(
        module=model,
        name=path.stem if path.stem != "model" else type(model).__name__,
        example_inputs=_user_inputs(path, inputs) if callable(inputs) else token_inputs,
        seq_len=int(getattr(user, "SEQ_LEN", DEFAULT_SEQ_LEN)),
        kind="model.py",
    )


def _on_meta(build: Callable[[], Any]) -> Any:
    import torch

    with torch.device("meta"):
        return build()


def _call_user(path: Path, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except UserError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: {what} raised {type(exc).__name__}: {exc}. autoshard builds the model on the meta "
            "device (no real weights): code that loads checkpoints or reads tensor values there must be "
            "skipped. --debug shows the traceback."
        ) from exc


def _user_inputs(path: Path, fn: Callable[[int, int], Any]) -> Callable[[int, int], tuple]:
    def inputs(micro_batch: int, seq_len: int) -> tuple:
        import torch

        out = _call_user(path, "example_inputs()", lambda: _on_meta(lambda: fn(micro_batch, seq_len)))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in out)

    return inputs


def _load_spec(path: Path) -> LoadedModel:
    from autoshard.planner.capture.spec import load_spec

    model_spec, training, warnings = load_spec(path)
    return LoadedModel(
        module=None,  # built by capture (planner/capture/trace.py: _spec_module), only the blocks it measures
        name=model_spec.name,
        example_inputs=token_inputs,
        seq_len=training.seq_len or model_spec.seq_len,
        kind="spec",
        spec=model_spec,
        training=training,
        warnings=warnings,
    )


def with_seq_len(loaded: LoadedModel, seq_len: int) -> LoadedModel:
    """A spec model rebuilt for a longer sequence than its spec names (learned positions and RoPE tables
    are sized by it); other models are returned as they are."""
    if loaded.kind != "spec" or seq_len <= loaded.spec.seq_len:
        return loaded
    return dataclasses.replace(loaded, module=None, spec=dataclasses.replace(loaded.spec, seq_len=seq_len))


def _load_hf(path: Path) -> LoadedModel:
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.exists():
        raise ModelLoadError(f"{path}: folder holds no config.json. Point at a Hugging Face model folder or its config.json.")
    try:
        import transformers
    except ImportError as exc:
        raise UserError(
            f"{path}: Hugging Face configs need the transformers package. Install autoshard with the hf "
            "extra: pip install 'autoshard[hf]'."
        ) from exc
    try:
        raw = json.loads(config_path.read_text())
        config = transformers.AutoConfig.for_model(**raw) if "model_type" in raw else None
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{config_path}: not a valid Hugging Face config: {exc}") from exc
    if config is None:
        raise ModelLoadError(f"{config_path}: has no 'model_type' key, so it is not a Hugging Face model config.")
    config.use_cache = False  # a returned KV cache breaks torch.export and is not used in training
    model = _call_user(config_path, "transformers.AutoModelForCausalLM.from_config",
                       lambda: _on_meta(lambda: transformers.AutoModelForCausalLM.from_config(config)))
    max_pos = getattr(config, "max_position_embeddings", None) or HF_DEFAULT_SEQ_LEN
    return LoadedModel(
        module=model,
        name=raw.get("_name_or_path") or (raw.get("architectures") or [config.model_type])[0],
        example_inputs=token_inputs,
        seq_len=min(HF_DEFAULT_SEQ_LEN, max_pos),
        kind="hf",
    )
