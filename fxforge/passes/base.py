"""Passes as data: the Pass base class, its context and result, the registry, and Pipeline.

A pass is a frozen dataclass whose fields are its options; its `name` equals its file name and
is how pipelines refer to it (`"quantize(bits=4,group_size=128)"`). `Pipeline` runs passes one
at a time, each on a copy of the graph, and verifies each result (`passes/verification.py`):
against what the pass claims to compute (the graph before for exact passes, the pass's
`Semantics` for lossy ones) at the example inputs and at a second shape, and measures its loss
against the graph before. A pass that raises or fails the check is rolled back: the error
names the pass, the output with the largest error and the first node whose value diverged.
Read `fxforge/passes/README.md` before writing a pass.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
from torch.fx import GraphModule

from fxforge.calibration.data import (CalibrationData, as_flat_inputs, checked_batches, empty_calibration,
                                      missing_calibration)
from fxforge.errors import PassError, PassSpecError
from fxforge.ir.graph import finalize, format_bytes, summarize
from fxforge.ir.reference import Semantics, reference_graph
from fxforge.ir.verify import Comparison, LossBound, OutputError, Tolerance, compare_outputs, run_graph

__all__ = ["Pass", "PassContext", "PassResult", "Pipeline", "PipelineReport", "PassRecord",
           "Semantics", "Tolerance", "register_pass", "registered_passes", "get_pass_class", "as_flat_inputs"]


# --------------------------------------------------------------------------- context


def default_progress(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """A tqdm progress bar; silent when FXFORGE_PROGRESS=0."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", os.environ.get("FXFORGE_PROGRESS", "1") == "0")
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    example_inputs: the flat inputs the graph takes (used for verification).
    calibration: an iterable of model inputs for data-driven passes, generators included. Each
        item is a tensor (the first input), a tuple of positional inputs, a dict keyed by input
        name, or an (args, kwargs) pair. It is wrapped in a `CalibrationData` that reads the
        source once and caches it, so every pass sees the same batches. Passes read it only
        through `calibration_batches(gm, limit, pass_name=...)`, which checks every batch.
    seed: for any randomness a pass uses (initializations, sampling).
    progress: a tqdm-like factory: `ctx.progress(iterable, desc=..., total=...)`.
    """

    example_inputs: tuple[Any, ...] = ()
    calibration: Iterable[Any] | None = None
    seed: int = 0
    progress: Callable[..., Any] = default_progress
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # read once, here: a generator shared by two calibrated passes must feed both
        self.calibration = CalibrationData.wrap(self.calibration)

    def require_calibration(self, pass_name: str, what: str | None = None, *, method: str | None = None,
                            hint: str = "") -> CalibrationData:
        """The calibration data, or a CalibrationError naming the pass (and `method`) when there
        is none or it is empty. Call it before doing any work, so a pass fails first thing."""
        self.calibration = CalibrationData.wrap(self.calibration)  # in case it was assigned after construction
        if self.calibration is None:
            raise missing_calibration(pass_name, method, what, hint)
        if not self.calibration.read(1):
            raise empty_calibration(pass_name, method)
        return self.calibration

    def calibration_batches(self, gm: GraphModule, limit: int | None = None, *, pass_name: str | None = None,
                            method: str | None = None) -> Iterator[list[Any]]:
        """Calibration items in the flat positional form `gm` takes, at most `limit` of them.

        Each is checked against `gm`'s inputs (type, rank, sizes, dtype, vocabulary, finite
        values) and a CalibrationError names the pass, the batch and the input at fault. With
        `pass_name`, missing or empty calibration is an error; without it (callers for whom data
        is optional), missing calibration yields nothing.
        """
        self.calibration = CalibrationData.wrap(self.calibration)  # in case it was assigned after construction
        return checked_batches(gm, self.calibration, limit, pass_name=pass_name, method=method)


# --------------------------------------------------------------------------- passes


@dataclass
class PassResult:
    """What a pass returns: the rewritten graph and what it did.

    sites: how many places the pass rewrote (the match count reported and tested).
    skipped: (where, why) for every candidate it deliberately left alone.
    notes: anything else worth showing in the report (a chosen alpha, a rank allocation, ...).
    example_inputs: only for passes that change the graph's inputs (e.g. add_kv_cache): flat
        inputs the new graph takes, derived from ctx.example_inputs. Once the pass is verified
        they replace ctx.example_inputs, so later passes verify, and the backend exports and
        checks, on inputs the graph actually takes.
    semantics: for lossy passes, what the result claims to compute as edits of the graph before
        (dequantized or masked weights, ...); verification builds that reference and holds the
        result to it exactly. None: the pass claims to be exact (or overrides `semantics`).
    """

    graph_module: GraphModule
    sites: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    example_inputs: tuple[Any, ...] | None = None
    semantics: Semantics | None = None


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclass as a frozen dataclass and decorate with @register_pass.

    Override:
        run(gm, ctx) -> PassResult      rewrite `gm` (it is already a private copy) in place
                                        or return a new GraphModule.
        tolerance() -> Tolerance        how closely the result must match what the pass claims
                                        (the graph before, or its semantics); default 1e-5.
        semantics(before, result, ctx)  lossy passes: the graph the result claims to equal;
                                        the default builds it from `result.semantics`.
        verify(before, after, ctx)      only if the pass changes the graph's inputs/outputs.

    Every pass also takes `max_loss=` (keyword only): a bound on its loss against the graph
    before, a number (relative L2 error) or a dict over ("max_abs", "rel_l2", "min_cosine").
    Default None: no bound (the loss is measured and reported), or compile's `max_loss`.
    """

    name: ClassVar[str] = ""
    max_loss: float | dict[str, float] | None = field(default=None, kw_only=True, compare=False)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def tolerance(self) -> Tolerance:
        return Tolerance()

    def semantics(self, before: GraphModule, result: PassResult, ctx: PassContext) -> GraphModule | None:
        """The graph this pass's result claims to compute, or None for "the graph before" (exact).

        The default builds it from `result.semantics` (`fxforge.ir.reference.reference_graph`):
        `before` sharing its tensors, with the claimed tensors swapped in.
        """
        if not result.semantics:
            return None
        return reference_graph(before, result.semantics)

    def loss_bound(self) -> LossBound | None:
        """This pass's own bound on its loss (`max_loss=`), or None to use compile's."""
        return LossBound.parse(self.max_loss)

    def verify(self, before: GraphModule, after: GraphModule, ctx: PassContext) -> Comparison:
        """Compare outputs of the graphs on the example inputs (extra outputs of `after` ignored).

        The pipeline calls this only where a pass overrides it (passes that change the graph's
        inputs or outputs); otherwise `passes/verification.py` compares against the semantics.
        """
        ref = run_graph(before, ctx.example_inputs)
        got = run_graph(after, ctx.example_inputs)
        return compare_outputs(ref, got, self.tolerance())

    def spec(self) -> str:
        """This pass as a pipeline string: `quantize(bits=4,group_size=128)` (non-defaults only)."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value != default:
                opts.append(f"{f.name}={value!r}")
        return f"{self.name}({','.join(opts)})" if opts else self.name

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` usable by name in pipelines and on the command line."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register_pass needs a subclass of fxforge.Pass, got {cls!r}")
    # the class itself must be decorated: a plain subclass inherits its parent's dataclass params
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass: @dataclass(frozen=True)")
    if not cls.name or not cls.name.isidentifier():
        raise TypeError(f"pass {cls.__name__} needs a `name` class attribute that is an identifier")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"a pass named '{cls.name}' is already registered ({existing.__module__}.{existing.__qualname__})")
    _checked_options(cls)
    _REGISTRY[cls.name] = cls
    return cls


def _checked_options(cls: type[Pass]) -> None:
    """Make `cls(...)` with a bad option raise PassSpecError, as the same pass in a pipeline
    string does: `__post_init__` validates with ValueError/TypeError (see passes/README.md), and a
    user building `Quantize(bits=99)` in Python deserves the same error class as on the CLI."""
    post_init = cls.__dict__.get("__post_init__")
    if post_init is None or getattr(post_init, "_fxforge_checked", False):
        return

    def checked_post_init(self: Pass) -> None:
        try:
            post_init(self)
        except PassSpecError:
            raise
        except (ValueError, TypeError) as exc:
            raise PassSpecError(str(exc)) from exc

    checked_post_init._fxforge_checked = True  # type: ignore[attr-defined]
    checked_post_init.__doc__ = post_init.__doc__
    cls.__post_init__ = checked_post_init  # type: ignore[method-assign]


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass by name: fxforge's own and those of installed plugins (entry points)."""
    _load_builtin_and_plugin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PassSpecError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(passes)}.")
    return passes[name]


