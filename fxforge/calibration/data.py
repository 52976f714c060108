"""Calibration data, read once and checked: the one place data-driven passes get batches from.

`compile(..., calibration=...)` accepts any iterable of model inputs, generators included. It is
wrapped in a `CalibrationData` that reads each item from the source at most once and caches it,
so every calibrated pass of a pipeline sees the same batches (a generator is no longer drained
by the first pass), and a pass that wants 16 batches reads 16, not the whole source.

Every batch a pass reads is checked against the graph's inputs before the graph runs on it
(`check_batch`): item type, missing dict keys, number of inputs, tensor rank, static sizes,
sizes that must agree across inputs (one symbol), dtype, token ids within the embedding's
vocabulary, and NaN/+inf values. A failure is a `CalibrationError` naming the pass, the batch
index and the input, so "calibration=[]" or a float64 batch never surfaces as "the pass changed
the model's outputs". The future block-by-block calibration engine reads through here too.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.fx import GraphModule

from fxforge.errors import CalibrationError, PassError
from fxforge.finite_checks import nonfinite_problem
from fxforge.ir.trace import INPUT_NAMES, flatten_inputs
from fxforge.runtime.input_signature import InputSignature, InputSpec, input_problem

__all__ = ["CalibrationData", "PassCalibrationError", "calibration_label", "missing_calibration", "empty_calibration",
           "checked_batches", "check_batch", "as_flat_inputs", "input_names"]

_HOW = "pass calibration=[batch, ...] to fxforge.compile (or PassContext(calibration=...)), each batch a model input"


class PassCalibrationError(CalibrationError, PassError):
    """A CalibrationError raised from inside a pass.

    It is also a PassError because the pass was rolled back: code that catches PassError around
    a pipeline (to learn which pass failed) and code that catches CalibrationError (to fix its
    data) both see it. The pipeline re-raises every FxforgeError unwrapped, so the dual class is
    what keeps the first kind of caller working, not the pipeline.
    """

    def __init__(self, message: str, *, pass_name: str | None = None, batch: int | None = None):
        Exception.__init__(self, message)
        self.pass_name = pass_name
        self.batch = batch
        self.node = None


class CalibrationData:
    """An iterable of calibration items that reads its source lazily, once, and caches it.

    Iterating it any number of times yields the same items. Lists and tuples are used as they
    are; any other iterable (a generator, a DataLoader) is consumed only as far as a reader asks.
    """

    def __init__(self, source: Iterable[Any]):
        if isinstance(source, (torch.Tensor, Mapping, str, bytes)) or not isinstance(source, Iterable):
            kind = type(source).__name__
            hint = " (one batch: wrap it in a list, calibration=[batch])" if isinstance(
                source, (torch.Tensor, Mapping)) else ""
            raise CalibrationError(f"calibration must be an iterable of model inputs, got a {kind}{hint}; {_HOW}.")
        self._items: list[Any] = list(source) if isinstance(source, (list, tuple)) else []
        self._source: Iterator[Any] | None = None if isinstance(source, (list, tuple)) else iter(source)

    @classmethod
    def wrap(cls, source: Iterable[Any] | None) -> CalibrationData | None:
        """None stays None (no calibration given); a CalibrationData is returned as it is."""
        if source is None or isinstance(source, CalibrationData):
            return source
        return cls(source)

    def _fill(self, count: int | None) -> None:
        while self._source is not None and (count is None or len(self._items) < count):
            try:
                self._items.append(next(self._source))
            except StopIteration:
                self._source = None

    def read(self, limit: int | None = None) -> list[Any]:
        """The first `limit` items (all when None), reading the source only as far as needed."""
        self._fill(limit)
        return self._items[:limit] if limit is not None else list(self._items)

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            self._fill(i + 1)
            if i >= len(self._items):
                return
            yield self._items[i]
            i += 1

    def __getitem__(self, index: int | slice) -> Any:
        """Item(s) by position, like a list (a negative index or a slice reads the whole source)."""
        if isinstance(index, int) and index >= 0:
            self._fill(index + 1)
        else:
            self._fill(None)
        return self._items[index]

    def __len__(self) -> int:
        """How many items there are: reads the whole source."""
        self._fill(None)
        return len(self._items)

    def __bool__(self) -> bool:  # without reading more than one item
        return bool(self.read(1))

    def __repr__(self) -> str:
        more = ", more unread" if self._source is not None else ""
        return f"CalibrationData({len(self._items)} items read{more})"


# --------------------------------------------------------------------------- messages


def calibration_label(pass_name: str | None, method: str | None = None) -> str:
    """"pass 'quantize' (method='gptq')": how messages name the reader."""
    if pass_name is None:
        return "calibration"
    return f"pass '{pass_name}'" + (f" (method='{method}')" if method else "")


def missing_calibration(pass_name: str, method: str | None = None, what: str | None = None,
                        hint: str = "") -> PassCalibrationError:
    """The error for a pass that needs data and was given none (calibration=None)."""
    return PassCalibrationError(f"{calibration_label(pass_name, method)} needs {what or 'calibration data'}, "
                                f"and none was given: {_HOW}.{hint}", pass_name=pass_name)


def empty_calibration(pass_name: str | None, method: str | None) -> PassCalibrationError:
    """The error for calibration that was given but holds nothing (often a drained generator)."""
    return PassCalibrationError(
        f"{calibration_label(pass_name, method)} got no calibration batches: the calibration iterable is empty "
        f"(or a generator already consumed, e.g. by an earlier compile); {_HOW}.", pass_name=pass_name)


# --------------------------------------------------------------------------- reading and checking


def checked_batches(gm: GraphModule, data: CalibrationData | None, limit: int | None = None, *,
                    pass_name: str | None = None, method: str | None = None) -> Iterator[list[Any]]:
    """Up to `limit` items of `data` in `gm`'s flat input form, each checked by `check_batch`.

    With a `pass_name` the pass needs the data: None is an error. An empty source is always an
    error (the user gave calibration that has nothing in it), raised before anything is yielded.
    """
    if data is None:
        if pass_name is not None:
            raise missing_calibration(pass_name, method)
        return iter(())
    if limit != 0 and not data.read(1):
        raise empty_calibration(pass_name, method)
    return _generate(gm, data, limit, pass_name, method)


def _generate(gm: GraphModule, data: CalibrationData, limit: int | None, pass_name: str | None,
              method: str | None) -> Iterator[list[Any]]:
    specs = input_specs(gm)
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            return
        yield check_batch(gm, item, i, pass_name=pass_name, method=method, specs=specs)


def input_names(gm: GraphModule) -> list[str]:
    """The graph's flat input names, as the user would spell them in a dict."""
    return list(gm.meta.get(INPUT_NAMES) or [n.name for n in gm.graph.nodes if n.op == "placeholder"])


