"""Non-tensor keyword inputs (`use_cache=False`, `return_dict=False`, None) are constants baked
into the trace: the graph takes only tensors, and a call with a different value is refused."""
import onnxruntime as ort
import pytest
import torch
from hf_dirs import build_model

import fxforge
from fxforge.errors import InputError, TraceError
from fxforge.ir.trace import CONSTANT_KWARGS, trace


class Flagged(torch.nn.Module):
    """Its output depends on every keyword: a constant that were ignored would change it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, bias=None, scale=None, double=True, mode="plain"):
        y = self.linear(x)
        if double:
            y = y * 2
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        if mode == "relu":
            y = torch.relu(y)
        return y


def placeholders(gm):
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("constants", [{"double": False}, {"scale": None}, {"double": False, "scale": 3.0},
                                       {"mode": "relu", "scale": -1.5}])
def test_constants_are_baked_and_only_tensors_are_inputs(constants):
    model, x = Flagged(), torch.randn(2, 4)
    compiled = fxforge.compile(model, (x,), constants)
    assert placeholders(compiled.graph_module) == ["x"]
    assert compiled.graph_module.meta[CONSTANT_KWARGS] == constants
    other = torch.randn(5, 4)  # another batch size: the batch stayed dynamic
    torch.testing.assert_close(compiled(other), model(other, **constants), rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled(other, **constants), model(other, **constants), rtol=0, atol=1e-6)


def test_tensor_kwargs_stay_inputs_next_to_constants():
    model, x, bias = Flagged(), torch.randn(2, 4), torch.randn(3)
    compiled = fxforge.compile(model, (x,), {"bias": bias, "double": False})
    assert placeholders(compiled.graph_module) == ["x", "bias"]
    new_bias = torch.randn(3)
    torch.testing.assert_close(compiled(x, bias=new_bias), model(x, bias=new_bias, double=False),
                               rtol=0, atol=1e-6)


def test_a_different_constant_at_call_time_is_refused():
    model, x = Flagged(), torch.randn(2, 4)
    compiled = fxforge.compile(model, (x,), {"double": False})
    with pytest.raises(InputError, match=r"'double' was compiled as the constant False.*got True"):
        compiled(x, double=True)
    with pytest.raises(InputError, match="'double'"):  # 0 == False, but it traces differently
        compiled(x, double=0)


def test_constants_survive_save_and_load(tmp_path):
    model, x = Flagged(), torch.randn(2, 4)
    fxforge.compile(model, (x,), {"double": False, "scale": 0.5}).save(tmp_path / "a")
    loaded = fxforge.load(tmp_path / "a")
    torch.testing.assert_close(loaded(x), model(x, double=False, scale=0.5), rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="'scale'"):
        loaded(x, scale=2.0)


def test_onnx_file_has_no_constant_inputs(tmp_path):
    model, x = Flagged(), torch.randn(2, 4)
    compiled = fxforge.compile(model, (x,), {"double": False, "scale": None}, backend="onnx")
    path = compiled.export_onnx(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    got = session.run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x, double=False).detach(), rtol=1e-5, atol=1e-5)


def test_transformers_model_takes_use_cache_and_return_dict():
    model, tokenizer = build_model("gpt2")
    enc = tokenizer(["the quick brown fox", "hello"], padding=True, return_tensors="pt")
    kwargs = {"attention_mask": enc["attention_mask"], "use_cache": False, "return_dict": False}
    compiled = fxforge.compile(model, (enc["input_ids"],), kwargs)
    assert placeholders(compiled.graph_module) == ["input_ids", "attention_mask"]
    with torch.no_grad():
        want = model(enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(compiled(enc["input_ids"], **kwargs), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="'use_cache'"):
        compiled(enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=True)


def test_calibration_pairs_may_repeat_the_constants():
    model, x = Flagged(), torch.randn(2, 4)
    batches = [((torch.randn(3, 4),), {"double": False}) for _ in range(4)]
    compiled = fxforge.compile(model, (x,), {"double": False}, passes="quantize(bits=8,method=gptq,group_size=-1)",
                               calibration=batches)
    assert placeholders(compiled.graph_module) == ["x"]


def test_a_constant_that_is_not_a_json_scalar_is_a_clear_error():
    with pytest.raises(TraceError, match=r"keyword input 'scale' is a list.*None/bool/int/float/str"):
        trace(Flagged(), (torch.randn(2, 4),), {"scale": [1, 2]})
