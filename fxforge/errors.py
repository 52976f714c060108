"""Every error fxforge raises on purpose.

Each one says what was wrong, where (pass, node, parameter) and what to do about it, so a
user never has to read a stack trace to find out which part of their model was refused.
"""
from __future__ import annotations


class FxforgeError(Exception):
    """Base class of every error fxforge raises deliberately."""


class TraceError(FxforgeError):
    """torch.export could not capture the model."""


class PassSpecError(FxforgeError, ValueError):
    """A pipeline string or pass option is malformed, unknown or ill-typed."""


class PassError(FxforgeError):
    """A pass failed or produced a graph that failed verification; the pass was rolled back."""

    def __init__(self, message: str, *, pass_name: str, node: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


class VerificationError(FxforgeError):
    """Two graphs that should agree do not, within the declared tolerance."""


class MissingLoweringError(FxforgeError, NotImplementedError):
    """A backend was asked to lower an op it has no implementation for."""

    def __init__(self, backend: str, op_name: str, available: list[str] | None = None):
        have = f" Backends that lower it: {', '.join(available)}." if available else ""
        super().__init__(
            f"backend '{backend}' has no lowering for op 'fxforge::{op_name}'.{have} "
            f"Use a backend that supports it, or register one with "
            f"fxforge.ir.ops.register_lowering('{backend}', '{op_name}')."
        )
        self.backend = backend
        self.op_name = op_name


class InputError(FxforgeError, ValueError):
    """A compiled model was called with inputs that do not match what it was compiled for."""


class ModelDirectoryError(FxforgeError, ValueError):
    """A Hugging Face model directory cannot be loaded for the task, dtype or sizes asked."""


class ArtifactError(FxforgeError):
    """A saved artifact directory is missing, incomplete or corrupted."""


class CalibrationError(FxforgeError, ValueError):
    """Calibration data is missing, empty, exhausted, wrongly shaped or not finite.

    The message names the pass (and the batch, where one is at fault) and what to pass instead.
    """

    def __init__(self, message: str, *, pass_name: str | None = None, batch: int | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.batch = batch


class BackendError(FxforgeError, ValueError):
    """A backend was named that does not exist, or was given options or dtypes it cannot take."""


class CLIUsageError(FxforgeError):
    """A command-line argument is invalid (the CLI prints one line and exits with status 2)."""
