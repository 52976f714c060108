"""`fxforge.compile()`, the CompiledModel it returns, and saving/loading compiled artifacts.

    compiled = fxforge.compile(model, (input_ids,), {"attention_mask": mask},
                               passes="quantize(bits=4),fuse_attention", backend="onnx")
    compiled(input_ids, attention_mask=mask)      # same call and output structure as the model
    print(compiled.report)                        # per-pass time, memory, nodes, bytes, sites, error
    compiled.export_onnx("model.onnx"); compiled.save("out/"); fxforge.load("out/")

The user's model is never mutated, and costs no second copy: the compiled graph shares every
weight no pass rewrote with the model (as torch.compile does), read-only: passes replace tensors,
never write them (passes/cow.py), and `trainable_parameters()` (hence `fxforge.train.fit`) hands
out private copies of shared weights before anything trains them. Writing into
`compiled.graph_module`'s tensors in place yourself writes into the model's.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule

from fxforge.artifact import ArtifactContents, load_artifact, save_artifact
from fxforge.backends import check_tolerance, get_backend, resolve_backend
from fxforge.backends.validate import as_tolerance, check_backend_options, check_dtypes
from fxforge.calibration.data import CalibrationData
from fxforge.errors import BackendError, FxforgeError, PassSpecError, TraceError, VerificationError
from fxforge.finite_checks import check_finite_inputs, check_finite_model
from fxforge.ir.graph import set_attr, summarize
from fxforge.ir.trace import borrowed_storages, flatten_inputs, trace, unflatten_outputs
from fxforge.ir.verify import Comparison, LossBound, Tolerance, compare_outputs, run_graph
from fxforge.passes.base import Pass
from fxforge.passes.cow import release
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, PipelineReport
from fxforge.runtime.input_signature import InputSignature

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
                 verify: bool = True, backend_tolerance: Tolerance | float | None = None,
                 saved_onnx: Any = None):
        """`saved_onnx`: an `fxforge.artifact.SavedOnnx` (what `fxforge.load` found in an artifact):
        the onnx backend opens that file instead of exporting the graph again, and a save or
        export_onnx writes it, while graph and translation options are those it was exported with."""
        backend = resolve_backend(backend)
        self.graph_module = graph_module
        self.backend = backend
        self.example_inputs = tuple(example_inputs)
        self.pipeline_spec = pipeline_spec
        self.backend_options = check_backend_options(backend, backend_options)
        backend_tolerance = as_tolerance(backend_tolerance)
        self.report = report or CompileReport(PipelineReport(), backend)
        check_dtypes(backend, graph_module, self.example_inputs)
        # ONNX Runtime copies inputs to host memory itself, so only the others pin the device.
        self._signature = InputSignature(graph_module, check_device=backend != "onnx")
        self._saved_onnx_options = saved_onnx.options if saved_onnx is not None else None
        start = time.perf_counter()
        with _backend_errors(backend, "preparing the model"):
            self._runner = self._open_saved_onnx(saved_onnx)
            if self._runner is None:
                self._runner = get_backend(backend)(graph_module, self.example_inputs, **self.backend_options)
        self.report.backend_seconds = time.perf_counter() - start
        # what the onnx backend exported (or the artifact held): save/export_onnx write it (_exported_onnx)
        self._exported = getattr(self._runner, "exported", None)
        if self._exported is None and saved_onnx is not None:
            from fxforge.backends.onnx.backend import ExportedOnnx, export_key

            self._exported = ExportedOnnx(key=export_key(graph_module, self.example_inputs, saved_onnx.options),
                                          path=saved_onnx.path)
        if verify and backend != "eager" and self.example_inputs:
            tolerance = backend_tolerance or check_tolerance(graph_module, backend, DEFAULT_BACKEND_TOLERANCE,
                                                                self.backend_options)
            with _backend_errors(backend, "checking it against eager on the example inputs"):
                self.report.backend_check = self._check_backend(tolerance)

    # ------------------------------------------------------------------ calling

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._flat_inputs(args, kwargs)
        return unflatten_outputs(self.graph_module, self.run_flat(*flat))

    def reprepare(self) -> None:
        """Lower the graph to the backend again, after its weights changed in place (e.g. trained
        Medusa heads: `fxforge.medusa.train_heads` calls it)."""
        with _backend_errors(self.backend, "preparing the model"):
            self._runner = get_backend(self.backend)(self.graph_module, self.example_inputs, **self.backend_options)

    def run_flat(self, *flat_inputs: Any) -> Any:
        """Run with the graph's flat inputs; returns its flat output tuple."""
        return self._runner(*flat_inputs)

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        """Flat inputs checked against the traced shapes, dtypes and vocabulary before any run."""
        return self._signature.check(args, kwargs)

    def _open_saved_onnx(self, saved_onnx: Any) -> Any:
        """A runner on the artifact's ONNX file, or None where the backend must export (another
        backend, other translation options, a graph computing in float32, a `path` to write)."""
        if saved_onnx is None or self.backend != "onnx" or "path" in self.backend_options:
            return None
        if self._onnx_options() != saved_onnx.options:
            return None
        from fxforge.backends.onnx.backend import open_exported

        return open_exported(self.graph_module, self.example_inputs, saved_onnx.path, saved_onnx.options,
                             **self.backend_options)

    def _check_backend(self, tol: Tolerance) -> Comparison:
        from fxforge.calibration.streaming import streamed
        from fxforge.passes.streamed_verification import run_by_block

        if streamed(self.graph_module) is not None:  # one block's weights resident at a time, not all
            ref = run_by_block(self.graph_module, self.example_inputs)[0]
        else:
            ref = run_graph(self.graph_module, self.example_inputs)
        got = list(pytree.tree_leaves(self.run_flat(*self.example_inputs)))
        comparison = compare_outputs(ref, got, tol, allow_extra_outputs=False)
        if not comparison.ok:
            raise VerificationError(
                f"backend '{self.backend}' disagrees with eager on the example inputs: "
                f"{comparison.describe()}")
        return comparison

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, seed: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """KV-cached generation on this model's backend; returns prompt + new tokens, (B, T + n).

        Needs a graph with a KV cache (`passes="...,add_kv_cache(attention_mask=True)"`, or
        `fxforge.export_decoder`'s pipeline). Batches are left-padded as for HF `generate`
        (0 in `attention_mask`); a row stops at `eos_token_id` and is padded with
        `pad_token_id` after it. `do_sample=False` is greedy; otherwise tokens are drawn at
        `temperature` among the `top_k` most likely (0: all), from a generator seeded by `seed`.
        """
        from fxforge.errors import InputError
        from fxforge.runtime.decoding import static_batch
        from fxforge.runtime.generation import (
            SamplingOptions, generate_tokens, layout_empty_past, layout_step,
        )
        from fxforge.runtime.layouts import kv_layout

        layout = kv_layout(self.graph_module.meta)
        if layout is None:
            raise InputError("generate() needs a KV-cached decoder: compile the causal LM with "
                             "passes=\"...,add_kv_cache(attention_mask=True)\" (traced on input_ids alone)")
        batch = torch.as_tensor(input_ids).reshape(-1, torch.as_tensor(input_ids).shape[-1]).shape[0]
        fixed = static_batch(self.graph_module, layout)
        if fixed is not None and fixed != batch:
            raise InputError(f"this model was traced with its batch fixed to {fixed}, got {batch} prompts; "
                             f"compile with example inputs of batch >= 2 to keep the batch dynamic")
        sampling = SamplingOptions(do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed)
        return generate_tokens(layout_step(layout, self.run_flat), layout_empty_past(layout), input_ids,
                               attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, sampling=sampling)

    # ------------------------------------------------------------------ inspection

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a training loop should update (those with requires_grad).

        A trainable weight still shared with the user's model (tracing shares, see the module
        docstring) is first replaced by a private copy, so training never writes into the model.
        """
        borrowed = borrowed_storages(self.graph_module)
        for name, p in list(self.graph_module.named_parameters()):
            if p.requires_grad and p.untyped_storage().data_ptr() in borrowed:
                set_attr(self.graph_module, name, p.detach().clone(), trainable=True)
        return [p for p in self.graph_module.parameters() if p.requires_grad]

    def summary(self) -> str:
        return str(summarize(self.graph_module))

    def __repr__(self) -> str:
        return f"CompiledModel(backend={self.backend!r}, passes={self.pipeline_spec!r})"

    def merge_adapters(self, *, keep: bool = True, backend: str | None = None,
                       backend_options: dict[str, Any] | None = None) -> "CompiledModel":
        """A new CompiledModel with the adapters folded into the base weights (plain linears, so
        it exports to ONNX and runs on every backend); this model keeps its adapters.

        The merge is a verified pass (`merge_adapters`), recorded in the new model's report.
        keep: let the `unmerge_adapters` pass restore the adapters later (invertible methods).
        backend / backend_options: for the new model (default: this one's, minus an ONNX `path`).
        Raises FxforgeError when the model has no adapters. See fxforge.adapters_merge.
        """
        from fxforge.adapters_merge import merge_adapters

        return merge_adapters(self, keep=keep, backend=backend, backend_options=backend_options)

    # ------------------------------------------------------------------ export, save

    def export_onnx(self, path: str | Path) -> Path:
        """Write the compiled graph as an ONNX model ONNX Runtime can load.

        All or nothing: the file (and its external data, if any) is written next to `path`
        under a temporary name and renamed into place, so an existing file survives a failed
        or killed export.
        """
        from fxforge.atomic import atomic_file
        from fxforge.backends.onnx.backend import export_onnx

        path = Path(path)
        if path.is_dir():
            from fxforge.errors import ArtifactError

            raise ArtifactError(f"cannot write ONNX to {path}: it is a directory. Name a file, "
                                f"e.g. {path / 'model.onnx'}.")
        with atomic_file(path) as staging:
            exported = self._exported_onnx()
            if exported is None or not exported.write(staging):  # else: the file prepare made, not a 2nd export
                export_onnx(self.graph_module, self.example_inputs, staging, options=self._onnx_options())
        return path

    def save(self, directory: str | Path, *, onnx: bool = False,
             companions: dict[str, Path | bytes] | None = None) -> Path:
        """Save graph, weights (safetensors), example inputs and a manifest to `directory`.

        All or nothing: a previous artifact there is replaced only once the new one is
        complete. `onnx=True` also exports `model.onnx` into the artifact. `companions`:
        files saved alongside for runtimes, by name (`{"tokenizer.json": path}`; see
        fxforge.artifact.COMPANION_FILES), e.g. `Pretrained.tokenizer_files()`.
        """
        contents = ArtifactContents(self.graph_module, self.example_inputs, pipeline_spec=self.pipeline_spec,
                                    backend=self.backend, report=self.report.pipeline.to_dict())
        return save_artifact(contents, Path(directory), onnx=onnx,
                             onnx_options=self._onnx_options() if onnx else None, companions=companions,
                             exported=self._exported_onnx() if onnx else None)

    def _onnx_options(self) -> Any:
        """The ONNX translation options this model was compiled with (off the onnx backend: those of
        the artifact's ONNX file it was loaded with, else the defaults), so an exported file
        computes what the onnx backend ran."""
        from fxforge.backends.onnx.options import OnnxOptions

        if self.backend != "onnx" and self._saved_onnx_options is not None:
            return self._saved_onnx_options
        return OnnxOptions.from_backend_options(self.backend_options if self.backend == "onnx" else None)

    def _exported_onnx(self) -> Any:
        """The ONNX model already exported for this graph (`ExportedOnnx`), if exporting it now
        would write the same: same code, same tensors unmodified, same options. None otherwise
        (e.g. after training the weights in place), and the caller exports."""
        if self._exported is None:
            return None
        from fxforge.backends.onnx.backend import export_key

        if self._exported.key != export_key(self.graph_module, self.example_inputs, self._onnx_options()):
            return None
        return self._exported


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
    backend_tolerance: Tolerance | float | None = None,
    extras: dict[str, Any] | None = None,
    max_loss: float | dict[str, float] | None = None,
) -> CompiledModel:
    """Trace `model` on example inputs, run a pipeline of passes, and lower to a backend.

    Args:
        model: the nn.Module to compile; it is never modified.
        args, kwargs: example inputs, exactly as you call the model.
        passes: a pipeline string ("quantize(bits=4),fuse_attention"), a list of passes or a
            Pipeline. `canonicalize` runs first unless the pipeline starts with it.
        backend: "eager", "onnx", "triton" or "inductor" (case-insensitive).
        calibration: an iterable of model inputs for data-driven passes (AWQ, GPTQ, EVA, ...);
            generators too. Read once and shared by every pass; each batch is checked against
            the traced inputs (CalibrationError names the pass, the batch and the input).
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
            (e.g. MatMulNBits at accuracy level 4 quantizes activations to int8). A float t
            means |backend - eager| <= t + t·|eager| elementwise.
        extras: values passes read from `PassContext.extras`, e.g. {"loss_fn": fn} for
            LoRA-GA / LoRA-SB (fn(outputs, flat_inputs) -> scalar loss).

    Raises (each an FxforgeError naming the problem and the fix):
        BackendError / PassSpecError for a bad backend, option, tolerance or pipeline, before
        anything is traced; TraceError when the model or its example inputs cannot be captured;
        PassError when a pass cannot apply or fails verification (rolled back).

    Example:
        >>> compiled = fxforge.compile(model, (x,), passes="fuse_rms_norm", backend="onnx")
        >>> y = compiled(x)
    """
    # Every argument is checked before tracing: a typo must not cost a whole pipeline run.
    backend = resolve_backend(backend)
    backend_options = check_backend_options(backend, backend_options)
    backend_tolerance = as_tolerance(backend_tolerance)
    LossBound.parse(max_loss)
    pipeline = _with_canonicalize(passes)
    _check_model(model, backend, args, kwargs)
    start = time.perf_counter()
    # NaN/inf weights or inputs would otherwise surface as canonicalize "changing the outputs"
    check_finite_model(model)
    check_finite_inputs(args, kwargs)
    calibration = CalibrationData.wrap(calibration)  # read once, shared by every pass; type checked now
    gm = trace(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    trace_seconds = time.perf_counter() - start
    example_inputs = tuple(flatten_inputs(gm, args if isinstance(args, tuple) else (args,), kwargs))
    ctx = PassContext(example_inputs=example_inputs, calibration=calibration, seed=seed,
                      extras=dict(extras or {}))
    torch.manual_seed(seed)
    traced = gm
    gm, pipeline_report = pipeline.run(traced, ctx, verify=verify, max_loss=max_loss)
    if gm is not traced:
        release(traced)  # freed now, not at the next cyclic GC (passes/cow.py)
    del traced
    report = CompileReport(pipeline_report, backend, trace_seconds=trace_seconds)
    # ctx.example_inputs, not example_inputs: a pass may have changed the graph's inputs.
    return CompiledModel(gm, backend, example_inputs=ctx.example_inputs, report=report,
                         pipeline_spec=pipeline.spec(), backend_options=backend_options,
                         verify=verify, backend_tolerance=backend_tolerance)


def _with_canonicalize(passes: str | Pass | Sequence[Pass | str] | Pipeline | None) -> Pipeline:
    pipeline = passes if isinstance(passes, Pipeline) else Pipeline(_pass_list(passes))
    if not pipeline.passes or pipeline.passes[0].name != "canonicalize":
        from fxforge.passes.canonicalize import Canonicalize

        pipeline = Pipeline([Canonicalize(), *pipeline.passes])
    return pipeline


def _pass_list(passes: Any) -> str | list[Pass | str]:
    """`passes=` as Pipeline() takes it; a PassSpecError naming what was given otherwise."""
    if passes is None:
        return []
    if isinstance(passes, (str, Pass)):
        return passes if isinstance(passes, str) else [passes]
    if not isinstance(passes, (list, tuple)):
        raise PassSpecError(f"passes must be a pipeline string (\"quantize(bits=4),fuse_attention\"), a list "
                            f"of passes or pass specs, or a Pipeline; got {type(passes).__name__}")
    for item in passes:
        if isinstance(item, type) and issubclass(item, Pass):
            raise PassSpecError(f"passes holds the class {item.__name__}, not a pass: instantiate it "
                                f"({item.__name__}() or {item.__name__}(option=...)) or write its name "
                                f"'{item.name}'")
        if not isinstance(item, (str, Pass)):
            raise PassSpecError(f"pipeline items must be fxforge passes or pass specs such as "
                                f"'quantize(bits=4)', got {item!r} ({type(item).__name__})")
    return list(passes)


def _check_model(model: Any, backend: str, args: Any, kwargs: Any) -> None:
    """What trace() cannot say well: a non-Module, non-dict kwargs, or a dtype the backend refuses."""
    if not isinstance(model, nn.Module):
        hint = " (call it: a model instance, not its class)" if isinstance(model, type) else ""
        raise TraceError(f"fxforge.compile needs a torch.nn.Module, got {type(model).__name__}{hint}; "
                         f"wrap a plain function in an nn.Module whose forward calls it")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TraceError(f"kwargs must be a dict of keyword inputs (name -> tensor), got {type(kwargs).__name__}")
    flat = pytree.tree_leaves(((args if isinstance(args, tuple) else (args,)), dict(kwargs or {})))
    check_dtypes(backend, model, flat)


@contextmanager
def _backend_errors(backend: str, doing: str) -> Iterator[None]:
    """Re-raise anything but an FxforgeError from a backend as a BackendError naming the backend."""
    try:
        yield
    except FxforgeError:
        raise
    except Exception as exc:
        raise BackendError(
            f"backend '{backend}' failed while {doing}: {type(exc).__name__}: {str(exc).strip()[:500]}. "
            f"The graph itself runs on backend='eager'; use it, or compile with another backend"
        ) from exc


def load(directory: str | Path, backend: str | None = None, **backend_options: Any) -> CompiledModel:
    """Load a compiled model saved with `CompiledModel.save(directory)`.

    Every file is checked against the manifest's checksums first; a missing or corrupted file
    raises ArtifactError naming it. `backend` overrides the backend it was saved with. An
    artifact saved with `onnx=True` runs on the onnx backend from its model.onnx (checked
    against eager on the example inputs like any backend), not from a new export, unless the
    backend options ask for other translation options or a `path`.
    """
    saved = load_artifact(directory)
    return CompiledModel(saved.graph_module, backend or saved.backend, example_inputs=saved.example_inputs,
                         pipeline_spec=saved.pipeline_spec, backend_options=backend_options,
                         saved_onnx=saved.onnx)
