"""Shared fixtures of the adapter tests: the zoo MLP traced once per session, a pass runner."""
import copy

import pytest
import torch
from testing_utils import traced_zoo

from fxforge.passes.adapters.add_adapters import AddAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass


@pytest.fixture(scope="session")
def _mlp_traced():
    zoo, gm = traced_zoo("mlp")
    return zoo, gm


@pytest.fixture
def mlp(_mlp_traced):
    """(zoo, canonical GraphModule copy) of the 3-layer MLP (fc1 32->64, fc2 64->64, fc3 64->10)."""
    zoo, gm = _mlp_traced
    return zoo, copy.deepcopy(gm)


@pytest.fixture
def adapt():
    """adapt(gm, example_inputs, calibration=None, extras=None, **options) -> adapted graph (verified)."""

    def run(gm, example_inputs, calibration=None, extras=None, **options):
        ctx = PassContext(example_inputs=tuple(example_inputs), calibration=calibration, extras=extras or {})
        return run_pass(AddAdapters(**options), gm, ctx)

    return run


def _randomize(gm, roles=("lora_B",), scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.rsplit(".", 1)[-1] in roles:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def randomize():
    """randomize(gm, roles=("lora_B",)): random adapter values (B = 0 would make every check trivial)."""
    return _randomize
