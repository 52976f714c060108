"""The ONNX backend on every zoo model: dynamic batch and sequence, outputs within 1e-4 of eager."""
import onnxruntime as ort
import pytest
import torch
from testing_utils import assert_onnx_matches_eager_at_shapes, traced_zoo

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.errors import BackendError, MissingLoweringError
from fxforge.ir.ops import define_op
from fxforge.ir.trace import flatten_inputs, trace

ZOO = ["tiny-gpt2", "tiny-llama", "tiny-bert", "mlp", "cnn", "minilm"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_runs_in_onnx_runtime_with_dynamic_axes(name, tmp_path):
    zoo, gm = traced_zoo(name)
    flat = flatten_inputs(gm, zoo.args, zoo.kwargs)
    path = export_onnx(gm, flat, tmp_path / "model.onnx")
    assert_onnx_matches_eager_at_shapes(OnnxRunner(path, threads=2), gm, zoo)


@define_op("test_only_square")
def test_only_square(x: torch.Tensor) -> torch.Tensor:
    return x * x


@test_only_square.register_fake
def _(x):
    return torch.empty_like(x)


class UsesUnloweredOp(torch.nn.Module):
    def forward(self, x):
        return torch.ops.fxforge.test_only_square(x) + 1


@pytest.mark.parametrize("backend", ["onnx", "triton"])
def test_backend_names_the_op_it_cannot_lower(backend, tmp_path):
    from fxforge.backends import get_backend

    x = torch.randn(2, 3)
    gm = trace(UsesUnloweredOp(), (x,))
    with pytest.raises(MissingLoweringError) as info:
        get_backend(backend)(gm, (x,))
    assert "fxforge::test_only_square" in str(info.value)
    assert f"backend '{backend}'" in str(info.value)


def test_exported_file_loads_in_a_plain_session(tmp_path):
    zoo, gm = traced_zoo("mlp")
    path = export_onnx(gm, list(zoo.args), tmp_path / "mlp.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    batch_dim = session.get_inputs()[0].shape[0]
    assert isinstance(batch_dim, str)  # symbolic: dynamic batch


def test_non_spinning_session_gives_the_same_outputs(tmp_path):
    zoo, gm = traced_zoo("mlp")
    path = export_onnx(gm, list(zoo.args), tmp_path / "mlp.onnx")
    runner = OnnxRunner(path, threads=2, spinning=False)
    assert runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torch.testing.assert_close(runner(*zoo.args)[0], OnnxRunner(path)(*zoo.args)[0], rtol=0, atol=0)


def test_unknown_backend_option_lists_the_valid_ones():
    from fxforge.backends.onnx.backend import prepare

    zoo, gm = traced_zoo("mlp")
    with pytest.raises(BackendError, match="Valid options: path, threads, spinning, accuracy_level, causal_attention"):
        prepare(gm, list(zoo.args), thread=2)


def _accuracy_levels(path) -> set[int]:
    import onnx

    model = onnx.load(str(path))
    return {onnx.helper.get_attribute_value(a) for node in model.graph.node if node.op_type == "MatMulNBits"
            for a in node.attribute if a.name == "accuracy_level"}


def test_backend_options_reach_the_translation_and_the_backend_check(tmp_path):
    """compile(backend_options=) carries accuracy_level through prepare into the exported
    MatMulNBits, into the bound the backend check uses, and into export_onnx."""
    import fxforge
    from fxforge.backends import check_tolerance
    from fxforge.ir.verify import Tolerance
    from fxforge.models import get_model

    zoo = get_model("mlp")
    exact = Tolerance(max_abs=1e-4, rtol=1e-4)
    kept = tmp_path / "kept.onnx"
    compiled = fxforge.compile(zoo.model, zoo.args, passes="quantize(bits=4,group_size=16)", backend="onnx",
                               backend_options={"accuracy_level": 0, "path": str(kept)})
    assert _accuracy_levels(kept) == {0}
    assert check_tolerance(compiled.graph_module, "onnx", exact, compiled.backend_options) is exact
    assert check_tolerance(compiled.graph_module, "onnx", exact) is not exact  # level 4 by default: int8 bound
    assert max(o.max_abs for o in compiled.report.backend_check.outputs) < 1e-4  # held to the exact bound
    assert _accuracy_levels(compiled.export_onnx(tmp_path / "exported.onnx")) == {0}


def test_backend_option_values_are_checked():
    from fxforge.backends.onnx.options import OnnxOptions

    with pytest.raises(BackendError, match=r"accuracy_level=7 must be one of 0, 1, 2, 3, 4"):
        OnnxOptions(accuracy_level=7)
    assert OnnxOptions.from_backend_options({"threads": 2, "accuracy_level": 0}) == OnnxOptions(accuracy_level=0)
