"""The backend check in compile(): exact lowerings are held to 1e-4, approximate ones to the
bound they declare (MatMulNBits at accuracy level 4 quantizes activations to int8)."""
import pytest
import torch

import fxforge
from fxforge.backends import check_tolerance
from fxforge.errors import VerificationError
from fxforge.ir.verify import Tolerance
from fxforge.models import get_model

EXACT = Tolerance(max_abs=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mlp():
    return get_model("mlp")


def test_graph_without_approximate_lowerings_keeps_the_exact_bound(mlp):
    compiled = fxforge.compile(mlp.model, mlp.args, backend="eager")
    assert check_tolerance(compiled.graph_module, "onnx", EXACT) is EXACT


def test_quantized_model_is_checked_against_matmulnbits_declared_bound(mlp):
    compiled = fxforge.compile(mlp.model, mlp.args, passes="quantize(bits=4,group_size=16)",
                               backend="onnx")
    declared = check_tolerance(compiled.graph_module, "onnx", EXACT)
    assert declared.max_abs is None and declared.max_rel is not None and declared.max_rel < 0.1
    check = compiled.report.backend_check
    assert check.ok
    # Inside the declared bound, and agreeing in direction with eager.
    assert max(o.rel_l2 for o in check.outputs) < declared.max_rel
    with torch.no_grad():
        eager = compiled.graph_module(*compiled.example_inputs)[0]
    got = compiled.run_flat(*compiled.example_inputs)[0]
    assert torch.nn.functional.cosine_similarity(torch.as_tensor(got).flatten(), eager.flatten(), dim=0) > 0.999


def test_an_explicit_backend_tolerance_overrides_the_declared_one(mlp):
    with pytest.raises(VerificationError, match="backend 'onnx' disagrees with eager"):
        fxforge.compile(mlp.model, mlp.args, passes="quantize(bits=4,group_size=16)",
                        backend="onnx", backend_tolerance=Tolerance(max_abs=1e-7, rtol=0.0))


def test_rounding_bounds_of_exact_lowerings_keep_the_exact_bound():
    # fxforge::rms_norm's ONNX lowering declares FLOAT32_REORDERED (max_abs set): one op's
    # rounding, not a loss to allow for, so the model keeps the exact bound.
    from fxforge.backends.onnx.lowerings import load_all
    from fxforge.ir.ops import lowering_tolerance
    from fxforge.ir.verify import FLOAT32_REORDERED

    class Norm(torch.nn.Module):
        def forward(self, x):
            return torch.ops.fxforge.rms_norm(x, torch.ones(8), 1e-6)

    load_all()
    gm = torch.fx.symbolic_trace(Norm())
    assert lowering_tolerance("onnx", "rms_norm") == FLOAT32_REORDERED
    assert check_tolerance(gm, "onnx", EXACT) is EXACT
