"""Backend `onnx`: torch.onnx.export(dynamo=True) with fxforge's translation table, then ORT.

`export_onnx` writes the file; `prepare` exports (to `path` if given; else a model stored inline
stays in memory as bytes, one with external data goes to a temporary file removed as soon as the
session holds it), opens an `onnxruntime.InferenceSession` and returns a runner taking the graph's
flat inputs. Dimensions that are symbolic in the graph (batch, sequence) stay dynamic in the ONNX
model.

Export once: the runner keeps what prepare exported (`OnnxRunner.exported`: the bytes, or the
user's file) with the `export_key` of the graph it came from, and `CompiledModel.save(onnx=True)`
/ `export_onnx` write that model instead of exporting again while the key still matches.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import warnings
import weakref
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.export import Dim
from torch.fx import GraphModule

from fxforge.backends import fxforge_ops_in
from fxforge.backends.onnx.options import OnnxOptions
from fxforge.errors import BackendError, MissingLoweringError
from fxforge.ir.ops import backends_lowering, get_op

logger = logging.getLogger(__name__)
# Weights above this go to an external data file (protobuf's own limit is 2 GB). Small enough
# that a model of real size never has its weights serialized in memory, large enough that
# tests and small models stay one self-contained file.
EXTERNAL_DATA_BYTES = 256 * 2**20


def dynamic_shapes_of(gm: GraphModule) -> tuple[dict[int, Any] | None, ...]:
    """torch.export dynamic_shapes for `gm`'s placeholders: symbolic dims stay dynamic."""
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dims = {i: Dim.AUTO for i, size in enumerate(val.shape) if not isinstance(size, int)}
        specs.append(dims or None)
    return tuple(specs)


def check_lowerable(gm: GraphModule) -> None:
    from fxforge.backends.onnx.lowerings import load_all

    load_all()
    for name in fxforge_ops_in(gm):
        if "onnx" not in get_op(name).lowerings:
            raise MissingLoweringError("onnx", name, [b for b in backends_lowering(name) if b != "eager"])


