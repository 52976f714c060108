"""bfloat16 models compile with weight-rewriting passes, and the ONNX backend runs them on the CPU
(float32 compute, outputs cast back), held to a tolerance that follows the dtype."""
import copy

import pytest
import torch

import fxforge
from fxforge.backends import check_tolerance, dtype_tolerance
from fxforge.ir.verify import Tolerance, compare_outputs
from fxforge.models.zoo import get_model

pytest.importorskip("onnxruntime")

PIPELINES = [None, "quantize(bits=4,group_size=16)", "prune(method=flap,ratio=0.2)",
             "fuse_attention,add_kv_cache"]


@pytest.fixture(scope="module")
def bf16_llama():
    zoo = get_model("tiny-llama")
    return zoo, copy.deepcopy(zoo.model).to(torch.bfloat16).eval()


@pytest.mark.parametrize("passes", PIPELINES, ids=lambda p: p or "no passes")
def test_a_bf16_llama_compiles_on_eager_and_onnx_within_dtype_tolerance(bf16_llama, passes):
    zoo, model = bf16_llama
    kwargs = dict(zoo.kwargs)
    if passes and "add_kv_cache" in passes:
        kwargs = {"input_ids": kwargs["input_ids"]}  # cached graphs take token ids alone
    calibration = [kwargs] * 2
    eager = fxforge.compile(model, (), kwargs, passes=passes, calibration=calibration)
    assert all(p.dtype == torch.bfloat16 for p in eager.graph_module.parameters() if p.is_floating_point()
               and p.numel() > 1), "passes store weights back in the model's dtype"
    onnx = fxforge.compile(model, (), kwargs, passes=passes, calibration=calibration, backend="onnx")
    check = onnx.report.backend_check  # compile checked ONNX against eager at the dtype's tolerance
    assert check is not None and check.ok
    got, expected = onnx.run_flat(*onnx.example_inputs), eager.run_flat(*eager.example_inputs)
    assert got[0].dtype == torch.bfloat16  # what eager returns, not ORT's float32
    comparison = compare_outputs(list(expected), list(got), dtype_tolerance(eager.graph_module))
    assert comparison.ok, comparison.describe()
    if passes is None:  # and both are the model itself, to bf16 accuracy
        reference = model(**kwargs, use_cache=False).logits
        assert compare_outputs([reference], [eager(**kwargs)], dtype_tolerance(eager.graph_module)).ok


def test_the_backend_tolerance_follows_the_dtype(bf16_llama):
    zoo, model = bf16_llama
    exact = Tolerance(max_abs=1e-4, rtol=1e-4)
    float32 = fxforge.compile(zoo.model, (), zoo.kwargs)
    assert check_tolerance(float32.graph_module, "onnx", exact) == exact
    bf16 = fxforge.compile(model, (), zoo.kwargs)
    loose = check_tolerance(bf16.graph_module, "onnx", exact)
    assert loose.max_abs is None and loose.max_rel >= 1e-2
    assert check_tolerance(copy.deepcopy(bf16.graph_module).half(), "onnx", exact).max_rel < loose.max_rel


def test_dtype_model_exports_the_graph_as_it_is_and_ort_says_why_it_cannot_run(bf16_llama):
    zoo, model = bf16_llama
    with pytest.raises(fxforge.errors.BackendError, match="backend 'onnx' failed"):
        fxforge.compile(model, (), zoo.kwargs, backend="onnx", backend_options={"dtype": "model"})
