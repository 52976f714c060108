"""One composition cell = a model through `canonicalize, A, B`, verified, then on each backend.

A cell's status (what `results.json` records and docs/composition.md shows):

    composes   A then B ran and verified, and B rewrote sites (the count is recorded)
    skips      B rewrote no site but said why for each candidate (`PassResult.skipped`)
    refused    the pipeline was refused before running (the pair check of passes/pipeline.py,
               an error naming both passes), or B refused its input with an FxforgeError
    n/a        A (or B, on the model alone) does not apply to this model (e.g. a KV cache on an
               encoder); the reason is the pass's own error
    fail       a crash or a verification failure: a bug
    silent     B rewrote nothing and said nothing: always a failure of the test

Backends (a composed/skipped cell only): eager is the verified pipeline itself; "onnx" exports and
checks against eager on two shapes; "triton" (under TRITON_INTERPRET=1) runs where every fxforge
op of the graph has a Triton kernel, else records which op has none.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.fx import GraphModule

from composition.models import build, calibration, input_ids

# Every built-in pass but canonicalize (which runs first in every cell), with options that fit
# the tiny models (group sizes that divide 64). `bitdelta` gets its base model from the cell.
PASS_OPTIONS: dict[str, str] = {
    # the LM head stays float, as when the matrix was recorded (quantize's default now includes
    # it); the layers are what every pair is about
    "quantize": "quantize(bits=4,group_size=32,include_lm_head=False)",
    "llm_int8": "llm_int8",
    "quantize_fp": "quantize_fp",
    "quantize_dynamic": "quantize_dynamic",
    "bitdelta": "bitdelta",
    "shift_add": "shift_add(group_size=32)",
    "add_adapters": "add_adapters(rank=4)",
    "merge_adapters": "merge_adapters",
    "unmerge_adapters": "unmerge_adapters",
    "prune": "prune(ratio=0.25)",
    "sparsify": "sparsify",
    "fuse_attention": "fuse_attention",
    "fuse_rms_norm": "fuse_rms_norm",
    "fuse_projections": "fuse_projections",
    "add_kv_cache": "add_kv_cache",
    "add_medusa_heads": "add_medusa_heads(num_heads=2)",
}
BACKENDS = ("eager", "onnx", "triton")
SHAPES = [(2, 12), (1, 9)]


def all_passes() -> list[str]:
    """The registered built-in passes the matrix covers: every one but canonicalize and the two
    passes that prepare a Medusa graph for decoding (`split_medusa_heads`,
    `medusa_greedy_verify`): they run last, inside `fxforge.medusa`'s decoder export, on a graph
    with heads and a KV cache, and are covered by tests/passes/test_medusa_decoding_passes.py."""
    from fxforge.passes.registry import BUILTIN_PASSES

    return [name for name in BUILTIN_PASSES if name not in NOT_IN_MATRIX]


NOT_IN_MATRIX = ("canonicalize", "split_medusa_heads", "medusa_greedy_verify")


@lru_cache(maxsize=None)  # passes are frozen: one object per (pass, model) serves every cell
def make_pass(name: str, model_name: str):
    from fxforge.passes.registry import get_pass_class
    from fxforge.passes.spec import parse_pass

    if name == "bitdelta":  # its base is a model, which a pipeline string cannot hold
        return get_pass_class(name)(base=build(model_name).base)
    return parse_pass(PASS_OPTIONS[name])


@dataclass
class Cell:
    status: str
    text: str = ""
    sites: list[int] = field(default_factory=list)  # sites of A and B
    skipped: int = 0  # B's skipped candidates
    backends: dict[str, list[str]] = field(default_factory=dict)  # backend -> [status, text]
    graph: str = ""  # the result's kind for the backends: its fxforge ops and number of inputs
    seconds: float = 0.0

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Stage:
    """A graph after some passes, with the context (example inputs) it verifies on."""

    gm: GraphModule | None
    example_inputs: tuple
    sites: list[int]
    error: Exception | None = None


def _ctx(example_inputs: tuple):
    from fxforge.passes.context import PassContext

    return PassContext(example_inputs=example_inputs, calibration=calibration())


@lru_cache(maxsize=None)
def canonical(model_name: str) -> Stage:
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace

    ids = input_ids()
    gm = trace(build(model_name).model, (ids,))
    canonicalize(gm)
    return Stage(gm, (ids,), [])


def run_after(stage: Stage, name: str, model_name: str) -> tuple[Stage, object]:
    """`name` on the stage's graph through the verified pipeline; (new stage, its PassRecord)."""
    from fxforge.passes.pipeline import PipelineReport, run_pass

    ctx = _ctx(stage.example_inputs)
    report = PipelineReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = run_pass(make_pass(name, model_name), stage.gm, ctx, report=report)
    record = report.records[-1]
    return Stage(gm, ctx.example_inputs, stage.sites + [record.sites]), record


@lru_cache(maxsize=None)
def first(model_name: str, name: str) -> Stage:
    """The model after `canonicalize, name` (cached: every cell of row `name` starts here)."""
    try:
        return run_after(canonical(model_name), name, model_name)[0]
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's reason
        return Stage(None, (), [], error=exc)