def export_onnx(gm: GraphModule, example_inputs: Sequence[Any], path: str | os.PathLike,
                input_names: Sequence[str] | None = None, optimize: bool = True,
                options: OnnxOptions | None = None) -> Path:
    """Export `gm` to an ONNX file at `path` (weights inline below EXTERNAL_DATA_BYTES, else in
    `<path>.data`, written tensor by tensor).

    `optimize`: fold constants, pre-transpose weights, drop dead code and debug metadata
    (`fxforge.backends.onnx.optimize`); False writes the exporter's raw graph.
    `options`: how ops are translated (`OnnxOptions`: MatMulNBits accuracy level, causal
    attention operator); default `OnnxOptions()`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = export_model(gm, example_inputs, input_names=input_names, optimize=optimize, options=options)
    write_model(model, path)
    release_weights(model)  # its folded (pre-transposed) weights go now, before ORT loads
    return path


def export_model(gm: GraphModule, example_inputs: Sequence[Any], input_names: Sequence[str] | None = None,
                 optimize: bool = True, options: OnnxOptions | None = None) -> Any:
    """`gm` as an in-memory ONNX model (`onnx_ir.Model`), exported and optimized as
    `export_onnx` writes it; `write_model` or `serialize_model` turn it into a file or bytes."""
    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    check_lowerable(gm)
    names = list(input_names or [n.name for n in gm.graph.nodes if n.op == "placeholder"])

    def export(model: Any) -> Any:
        from fxforge.backends.onnx.torchlib_registry import cached_torchlib_registry

        with warnings.catch_warnings(), cached_torchlib_registry():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                model,
                tuple(example_inputs),
                dynamo=True,
                dynamic_shapes=dynamic_shapes_of(gm),
                input_names=names,
                custom_translation_table=translation_table(options),
                opset_version=OPSET_VERSION,
                optimize=False,  # its opset-23 fusions emit RotaryEmbedding nodes ORT 1.32 rejects
                verbose=False,
            )

    prepared = program_for_export(gm, example_inputs)
    try:
        if prepared is gm:
            program = export(prepared)
        else:  # a program built from the graph's own values: type promotion reuses them too
            from fxforge.backends.onnx.type_promotion import reusing_graph_values

            with reusing_graph_values():
                program = export(prepared)
    except Exception as exc:  # noqa: BLE001 - the shortcut failed: the exporter's own capture decides
        if prepared is gm:
            raise
        logger.debug("exporting the built ExportedProgram failed (%s); exporting through torch.export", exc)
        del prepared
        program = export(gm)
    from fxforge.backends.onnx.bfloat16_islands import compute_bfloat16_in_float32
    from fxforge.backends.onnx.compute_dtype import graph_float_dtypes
    from fxforge.backends.onnx.optimize import optimize_model

    model = program.model
    if torch.bfloat16 not in graph_float_dtypes(gm):  # bfloat16 islands of a wider model (Falcon's ALiBi)
        compute_bfloat16_in_float32(model.graph)
    from fxforge.backends.onnx.low_precision_weights import sink_weight_casts

    sink_weight_casts(model.graph)  # bf16 weights of a float32-compute graph: stored transposed, cast late
    if optimize:
        optimize_model(model)
        from fxforge.backends.onnx.low_precision_weights import defer_weight_casts

        defer_weight_casts(model.graph)  # after the layouts are folded: cast each weight when it is used
    return model


def program_for_export(gm: GraphModule, example_inputs: Sequence[Any]) -> Any:
    """What torch.onnx.export is given: `gm` as an ExportedProgram built from its own metadata
    (`exported_program.as_exported_program`: the exporter then skips its torch.export re-trace of
    a graph we already have), or `gm` itself where that does not apply."""
    from fxforge.backends.onnx.exported_program import as_exported_program

    try:
        program = as_exported_program(gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - an optimization only: the exporter's own capture still works
        logger.debug("exporting %s through torch.export: %s", type(gm).__name__, exc)
        program = None
    return gm if program is None else program


def write_model(model: Any, path: Path) -> None:
    """Save an `export_model` result to `path`; its weights go to `<path>.data` above
    EXTERNAL_DATA_BYTES."""
    from fxforge.backends.onnx.optimize import initializer_bytes

    import onnx_ir as ir

    # Above the threshold each weight goes straight from its tensor to `<file>.data`: saving
    # inline first builds the whole protobuf in memory (one more copy of the model).
    external = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)


def release_weights(model: Any) -> None:
    """Free an exported model's weights now: the ONNX IR is cyclic (nodes and graphs point at each
    other), so dropping the model frees nothing until a full garbage collection, which walks every
    object of the process (0.86 s after a 4-layer TinyLlama-shaped decoder export); its weights
    (the folded, pre-transposed ones are the IR's own) are dropped from it instead. The model is
    unusable afterwards."""
    for value in model.graph.initializers.values():
        value.const_value = None


def serialize_model(model: Any) -> bytes | None:
    """An `export_model` result as the bytes of one .onnx file, or None when its weights belong in
    external data (above EXTERNAL_DATA_BYTES: holding them serialized would be one more copy)."""
    import onnx_ir as ir

    from fxforge.backends.onnx.optimize import initializer_bytes

    if initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        return None
    return ir.serde.serialize_model(model).SerializeToString()


@dataclass(frozen=True)
class ExportedOnnx:
    """The ONNX model `prepare` exported, kept so that `CompiledModel.save(onnx=True)` and
    `export_onnx` write it instead of exporting the graph again (see `export_key`).

    data: the .onnx file's bytes (a model stored inline, at most EXTERNAL_DATA_BYTES), or
    path: the file the user asked prepare to keep (`path=`; with `<path>.data` if it has one).
    """

    key: tuple
    data: bytes | None = None
    path: Path | None = None

    def write(self, target: Path) -> bool:
        """Write this model to `target` (a .onnx path; external data next to it); False if it
        cannot be reused there (the kept file is gone, or its external data is named after a
        different file name)."""
        if self.data is not None:
            target.write_bytes(self.data)
            return True
        if self.path is None or not self.path.is_file():
            return False
        data = self.path.with_name(self.path.name + ".data")
        if data.exists() and self.path.name != target.name:
            return False  # the file names its data file: it only works under its own name
        shutil.copyfile(self.path, target)
        if data.exists():
            shutil.copyfile(data, target.with_name(target.name + ".data"))
        return True


def export_key(gm: GraphModule, example_inputs: Sequence[Any], options: OnnxOptions | None) -> tuple:
    """What an export of `gm` depends on: its code, the identity, layout and in-place version of
    every tensor it holds, the example inputs' shapes and the translation options. Equal keys
    mean an earlier export of this graph is still what exporting it now would write; training
    the weights in place (their `_version` moves) or a rewritten graph changes the key."""
    from fxforge.ir.graph import params_and_buffers

    tensors = tuple((name, t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
                     _version(t)) for name, t in params_and_buffers(gm).items())
    inputs = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in example_inputs)
    return (gm.code, tensors, inputs, options or OnnxOptions())


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be written in place)
        return None


class OnnxRunner:
    """Runs an ONNX model (a file, or its bytes) in ONNX Runtime with the graph's flat inputs;
    returns torch tensors."""

    def __init__(self, path: str | os.PathLike | bytes, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = True,
                 low_precision_weights: bool = False):
        """`spinning=False` stops ORT's idle threads from busy-waiting between runs: slightly
        slower on a dedicated machine, but far steadier timings on a shared one (benchmarks).
        `low_precision_weights`: the model casts bf16/fp16 weights to float32 where it reads them;
        ORT must not fold those casts (low_precision_weights.py)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        # None once a temporary file has been removed, or for a model opened from its bytes
        self.path: Path | None = None if isinstance(path, bytes) else Path(path)
        extra = {}
        if low_precision_weights:
            from fxforge.backends.onnx.low_precision_weights import session_options

            extra = session_options(options)
        self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                            providers=list(providers), **extra)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # set by prepare() for a low-precision graph exported computing in float32
        self.float32_inputs = False
        self.output_dtypes: list[torch.dtype | None] | None = None
        self.exported: ExportedOnnx | None = None  # set by prepare() when the model can be reused

    def __call__(self, *flat_inputs: Any) -> tuple[torch.Tensor, ...]:
        feeds = {}
        tensors = [x for x in flat_inputs if isinstance(x, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise ValueError(f"ONNX model takes {len(self.input_names)} inputs {self.input_names}, got {len(tensors)}")
        for name, x in zip(self.input_names, tensors):
            if self.float32_inputs and x.dtype in (torch.bfloat16, torch.float16):
                x = x.float()
            feeds[name] = _to_numpy(x)
        outputs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feeds)]
        if self.output_dtypes is not None:  # back to what eager returns for this graph
            outputs = [o.to(d) if d is not None and o.dtype != d else o for o, d in zip(outputs, self.output_dtypes)]
        return tuple(outputs)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        raise TypeError("ONNX Runtime inputs cannot be bfloat16 from numpy; cast the input to float16/float32")
    return x.contiguous().numpy()