_loaded = False


def _load_builtin_and_plugin_passes() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import fxforge.passes as package

    for info in pkgutil.walk_packages(package.__path__, prefix="fxforge.passes."):
        if info.name.rsplit(".", 1)[-1] not in ("base", "spec"):
            importlib.import_module(info.name)
    for ep in entry_points(group="fxforge.passes"):
        obj = ep.load()  # a Pass subclass, or a module whose import registers passes
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj)


# --------------------------------------------------------------------------- pipeline


@dataclass
class PassRecord:
    """One row of the pipeline report.

    max_error: the largest max abs change of any output against the graph before (the loss).
    loss: per output, its loss against the graph before (max_abs, rel_l2, cosine), the worst
        over the verified shapes; empty when verification was off.
    check_error: the largest max abs difference from what the pass claims (its bug check).
    verified_against: "graph before" (exact passes), "semantics" (lossy ones) or "" (not verified).
    verified_shapes: the input shapes verification ran at ("2x16, 2x16").
    verification_note: e.g. "static graph: verified at the example inputs only".
    verify_seconds: the part of `seconds` spent verifying.
    """

    name: str
    spec: str
    seconds: float
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    sites: int
    max_error: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    loss: list[OutputError] = field(default_factory=list)
    check_error: float = 0.0
    verified_against: str = ""
    verified_shapes: list[str] = field(default_factory=list)
    verification_note: str = ""
    verify_seconds: float = 0.0

    @property
    def rel_l2(self) -> float:
        """The largest relative L2 loss of any output (0 when not verified)."""
        return max((o.rel_l2 for o in self.loss), default=0.0)

    @property
    def cosine(self) -> float:
        """The lowest cosine of any output to the graph before (1 when not verified)."""
        return min((o.cosine for o in self.loss), default=1.0)


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)

    def __str__(self) -> str:
        header = (f"{'pass':<28}{'time':>8}{'nodes':>14}{'param bytes':>24}{'sites':>7}"
                  f"{'loss: max abs':>15}{'rel L2':>10}{'cosine':>10}{'vs claim':>10}")
        lines = [header, "-" * len(header)]
        for r in self.records:
            lines.append(
                f"{r.spec[:27]:<28}{r.seconds:>7.2f}s{r.nodes_before:>6} → {r.nodes_after:<5}"
                f"{format_bytes(r.bytes_before):>11} → {format_bytes(r.bytes_after):<10}"
                f"{r.sites:>7}{r.max_error:>15.2e}{r.rel_l2:>10.2e}{r.cosine:>10.6f}{r.check_error:>10.1e}"
            )
            if r.verified_against:
                lines.append(f"    verified against {r.verified_against} at {' and '.join(r.verified_shapes)}"
                             + (f" ({r.verification_note})" if r.verification_note else ""))
            for where, why in r.skipped[:10]:
                lines.append(f"    skipped {where}: {why}")
            if len(r.skipped) > 10:
                lines.append(f"    ... and {len(r.skipped) - 10} more skipped")
        return "\n".join(lines)

    def to_dict(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.records]

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)


