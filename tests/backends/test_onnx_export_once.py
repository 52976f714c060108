"""Export once: the ONNX model the onnx backend made is the one saved, exported and loaded.

`CompiledModel.save(onnx=True)` and `export_onnx` write the model `prepare` exported while the
graph, its tensors and the translation options are unchanged; `fxforge.load` of an artifact with
model.onnx opens that file. Each test counts calls to the exporter (`export_model`).
"""
import json

import onnx
import pytest
import torch

import fxforge
from fxforge.backends.onnx import backend as onnx_backend
from fxforge.errors import ArtifactError
from fxforge.models.zoo import get_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def exports(monkeypatch):
    """The number of graph exports so far (a one-element list, read after the calls)."""
    count = [0]
    real = onnx_backend.export_model

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_backend, "export_model", counting)
    return count


@pytest.fixture(scope="module")
def mlp():
    return get_model("mlp")


def test_compile_save_export_and_load_export_once(mlp, exports, tmp_path):
    compiled = fxforge.compile(mlp.model, mlp.args, backend="onnx")
    assert exports[0] == 1
    compiled.save(tmp_path / "art", onnx=True)
    compiled.export_onnx(tmp_path / "model.onnx")
    assert exports[0] == 1, "save/export_onnx exported the unchanged graph again"
    saved = (tmp_path / "art" / "model.onnx").read_bytes()
    assert saved == (tmp_path / "model.onnx").read_bytes() == compiled._runner.exported.data
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["onnx_options"] == {"accuracy_level": 4, "causal_attention": "GroupQueryAttention",
                                        "bidirectional_attention": "MultiHeadAttention"}  # the defaults, recorded

    loaded = fxforge.load(tmp_path / "art")
    assert exports[0] == 1, "fxforge.load exported again instead of opening model.onnx"
    assert loaded.report.backend_check.ok  # the file is still checked against eager
    torch.testing.assert_close(loaded(*mlp.args), compiled(*mlp.args))
    loaded.save(tmp_path / "again", onnx=True)  # re-saving copies the artifact's file
    assert exports[0] == 1
    assert (tmp_path / "again" / "model.onnx").read_bytes() == saved


def test_other_options_or_changed_weights_export_again(mlp, exports, tmp_path):
    compiled = fxforge.compile(mlp.model, mlp.args, backend="onnx")
    compiled.save(tmp_path / "art", onnx=True)
    assert exports[0] == 1
    fxforge.load(tmp_path / "art", accuracy_level=0)  # other translation options: a new export
    assert exports[0] == 2
    eager = fxforge.load(tmp_path / "art", backend="eager")  # no export to run, the file is kept for a save
    eager.export_onnx(tmp_path / "from_eager.onnx")
    assert exports[0] == 2

    trained = fxforge.compile(mlp.model, mlp.args, backend="onnx")
    assert exports[0] == 3
    weight = next(p for p in trained.trainable_parameters() if p.dim() == 2)
    with torch.no_grad():
        weight.mul_(2.0)  # in place, as a training step writes: the prepared file is stale
    trained.export_onnx(tmp_path / "trained.onnx")
    assert exports[0] == 4
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: mlp.args[0].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), trained.graph_module(*mlp.args)[0], rtol=1e-4, atol=1e-4)


def test_a_kept_path_is_copied_not_exported_again(mlp, exports, tmp_path):
    kept = tmp_path / "kept" / "model.onnx"
    compiled = fxforge.compile(mlp.model, mlp.args, backend="onnx", backend_options={"path": str(kept)})
    compiled.save(tmp_path / "art", onnx=True)
    assert exports[0] == 1
    assert (tmp_path / "art" / "model.onnx").read_bytes() == kept.read_bytes()


def test_load_refuses_onnx_external_data_outside_the_artifact(mlp, tmp_path):
    compiled = fxforge.compile(mlp.model, mlp.args, backend="onnx")
    compiled.save(tmp_path / "art", onnx=True)
    path = tmp_path / "art" / "model.onnx"
    model = onnx.load(str(path))
    weight = model.graph.initializer[0]
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    weight.external_data.add(key="location", value="/etc/hostname")
    onnx.save(model, str(path))
    import hashlib

    manifest_path = tmp_path / "art" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # a hostile author writes the hash too
    manifest["files"]["model.onnx"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="model.onnx.data only"):
        fxforge.load(tmp_path / "art")
