"""Fixtures shared by the quantization pass tests."""
import pytest
from testing_utils import traced_zoo

from fxforge.passes.context import PassContext


@pytest.fixture(scope="module")
def llama():
    """(a copy of tiny-llama's canonical graph, a PassContext with its example inputs)."""
    zoo, gm = traced_zoo("tiny-llama")
    return gm, PassContext(example_inputs=tuple(zoo.kwargs.values()))
