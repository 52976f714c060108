"""`CompiledModel.merge_adapters()`: fold trained adapters into the base weights, as a new model.

    merged = compiled.merge_adapters()     # plain linears: exports to ONNX, runs on every backend
    merged.export_onnx("merged.onnx")

It runs the `merge_adapters` pass (verified like any pass: the merged graph must give the
adapted graph's outputs within the pass's tolerance) on the compiled graph and builds a new
CompiledModel around the result; `compiled` itself keeps its adapters and stays trainable.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from fxforge.errors import FxforgeError
from fxforge.passes.adapters.common import adapter_records
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline

if TYPE_CHECKING:
    from fxforge.api import CompiledModel


def merge_adapters(compiled: "CompiledModel", *, keep: bool = True, backend: str | None = None,
                   backend_options: dict[str, Any] | None = None) -> "CompiledModel":
    """A new CompiledModel whose adapters are folded into their base weights; `compiled` is unchanged.

    keep: remember the adapter tensors in the merged graph's metadata so the `unmerge_adapters`
        pass can restore them (for methods whose merge is invertible); False forgets them.
    backend, backend_options: for the new model; default the same backend and its options, except
        an ONNX `path`, which belongs to `compiled` (the merged file would overwrite it): pass a new
        one. Naming another backend starts from no options.
    """
    from fxforge.api import CompiledModel, CompileReport

    gm = compiled.graph_module
    if not adapter_records(gm):
        raise FxforgeError("merge_adapters: the model has no adapters to merge; compile it with "
                           "passes='add_adapters(...)' first (adapters merged before are part of the weights)")
    if backend_options is None:
        backend_options = {k: v for k, v in compiled.backend_options.items() if k != "path"} if backend is None else {}
    pipeline = Pipeline(f"merge_adapters(keep={keep})")
    merged, report = pipeline.run(gm, PassContext(example_inputs=compiled.example_inputs))
    records = copy.copy(compiled.report.pipeline)
    records.records = [*compiled.report.pipeline.records, *report.records]
    spec = ",".join(s for s in (compiled.pipeline_spec, pipeline.spec()) if s)
    return CompiledModel(merged, backend or compiled.backend, example_inputs=compiled.example_inputs,
                         report=CompileReport(records, backend or compiled.backend), pipeline_spec=spec,
                         backend_options=backend_options)
