"""Traced zoo models shared by the pruning tests (tracing is the slow part: once per session)."""
import pytest

from fxforge.ir.trace import flatten_inputs, trace
from fxforge.models import get_model
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.registry import get_pass_class


def quiet(iterable, **_):
    return iterable


def traced(name: str):
    """(canonical graph, context with example inputs and calibration, other-sized inputs)."""
    zm = get_model(name)
    gm = trace(zm.model, zm.args, zm.kwargs, dynamic_shapes=zm.dynamic_shapes)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    flat = tuple(flatten_inputs(gm, zm.args, zm.kwargs))
    other = tuple(flatten_inputs(gm, *zm.make_inputs(batch=3, seq=7)))
    ctx = PassContext(example_inputs=flat, calibration=[flat, other], progress=quiet)
    return gm, ctx, other


@pytest.fixture(scope="session")
def tiny_llama():
    return traced("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return traced("tiny-gpt2")
