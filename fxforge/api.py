"""`fxforge.compile()`, the CompiledModel it returns, and saving/loading compiled artifacts.

    compiled = fxforge.compile(model, (input_ids,), {"attention_mask": mask},
                               passes="quantize(bits=4),fuse_attention", backend="onnx")
    compiled(input_ids, attention_mask=mask)      # same call and output structure as the model
    print(compiled.report)                        # per-pass time, nodes, bytes, sites, error
    compiled.export_onnx("model.onnx"); compiled.save("out/"); fxforge.load("out/")

The user's model is never mutated: tracing copies every parameter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule

from fxforge.backends import check_tolerance, get_backend
from fxforge.errors import InputError, VerificationError
from fxforge.ir.graph import summarize
from fxforge.ir.trace import flatten_inputs, trace, unflatten_outputs
from fxforge.ir.verify import Comparison, LossBound, Tolerance, compare_outputs, run_graph
from fxforge.passes.base import Pass, PassContext, Pipeline, PipelineReport

DEFAULT_BACKEND_TOLERANCE = Tolerance(max_abs=1e-4, rtol=1e-4)


@dataclass
class CompileReport:
    """The pipeline report plus the backend's check against eager."""

    pipeline: PipelineReport
    backend: str
    backend_check: Comparison | None = None
    trace_seconds: float = 0.0
    backend_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"traced in {self.trace_seconds:.2f}s", str(self.pipeline)]
        line = f"backend {self.backend}: prepared in {self.backend_seconds:.2f}s"
        if self.backend_check is not None:
            line += f"; vs eager: max abs error {self.backend_check.max_error:.2e}"
        lines.append(line)
        return "\n".join(lines)

    def __getitem__(self, pass_name: str) -> Any:
        return self.pipeline[pass_name]