def prepare(gm: GraphModule, example_inputs: Sequence[Any] = (), *, path: str | os.PathLike | None = None,
            threads: int | None = None, spinning: bool = True, accuracy_level: int = 4,
            causal_attention: str = "GroupQueryAttention", bidirectional_attention: str = "MultiHeadAttention",
            dtype: Literal["auto", "float32", "model"] = "auto",
            **unknown: Any) -> OnnxRunner:
    """Export `gm` and open it in ONNX Runtime. `path`: where to keep the .onnx file;
    `threads`, `spinning`: ORT's intra-op thread count and whether idle threads busy-wait;
    `accuracy_level`, `causal_attention`, `bidirectional_attention`: how ops are translated
    (see `OnnxOptions`);
    `dtype`: "auto"/"float32" export a bfloat16/float16 graph computing in float32 (ORT's CPU
    provider lacks their kernels; inputs and outputs are cast, see compute_dtype.py): "auto"
    keeps its weights in their dtype, cast where read (memory P, slower: low_precision_weights.py),
    "float32" stores float32 copies (2P, ORT's full speed); "model" exports it as it is."""
    from fxforge.backends.onnx.compute_dtype import (as_float32_graph, float32_inputs, has_low_precision_tensors,
                                                     needs_float32, output_dtypes)

    if unknown:
        valid = [p for p in inspect.signature(prepare).parameters if p not in ("gm", "example_inputs", "unknown")]
        raise BackendError(f"unknown options for the onnx backend: {sorted(unknown)}. Valid options: "
                           f"{', '.join(valid)}.")
    options = OnnxOptions(accuracy_level=accuracy_level, causal_attention=causal_attention,
                          bidirectional_attention=bidirectional_attention)
    runner_options = {"threads": threads, "spinning": spinning}
    if not needs_float32(gm, dtype):
        runner = _export_and_open(gm, example_inputs, path, options, owned=False, **runner_options)
        if runner.exported is not None:  # the file a save of this very graph would write
            runner.exported = dataclasses.replace(runner.exported, key=export_key(gm, example_inputs, options))
        return runner
    restore = output_dtypes(gm)
    keep_weights = dtype == "auto"  # bf16/fp16 weights cast where read (P in memory); "float32": copies (2P)
    runner_options["low_precision_weights"] = keep_weights and has_low_precision_tensors(gm)
    # a temporary argument: _export_and_open holds the only reference and frees it after export.
    # Its model computes in float32, not what a save exports: nothing is kept for reuse.
    runner = _export_and_open(as_float32_graph(gm, keep_weights), float32_inputs(example_inputs), path, options, owned=True,
                              **runner_options)
    runner.float32_inputs, runner.output_dtypes, runner.exported = True, restore, None
    return runner


