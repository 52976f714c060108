"""quantize's methods: one registered class each, with its own options; another method's option is an error."""
import dataclasses

import pytest
import torch
from testing_utils import traced_zoo

from fxforge.errors import PassSpecError
from fxforge.passes.context import PassContext
from fxforge.passes.methods import methods_of
from fxforge.passes.pipeline import Pipeline
from fxforge.passes.quantize import Quantize
from fxforge.passes.quantize.method import QuantizedLayer, WeightQuantizer
from fxforge.passes.quantize.rtn import QuantSpec


def test_every_method_is_a_registered_class_with_its_own_options():
    methods = methods_of("quantize")
    assert set(methods) == {"rtn", "awq", "gptq", "easyquant"}
    options = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in methods.items()}
    assert options == {"rtn": {"clip_search"}, "awq": {"awq_grid", "clip_search"}, "gptq": {"damp", "block_size"},
                       "easyquant": {"outlier_sigma", "range_steps"}}
    assert {n for n, c in methods.items() if c.needs_calibration} == {"awq", "gptq"}
    assert methods["gptq"].statistics == ("gram",) and set(methods["awq"].statistics) == {"abs_mean", "samples"}
    assert all(issubclass(c, WeightQuantizer) for c in methods.values())


@pytest.mark.parametrize("spec,owner", [("quantize(method=rtn,damp=0.1)", "gptq"),
                                        ("quantize(method=gptq,awq_grid=10)", "awq"),
                                        ("quantize(method=awq,range_steps=5)", "easyquant")])
def test_an_option_of_another_method_is_an_error_naming_it(spec, owner):
    with pytest.raises(PassSpecError, match=f"belongs to method '{owner}'"):
        Pipeline(spec)


def test_pipeline_strings_keep_working_and_reach_the_method():
    (pass_,) = Pipeline("quantize(bits=4,method=gptq,damp=0.1)").passes
    method = pass_.method_object()
    assert method.name == "gptq" and method.damp == 0.1 and method.block_size == 128
    with pytest.raises((PassSpecError, ValueError), match="damp=1.5 must be in"):
        Quantize(method="gptq", damp=1.5)
    with pytest.raises(PassSpecError, match="must be one of"):
        Quantize(method="nope")


@pytest.mark.parametrize("name", ["rtn", "easyquant"])
def test_data_free_methods_return_the_same_record_shape(name):
    method = Quantize(method=name, range_steps=3 if name == "easyquant" else 100).method_object()
    layer = method.quantize(torch.randn(8, 32), QuantSpec(4, 16), None, None, "in")
    assert isinstance(layer, QuantizedLayer) and layer.matrix.codes.shape == (8, 32)
    assert (layer.outliers is not None) == (name == "easyquant")


def test_calibrated_quantize_runs_block_by_block():
    zoo, gm = traced_zoo("tiny-llama")
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(3, 256, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=data)
    result = Quantize(bits=4, group_size=32, method="gptq", damp=0.1).run(gm, ctx)
    assert result.notes["calibration"] == {"batches": 3, "blocks": 2, "offloaded": False}
    assert result.sites == 15  # with the LM head (the default)
