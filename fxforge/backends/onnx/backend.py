"""Backend `onnx`: torch.onnx.export(dynamo=True) with fxforge's translation table, then ORT.

`export_onnx` writes the file; `prepare` exports to a temporary file (or `path`), opens an
`onnxruntime.InferenceSession` and returns a runner taking the graph's flat inputs; a temporary
file is removed as soon as the session holds the model. Dimensions
that are symbolic in the graph (batch, sequence) stay dynamic in the ONNX model.
"""
from __future__ import annotations

import gc
import inspect
import logging
import os
import shutil
import tempfile
import warnings
import weakref
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
    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    check_lowerable(gm)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(input_names or [n.name for n in gm.graph.nodes if n.op == "placeholder"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            gm,
            tuple(example_inputs),
            dynamo=True,
            dynamic_shapes=dynamic_shapes_of(gm),
            input_names=names,
            custom_translation_table=translation_table(options),
            opset_version=OPSET_VERSION,
            optimize=False,  # its opset-23 fusions emit RotaryEmbedding nodes ORT 1.32 rejects
            verbose=False,
        )
    from fxforge.backends.onnx.optimize import initializer_bytes, optimize_model

    if optimize:
        optimize_model(program.model)
    # Above the threshold, each weight goes straight from its tensor to `<file>.data`: saving
    # inline first builds the whole protobuf in memory (one more copy of the model).
    program.save(str(path), external_data=initializer_bytes(program.model) > EXTERNAL_DATA_BYTES)
    del program
    gc.collect()  # the ONNX IR is cyclic: its folded (pre-transposed) weights go now, before ORT loads
    return path


class OnnxRunner:
    """Runs an ONNX file in ONNX Runtime with the graph's flat inputs; returns torch tensors."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = True):
        """`spinning=False` stops ORT's idle threads from busy-waiting between runs: slightly
        slower on a dedicated machine, but far steadier timings on a shared one (benchmarks)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.path: Path | None = Path(path)  # None once a temporary file has been removed
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        # set by prepare() for a low-precision graph exported computing in float32
        self.float32_inputs = False
        self.output_dtypes: list[torch.dtype | None] | None = None

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
    provider lacks their kernels; inputs and outputs are cast, see compute_dtype.py), "model"
    exports it as it is."""
    from fxforge.backends.onnx.compute_dtype import (as_float32_graph, float32_inputs, needs_float32,
                                                     output_dtypes)

    if unknown:
        valid = [p for p in inspect.signature(prepare).parameters if p not in ("gm", "example_inputs", "unknown")]
        raise BackendError(f"unknown options for the onnx backend: {sorted(unknown)}. Valid options: "
                           f"{', '.join(valid)}.")
    options = OnnxOptions(accuracy_level=accuracy_level, causal_attention=causal_attention,
                          bidirectional_attention=bidirectional_attention)
    runner_options = {"threads": threads, "spinning": spinning}
    if not needs_float32(gm, dtype):
        return _export_and_open(gm, example_inputs, path, options, owned=False, **runner_options)
    restore = output_dtypes(gm)
    # a temporary argument: _export_and_open holds the only reference and frees it after export
    runner = _export_and_open(as_float32_graph(gm), float32_inputs(example_inputs), path, options, owned=True,
                              **runner_options)
    runner.float32_inputs, runner.output_dtypes = True, restore
    return runner


def _export_and_open(gm: GraphModule, example_inputs: Sequence[Any], path: str | os.PathLike | None,
                     options: OnnxOptions, owned: bool, **runner_options: Any) -> OnnxRunner:
    """Export to `path` (the user's file) or a temp dir, then open ORT. An `owned` graph (made
    for the export) is freed before ORT loads the model, so the two never coexist in memory."""
    if path is not None:  # the user asked to keep the file: it is theirs
        export_onnx(gm, example_inputs, path, options=options)
        if owned:
            _free(gm)
            del gm
        return OnnxRunner(path, **runner_options)
    return _prepare_from_temp(gm, example_inputs, options, owned=owned, **runner_options)


def _free(gm: GraphModule) -> None:
    from fxforge.passes.cow import release

    release(gm)


def _prepare_from_temp(gm: GraphModule, example_inputs: Sequence[Any], options: OnnxOptions, owned: bool = False,
                       **runner_options: Any) -> OnnxRunner:
    """Export into a private temp dir, open the session, and leave nothing behind.

    The session holds the model once created (ORT reads the file and its external data in, or
    maps them, and a mapping outlives the unlinked file on POSIX), so the directory is removed
    at once: a 1B model no longer leaves 4 GB in /tmp per compile, and a failed export leaves
    nothing either. Where the files cannot be removed while the session uses them (Windows),
    the directory goes when the runner is garbage collected, or at interpreter exit.
    """
    directory = Path(tempfile.mkdtemp(prefix="fxforge-onnx-"))
    runner = None
    try:
        export_onnx(gm, example_inputs, directory / "model.onnx", options=options)
        if owned:
            _free(gm)
            del gm
        runner = OnnxRunner(directory / "model.onnx", **runner_options)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists() and runner is not None:
            weakref.finalize(runner, shutil.rmtree, str(directory), True)
    if not directory.exists():
        runner.path = None  # the file is gone: the session is all there is
    return runner