def _export_and_open(gm: GraphModule, example_inputs: Sequence[Any], path: str | os.PathLike | None,
                     options: OnnxOptions, owned: bool, **runner_options: Any) -> OnnxRunner:
    """Export to `path` (the user's file), to bytes in memory (a model stored inline), or to a temp
    dir (one with external data), then open ORT. An `owned` graph (made for the export) is freed
    before ORT loads the model, so the two never coexist in memory. The runner's `exported`
    (key filled in by prepare) is what `CompiledModel.save`/`export_onnx` reuse."""
    if path is not None:  # the user asked to keep the file: it is theirs
        export_onnx(gm, example_inputs, path, options=options)
        if owned:
            _free(gm)
            del gm
        runner = OnnxRunner(path, **runner_options)
        runner.exported = ExportedOnnx(key=(), path=Path(path))
        return runner
    model = export_model(gm, example_inputs, options=options)
    if owned:
        _free(gm)
        del gm
    data = serialize_model(model)
    if data is None:
        held = [model]
        del model  # _open_from_temp holds the only reference, so it can free the model before ORT loads
        return _open_from_temp(held, **runner_options)
    release_weights(model)  # its folded weights go before ORT holds its own copy
    del model
    runner = OnnxRunner(data, **runner_options)
    runner.exported = ExportedOnnx(key=(), data=data)
    return runner


def _free(gm: GraphModule) -> None:
    from fxforge.passes.cow import release

    release(gm)


def _open_from_temp(held: list[Any], **runner_options: Any) -> OnnxRunner:
    """Write an exported model (`held`, a list holding its only reference) with external data into a
    private temp dir, open the session, and leave nothing behind.

    The session holds the model once created (ORT reads the file and its external data in, or
    maps them, and a mapping outlives the unlinked file on POSIX), so the directory is removed
    at once: a 1B model no longer leaves 4 GB in /tmp per compile, and a failed export leaves
    nothing either. Where the files cannot be removed while the session uses them (Windows),
    the directory goes when the runner is garbage collected, or at interpreter exit. Such a
    model is not kept for reuse (`exported` is None): a save exports it again, unless the
    backend option `path=` keeps the file.
    """
    directory = Path(tempfile.mkdtemp(prefix="fxforge-onnx-"))
    runner = None
    try:
        model = held.pop()
        write_model(model, directory / "model.onnx")
        release_weights(model)  # its folded weights go now, before ORT loads
        del model
        runner = OnnxRunner(directory / "model.onnx", **runner_options)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists() and runner is not None:
            weakref.finalize(runner, shutil.rmtree, str(directory), True)
    if not directory.exists():
        runner.path = None  # the file is gone: the session is all there is
    return runner


def open_exported(gm: GraphModule, example_inputs: Sequence[Any], file: Path, options: OnnxOptions, *,
                  threads: int | None = None, spinning: bool = True,
                  dtype: Literal["auto", "float32", "model"] = "auto", **_: Any) -> OnnxRunner | None:
    """A runner on `file`, an export of `gm` with `options` (a saved artifact's model.onnx), or
    None where prepare would export something else: a bfloat16/float16 graph it would run in
    float32 (the saved file keeps the graph's dtype). The session only reads the file as data;
    `CompiledModel` checks it against eager on the example inputs as for a fresh export."""
    from fxforge.backends.onnx.compute_dtype import needs_float32

    if needs_float32(gm, dtype):
        return None
    runner = OnnxRunner(file, threads=threads, spinning=spinning)
    runner.exported = ExportedOnnx(key=export_key(gm, example_inputs, options), path=Path(file))
    return runner