class Pipeline:
    """An ordered list of passes, built from Pass objects, names, or a pipeline string.

    >>> Pipeline("canonicalize,quantize(bits=4,group_size=128)")
    >>> Pipeline([Canonicalize(), Quantize(bits=4)])
    """

    def __init__(self, passes: str | Sequence[Pass | str] = ()):
        from fxforge.passes.spec import parse_pipeline, parse_pass

        if isinstance(passes, str):
            self.passes: list[Pass] = parse_pipeline(passes)
        else:
            self.passes = [parse_pass(p) if isinstance(p, str) else p for p in passes]
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PassSpecError(f"pipeline items must be fxforge passes or pass specs, got {p!r}")

    def __repr__(self) -> str:
        return f"Pipeline({self.spec()!r})"

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, gm: GraphModule, ctx: PassContext, verify: bool = True,
            report: PipelineReport | None = None,
            max_loss: LossBound | float | dict[str, float] | None = None) -> tuple[GraphModule, PipelineReport]:
        """Run every pass on a copy of `gm` (never mutated); return the result and the report.

        max_loss bounds every pass's loss against the graph before it (a pass's own `max_loss`
        wins); None: loss is measured and reported, not bounded.
        """
        report = report if report is not None else PipelineReport()
        bound = LossBound.parse(max_loss)
        dump_dir = os.environ.get("FXFORGE_DUMP")
        for index, p in enumerate(self.passes):
            gm = run_pass(p, gm, ctx, verify=verify, report=report, max_loss=bound)
            if dump_dir:
                _dump(gm, Path(dump_dir), len(report.records), p)
        return gm, report


