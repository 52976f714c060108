"""Large weights go to ONNX external data written tensor by tensor (no inline protobuf copy of the
model in memory); the temporary export directory is still removed once ORT holds the model."""
import tempfile

import onnx
import pytest
import torch

import fxforge
from fxforge.backends.onnx import backend as onnx_backend
from fxforge.models.zoo import get_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def always_external(monkeypatch):
    monkeypatch.setattr(onnx_backend, "EXTERNAL_DATA_BYTES", 0)


def test_weights_above_the_threshold_are_external_data(tmp_path, always_external):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args)
    path = compiled.export_onnx(tmp_path / "model.onnx")
    data = tmp_path / "model.onnx.data"
    weight_bytes = sum(p.numel() * p.element_size() for p in zoo.model.parameters())
    assert data.is_file() and data.stat().st_size >= 0.8 * weight_bytes  # (tiny tensors such as biases stay inline)
    assert path.stat().st_size < weight_bytes / 4  # the graph only
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no staging left


def test_a_temporary_external_data_export_is_removed_once_the_session_holds_it(monkeypatch, always_external):
    made = []
    real = tempfile.mkdtemp

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, backend="onnx")
    onnx_dirs = [d for d in made if "fxforge-onnx-" in d]
    assert onnx_dirs and not any(__import__("os").path.exists(d) for d in onnx_dirs)
    torch.testing.assert_close(compiled(*zoo.args), zoo.model(*zoo.args), rtol=1e-4, atol=1e-4)
