"""User-facing errors: the CLI prints their message as one paragraph and exits with `exit_code`."""


class UserError(Exception):
    """Bad input from the user (a file, a spec, a flag). The message names the problem and the fix."""

    exit_code = 2


class SpecError(UserError):
    """An architecture spec (spec.yaml) with a missing or impossible field."""


class ModelLoadError(UserError):
    """A model file or folder that cannot be loaded (missing, no build_model, or its code raised)."""


class CaptureError(UserError):
    """No capture method could run the model's forward and backward on the meta device."""
