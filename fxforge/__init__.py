"""fxforge: a compiler for PyTorch models.

Trace a model to an FX graph, rewrite it with a pipeline of composable passes (quantize,
adapters, pruning, attention fusion, Medusa heads, shift-add), and lower it to eager PyTorch,
ONNX Runtime, Triton kernels or TorchInductor — checked numerically at every step.

    import fxforge
    compiled = fxforge.compile(model, (x,), passes="fuse_rms_norm", backend="onnx")
"""
import fxforge.ir.ops  # noqa: F401  (registers every fxforge:: op)
from fxforge.api import CompiledModel, compile, load
from fxforge.errors import (
    ArtifactError,
    BackendError,
    CalibrationError,
    CLIUsageError,
    FxforgeError,
    InputError,
    MissingLoweringError,
    PassError,
    PassSpecError,
    TraceError,
    VerificationError,
)
from fxforge.ir.trace import trace
from fxforge.ir.verify import Tolerance
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline
from fxforge.passes.registry import register_pass, registered_passes

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "BackendError", "CalibrationError", "CLIUsageError", "CompiledModel", "FxforgeError", "InputError", "MissingLoweringError", "Pass",
    "PassContext", "PassError", "PassResult", "PassSpecError", "Pipeline", "Tolerance", "TraceError",
    "VerificationError", "compile", "load", "register_pass", "registered_passes", "trace",
]