class CompiledModel:
    """A model after fxforge's pipeline, runnable on a backend, exportable and saveable."""

    def __init__(self, graph_module: GraphModule, backend: str = "eager", *,
                 example_inputs: Sequence[Any] = (), report: CompileReport | None = None,
                 pipeline_spec: str = "", backend_options: dict[str, Any] | None = None,
                 verify: bool = True, backend_tolerance: Tolerance | None = None):
        self.graph_module = graph_module
        self.backend = backend
        self.example_inputs = tuple(example_inputs)
        self.pipeline_spec = pipeline_spec
        self.backend_options = dict(backend_options or {})
        self.report = report or CompileReport(PipelineReport(), backend)
        start = time.perf_counter()
        self._runner = get_backend(backend)(graph_module, self.example_inputs, **self.backend_options)
        self.report.backend_seconds = time.perf_counter() - start
        if verify and backend != "eager" and self.example_inputs:
            tolerance = backend_tolerance or check_tolerance(graph_module, backend, DEFAULT_BACKEND_TOLERANCE)
            self.report.backend_check = self._check_backend(tolerance)

    # ------------------------------------------------------------------ calling

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._flat_inputs(args, kwargs)
        return unflatten_outputs(self.graph_module, self.run_flat(*flat))

    def run_flat(self, *flat_inputs: Any) -> Any:
        """Run with the graph's flat inputs; returns its flat output tuple."""
        return self._runner(*flat_inputs)

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        try:
            flat = flatten_inputs(self.graph_module, args, kwargs)
        except TypeError as exc:
            raise InputError(str(exc)) from exc
        placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        if len(flat) != len(placeholders):
            raise InputError(f"the compiled model takes {len(placeholders)} inputs, got {len(flat)}")
        for node, value in zip(placeholders, flat):
            _check_input(node, value)
        return flat

    def _check_backend(self, tol: Tolerance) -> Comparison:
        ref = run_graph(self.graph_module, self.example_inputs)
        got = list(pytree.tree_leaves(self.run_flat(*self.example_inputs)))
        comparison = compare_outputs(ref, got, tol, allow_extra_outputs=False)
        if not comparison.ok:
            raise VerificationError(
                f"backend '{self.backend}' disagrees with eager on the example inputs: "
                f"{comparison.describe()}")
        return comparison

    # ------------------------------------------------------------------ inspection

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a training loop should update (those with requires_grad)."""
        return [p for p in self.graph_module.parameters() if p.requires_grad]

    def summary(self) -> str:
        return str(summarize(self.graph_module))

    def __repr__(self) -> str:
        return f"CompiledModel(backend={self.backend!r}, passes={self.pipeline_spec!r})"

    # ------------------------------------------------------------------ export, save

    def export_onnx(self, path: str | Path) -> Path:
        """Write the compiled graph as an ONNX model ONNX Runtime can load."""
        from fxforge.backends.onnx.backend import export_onnx

        return export_onnx(self.graph_module, self.example_inputs, path)

    def save(self, directory: str | Path) -> Path:
        """Save graph, weights (safetensors), example inputs and a manifest to `directory`."""
        from fxforge.artifact import save_artifact

        return save_artifact(self, Path(directory))


def compile(
    model: nn.Module,
    args: tuple | Any = (),
    kwargs: dict | None = None,
    passes: str | Sequence[Pass | str] | Pipeline | None = None,
    backend: str = "eager",
    calibration: Iterable[Any] | None = None,
    verify: bool = True,
    *,
    dynamic_shapes: Any = "auto",
    seed: int = 0,
    backend_options: dict[str, Any] | None = None,
    backend_tolerance: Tolerance | None = None,
    extras: dict[str, Any] | None = None,
    max_loss: float | dict[str, float] | None = None,
) -> CompiledModel:
    """Trace `model` on example inputs, run a pipeline of passes, and lower to a backend.

    Args:
        model: the nn.Module to compile; it is never modified.
        args, kwargs: example inputs, exactly as you call the model.
        passes: a pipeline string ("quantize(bits=4),fuse_attention"), a list of passes or a
            Pipeline. `canonicalize` runs first unless the pipeline starts with it.
        backend: "eager", "onnx", "triton" or "inductor".
        calibration: an iterable of model inputs for data-driven passes (AWQ, GPTQ, EVA, ...).
        verify: check every pass against what it claims to compute (the graph before it for
            exact passes, its semantics for lossy ones, e.g. quantize = the graph with the
            dequantized weights) at the example inputs and a second shape, measure each pass's
            loss, and check the backend against eager.
        max_loss: bound on every pass's loss against the graph before it: a number (relative L2
            error of any output) or a dict over "max_abs", "rel_l2", "min_cosine". Default None:
            loss is measured and reported (`compiled.report`), never bounded. A pass's own
            `max_loss=` option takes precedence.
        dynamic_shapes: "auto" (dynamic wherever the model allows), None, or torch.export's form.
        seed: for passes that draw random numbers.
        backend_options: e.g. {"threads": 2, "path": "model.onnx"} for the onnx backend.
        backend_tolerance: how close the backend must come to eager on the example inputs;
            None means 1e-4, loosened to what approximate lowerings in the graph declare
            (e.g. MatMulNBits at accuracy level 4 quantizes activations to int8).
        extras: values passes read from `PassContext.extras`, e.g. {"loss_fn": fn} for
            LoRA-GA / LoRA-SB (fn(outputs, flat_inputs) -> scalar loss).

    Example:
        >>> compiled = fxforge.compile(model, (x,), passes="fuse_rms_norm", backend="onnx")
        >>> y = compiled(x)
    """
    LossBound.parse(max_loss)  # a malformed bound fails here, before tracing
    start = time.perf_counter()
    gm = trace(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    trace_seconds = time.perf_counter() - start
    example_inputs = tuple(flatten_inputs(gm, args if isinstance(args, tuple) else (args,), kwargs))
    pipeline = _with_canonicalize(passes)
    ctx = PassContext(example_inputs=example_inputs, calibration=calibration, seed=seed,
                      extras=dict(extras or {}))
    torch.manual_seed(seed)
    gm, pipeline_report = pipeline.run(gm, ctx, verify=verify, max_loss=max_loss)
    report = CompileReport(pipeline_report, backend, trace_seconds=trace_seconds)
    # ctx.example_inputs, not example_inputs: a pass may have changed the graph's inputs.
    return CompiledModel(gm, backend, example_inputs=ctx.example_inputs, report=report,
                         pipeline_spec=pipeline.spec(), backend_options=backend_options,
                         verify=verify, backend_tolerance=backend_tolerance)


def _with_canonicalize(passes: str | Sequence[Pass | str] | Pipeline | None) -> Pipeline:
    pipeline = passes if isinstance(passes, Pipeline) else Pipeline(passes or ())
    if not pipeline.passes or pipeline.passes[0].name != "canonicalize":
        from fxforge.passes.canonicalize import Canonicalize

        pipeline = Pipeline([Canonicalize(), *pipeline.passes])
    return pipeline


def _check_input(node: torch.fx.Node, value: Any) -> None:
    expected = node.meta.get("val")
    if not isinstance(expected, torch.Tensor):
        return
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input '{node.name}' must be a tensor, got {type(value).__name__}")
    if value.dim() != expected.dim():
        raise InputError(
            f"input '{node.name}' must have rank {expected.dim()} (shape like {_shape_text(expected)}), "
            f"got shape {tuple(value.shape)}")
    if value.dtype != expected.dtype:
        raise InputError(f"input '{node.name}' must be {expected.dtype}, got {value.dtype}; "
                         f"convert it with .to({expected.dtype})")
    for i, (want, got) in enumerate(zip(expected.shape, value.shape)):
        if isinstance(want, int) and want != got:
            raise InputError(f"input '{node.name}' dimension {i} must be {want} (it was static when "
                             f"compiled), got {got}; compile with dynamic_shapes to vary it")


def _shape_text(val: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) if isinstance(s, int) else "*" for s in val.shape) + ")"


def load(directory: str | Path, backend: str | None = None, **backend_options: Any) -> CompiledModel:
    """Load a compiled model saved with `CompiledModel.save(directory)`.

    Every file is checked against the manifest's checksums first; a missing or corrupted file
    raises ArtifactError naming it. `backend` overrides the backend it was saved with.
    """
    from fxforge.artifact import load_artifact

    return load_artifact(directory, backend, **backend_options)
