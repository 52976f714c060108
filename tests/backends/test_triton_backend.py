"""The triton backend swaps fxforge ops for their kernels (interpreter on CPU); the inductor
backend compiles the rewritten graph with torch.compile."""
import pytest
import torch

import fxforge
from fxforge.ir.ops import lowering_for
from fxforge.models import get_model


def test_triton_backend_runs_rms_norm_kernel_in_llama():
    zoo = get_model("tiny-llama")
    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, passes="fuse_rms_norm", backend="triton")
    kernel = lowering_for("triton", "rms_norm")
    targets = [n.target for n in compiled._runner.graph.nodes if n.op == "call_function"]
    assert targets.count(kernel) == 5
    assert not any(str(t).startswith("fxforge.") for t in targets)  # no reference op left
    args, kwargs = zoo.make_inputs(batch=2, seq=6)
    with torch.no_grad():
        expected = zoo.model(*args, **kwargs, use_cache=False).logits
    assert torch.allclose(compiled(*args, **kwargs), expected, atol=1e-4)
    assert compiled.report.backend_check.max_error <= 1e-4


@pytest.mark.slow
def test_inductor_backend_matches_eager():
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, backend="inductor")
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), zoo.model(x), atol=1e-5)