def classify(exc: Exception) -> str:
    """refused (the pass or pipeline said no, with a reason) or fail (a crash, a failed check)."""
    from fxforge.errors import FxforgeError, PassError

    if not isinstance(exc, FxforgeError):
        return "fail"
    if isinstance(exc, PassError) and (exc.__cause__ is not None and not isinstance(exc.__cause__, FxforgeError)
                                       or "rolled back" in str(exc)):
        return "fail"
    return "refused"


def first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}" if str(exc).strip() else type(exc).__name__


def pair_check(model_name: str, a: str, b: str) -> Exception | None:
    """The pipeline's up-front check of the pair (PassSpecError naming both), or None."""
    from fxforge.errors import PassSpecError
    from fxforge.passes.pipeline import Pipeline

    try:
        Pipeline([make_pass(a, model_name), make_pass(b, model_name)])
    except PassSpecError as exc:
        return exc
    return None


def run_cell(model_name: str, a: str, b: str, backends=BACKENDS, backend_runner=None) -> Cell:
    """The cell of pair (a, b) on the model; `backend_runner(stage, backend)` defaults to
    `run_backend` (run_matrix.py passes one that runs each kind of graph once)."""
    start = time.perf_counter()
    cell = _run_cell(model_name, a, b, backends, backend_runner or run_backend)
    cell.seconds = round(time.perf_counter() - start, 2)
    return cell


def _run_cell(model_name: str, a: str, b: str, backends, backend_runner) -> Cell:
    refusal = pair_check(model_name, a, b)
    if refusal is not None:
        return Cell("refused", first_line(refusal))
    stage = first(model_name, a)
    if stage.error is not None:
        return Cell("n/a" if classify(stage.error) == "refused" else "fail",
                    f"{a} alone: {first_line(stage.error)}")
    try:
        after, record = run_after(stage, b, model_name)
    except Exception as exc:  # noqa: BLE001 - the cell's reason
        status = classify(exc)
        alone = first(model_name, b)
        if status == "refused" and alone.error is not None and classify(alone.error) == "refused":
            return Cell("n/a", f"{b} alone: {first_line(alone.error)}", sites=stage.sites)
        return Cell(status, first_line(exc), sites=stage.sites)
    if record.sites:
        cell = Cell("composes", f"{b}: {record.sites} sites", sites=after.sites, skipped=len(record.skipped))
    elif record.skipped:
        where, why = record.skipped[0]
        cell = Cell("skips", f"{b} skipped {len(record.skipped)}: {where}: {why}", sites=after.sites,
                    skipped=len(record.skipped))
    else:
        return Cell("silent", f"{b} rewrote 0 sites after {a} and gave no reason", sites=after.sites)
    cell.backends["eager"] = ["pass", "verified pipeline"]
    cell.graph = graph_kind(after)
    for backend in backends:
        if backend != "eager":
            cell.backends[backend] = backend_runner(after, backend)
    return cell


def graph_kind(stage: Stage) -> str:
    """What decides how a graph lowers: its fxforge ops and its inputs ("linear_wq+attention/1")."""
    from fxforge.backends import fxforge_ops_in

    return f"{'+'.join(sorted(fxforge_ops_in(stage.gm))) or 'aten'}/{len(stage.example_inputs)}"


def run_backend(stage: Stage, backend: str) -> list[str]:
    """[status, text]: the graph on `backend` == eager at two shapes, or why it cannot run there."""
    from fxforge.backends import fxforge_ops_in
    from fxforge.ir.ops import get_op

    ops = fxforge_ops_in(stage.gm)
    if backend == "triton":
        from fxforge.kernels import load_all

        load_all()  # the kernels register their lowerings when imported
        missing = [op for op in ops if "triton" not in get_op(op).lowerings]
        if missing:
            return ["n/a", f"no Triton kernel for fxforge::{', fxforge::'.join(missing)}"]
        if not ops:
            return ["n/a", "no fxforge op in the graph: nothing for Triton to run"]
    from fxforge.api import DEFAULT_BACKEND_TOLERANCE, CompiledModel
    from fxforge.backends import check_tolerance
    from fxforge.ir.verify import compare_outputs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = CompiledModel(stage.gm, backend, example_inputs=stage.example_inputs)
            if len(stage.example_inputs) == 1 and stage.example_inputs[0].dtype == torch.long:
                batch, seq = SHAPES[1]  # a second shape (graphs with a KV cache take other inputs)
                x = input_ids(batch, seq, seed=5)
                tolerance = check_tolerance(stage.gm, backend, DEFAULT_BACKEND_TOLERANCE, compiled.backend_options)
                comparison = compare_outputs(_tensors(stage.gm(x)), _tensors(compiled.run_flat(x)), tolerance)
                if not comparison.ok:
                    return ["fail", f"differs from eager at {batch}x{seq}: {comparison}"[:300]]
    except Exception as exc:  # noqa: BLE001 - the backend's reason (a missing lowering names the op)
        return ["fail", first_line(exc)]
    return ["pass", f"{', '.join(ops) or 'aten only'}"]


def _tensors(outputs) -> list[torch.Tensor]:
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [o for o in outputs if isinstance(o, torch.Tensor)]