def as_flat_inputs(gm: GraphModule, item: Any, names: Sequence[str] | None = None) -> list[Any]:
    """One model input (tensor, tuple/list, name->tensor mapping or (args, kwargs)) as the graph's flat inputs.

    Raises ValueError (missing input) or TypeError (unsupported item); `check_batch` turns
    these into CalibrationErrors that name the batch.
    """
    names = list(names or input_names(gm))
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, Mapping):
        missing = [n for n in names if n not in item]
        if missing:
            given = sorted(map(str, item))
            raise ValueError(f"lacks input(s) {missing}; the graph takes {names} (keys given: {given})")
        return [item[n] for n in names]
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict):
        return flatten_inputs(gm, item[0], item[1])
    if isinstance(item, (tuple, list)):
        return list(item)
    raise TypeError(f"is a {type(item).__name__}; an item must be a tensor, a tuple of positional inputs, "
                    f"a dict keyed by input name ({names}) or an (args, kwargs) pair")


def check_batch(gm: GraphModule, item: Any, index: int, *, pass_name: str | None = None,
                method: str | None = None, specs: list[InputSpec | None] | None = None) -> list[Any]:
    """`item` as `gm`'s flat inputs, or a CalibrationError naming the pass, batch `index` and input.

    Each input is checked as a call of the compiled model checks it (runtime.input_signature:
    rank, static and linked sizes, dtype, vocabulary), and must be finite (-inf allowed: masks).
    """
    where = f"{calibration_label(pass_name, method)}: calibration batch {index}"

    def fail(problem: str) -> PassCalibrationError:
        return PassCalibrationError(f"{where} {problem}", pass_name=pass_name, batch=index)

    specs = specs if specs is not None else input_specs(gm)
    names = [spec.name if spec is not None else name for spec, name in zip(specs, input_names(gm))]
    try:
        flat = as_flat_inputs(gm, item, names)
    except (TypeError, ValueError) as exc:
        raise fail(str(exc)) from None
    if len(flat) != len(specs):
        raise fail(f"has {len(flat)} input(s) but the model takes {len(specs)}: {names}")
    bound: dict[str, tuple[int, str, int]] = {}
    for spec, value in zip(specs, flat):
        if spec is None:
            continue  # a non-tensor input (None, an int): nothing traced to compare against
        problem = input_problem(spec, value, bound, check_device=False)
        if problem is None:
            problem = nonfinite_problem(value, allow_neg_inf=True)
        if problem:
            raise fail(f"input '{spec.name}' {problem}")
    return flat


def input_specs(gm: GraphModule) -> list[InputSpec | None]:
    """The graph's inputs as the compiled model checks them, named as a user spells them in a dict."""
    names = input_names(gm)
    specs = InputSignature(gm, check_device=False).inputs
    if len(names) != len(specs):
        return specs
    return [dataclasses.replace(spec, name=name) if spec is not None else None for spec, name in zip(specs, names)]