def run_pass(p: Pass, gm: GraphModule, ctx: PassContext, verify: bool = True,
             report: PipelineReport | None = None,
             max_loss: LossBound | float | dict[str, float] | None = None) -> GraphModule:
    """Run one pass on a copy of `gm`, verify it, and append its record to `report`.

    Verification (`passes/verification.py`): the result must match what the pass claims within
    `p.tolerance()` at the example inputs and at a second shape; its loss against `gm` is
    measured, and bounded by `p.max_loss`, else `max_loss`, when set.
    A pass that changes the graph's inputs hands back new example inputs
    (`PassResult.example_inputs`); they replace `ctx.example_inputs` once it is verified.
    """
    from fxforge.passes.verification import Verification, verify_pass

    try:  # a malformed bound is an error before any work, not after the pass ran
        bound = p.loss_bound() or LossBound.parse(max_loss)
    except PassSpecError as exc:
        raise PassSpecError(f"pass '{p.spec()}': {exc}") from exc
    before = summarize(gm)
    start = time.perf_counter()
    work = copy.deepcopy(gm)
    try:
        with torch.no_grad():
            result = p.run(work, ctx)
        after_gm = finalize(result.graph_module)
    except PassError:
        raise
    except Exception as exc:
        raise PassError(
            f"pass '{p.spec()}' failed and was rolled back: {type(exc).__name__}: {exc}",
            pass_name=p.name,
        ) from exc
    verification, verify_seconds = Verification(), 0.0
    if verify and ctx.example_inputs:
        verify_start = time.perf_counter()
        verification = verify_pass(p, gm, after_gm, result, ctx, max_loss=bound)
        verify_seconds = time.perf_counter() - verify_start
    result.semantics = None  # the claimed tensors die with the check, not with the report
    if result.example_inputs is not None:
        ctx.example_inputs = tuple(result.example_inputs)  # only now: a rolled-back pass leaves ctx as it was
    elapsed = time.perf_counter() - start
    after = summarize(after_gm)
    if report is not None:
        report.records.append(PassRecord(
            name=p.name, spec=p.spec(), seconds=elapsed,
            nodes_before=before.nodes, nodes_after=after.nodes,
            bytes_before=before.total_param_bytes, bytes_after=after.total_param_bytes,
            sites=result.sites, max_error=max((o.max_abs for o in verification.loss), default=0.0),
            skipped=list(result.skipped), notes=dict(result.notes), loss=verification.loss,
            check_error=verification.check_error,
            verified_against=verification.against if verification.checks else "",
            verified_shapes=[c.shapes for c in verification.checks],
            verification_note=verification.note, verify_seconds=verify_seconds,
        ))
    return after_gm


def _dump(gm: GraphModule, directory: Path, index: int, p: Pass) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    (directory / f"{index:02d}_{p.name}.py").write_text(f"# after pass {p.spec()}\n{text}")
