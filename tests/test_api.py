"""fxforge.compile / CompiledModel / save & load, including the errors users hit."""
import json

import pytest
import torch

import fxforge
from fxforge.errors import ArtifactError, InputError
from fxforge.models import get_model


@pytest.fixture(scope="module")
def llama():
    return get_model("tiny-llama")


@pytest.fixture(scope="module")
def compiled_llama(llama):
    return fxforge.compile(llama.model, llama.args, llama.kwargs, passes="fuse_rms_norm")


def test_compiled_model_is_called_like_the_model(llama, compiled_llama):
    args, kwargs = llama.make_inputs(batch=3, seq=7)
    with torch.no_grad():
        expected = llama.model(*args, **kwargs, use_cache=False).logits
    got = compiled_llama(*args, **kwargs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert compiled_llama.report["fuse_rms_norm"].sites == 5
    assert "fuse_rms_norm" in str(compiled_llama.report)


def test_compile_does_not_mutate_the_model(llama):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    compiled = fxforge.compile(llama.model, llama.args, llama.kwargs)
    # the compiled graph shares the weights no pass rewrote (no second copy of the model) ...
    model_storages = {p.untyped_storage().data_ptr() for p in llama.model.parameters()}
    assert all(p.untyped_storage().data_ptr() in model_storages for p in compiled.graph_module.parameters())
    # ... but what a training loop gets to update is private: training never writes into the model
    trainable = compiled.trainable_parameters()
    assert trainable and not any(p.untyped_storage().data_ptr() in model_storages for p in trainable)
    for p in trainable:
        p.data.zero_()
    for k, v in llama.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(float(p.detach().abs().sum()) == 0 for p in compiled.trainable_parameters())  # the same private copies


def test_wrong_rank_is_a_clear_error(llama, compiled_llama):
    ids = llama.kwargs["input_ids"]
    with pytest.raises(InputError, match="input 'input_ids' must have rank 2"):
        compiled_llama(input_ids=ids[0], attention_mask=llama.kwargs["attention_mask"])


def test_wrong_dtype_is_a_clear_error(llama, compiled_llama):
    with pytest.raises(InputError, match=r"input 'input_ids' must be torch.int64, got torch.float32"):
        compiled_llama(input_ids=llama.kwargs["input_ids"].float(), attention_mask=llama.kwargs["attention_mask"])


def test_wrong_structure_is_a_clear_error(llama, compiled_llama):
    with pytest.raises(InputError, match="structured differently"):
        compiled_llama(llama.kwargs["input_ids"])  # the attention mask is missing


def test_save_and_load_round_trip(tmp_path, llama, compiled_llama):
    compiled_llama.save(tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["pipeline"] == "canonicalize,fuse_rms_norm"
    assert manifest["torch"] == torch.__version__
    loaded = fxforge.load(tmp_path / "artifact")
    args, kwargs = llama.make_inputs(batch=2, seq=11)
    assert torch.equal(loaded(*args, **kwargs), compiled_llama(*args, **kwargs))
    ops = [str(n.target) for n in loaded.graph_module.graph.nodes]
    assert ops.count("fxforge.rms_norm.default") == 5


def test_pass_metadata_survives_save_and_load(tmp_path):
    # Runtimes (KV-cached decoding, Medusa) read layouts passes leave in gm.meta["fxforge_*"].
    mlp = get_model("mlp")
    compiled = fxforge.compile(mlp.model, mlp.args)
    layout = {"past": [[1, 2]], "kv_shapes": [[2, 16, 16]], "dtype": "float32"}
    compiled.graph_module.meta["fxforge_layout"] = layout
    compiled.graph_module.meta["private_scratch"] = object()  # not a pass contract: not saved
    compiled.save(tmp_path / "a")
    loaded = fxforge.load(tmp_path / "a")
    assert loaded.graph_module.meta["fxforge_layout"] == layout
    assert "private_scratch" not in loaded.graph_module.meta
    compiled.graph_module.meta["fxforge_masks"] = {"fc1.weight": torch.rand(4, 3) > 0.5}
    compiled.save(tmp_path / "c")
    masks = fxforge.load(tmp_path / "c").graph_module.meta["fxforge_masks"]
    assert torch.equal(masks["fc1.weight"], compiled.graph_module.meta["fxforge_masks"]["fc1.weight"])
    compiled.graph_module.meta["fxforge_bad"] = {"when": object()}
    with pytest.raises(ArtifactError, match="graph metadata 'fxforge_bad'"):
        compiled.save(tmp_path / "b")


def test_loading_a_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        fxforge.load(tmp_path / "nowhere")


def test_loading_a_directory_without_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        fxforge.load(tmp_path)


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    zoo = get_model("mlp")
    path = tmp_path_factory.mktemp("mlp") / "artifact"
    fxforge.compile(zoo.model, zoo.args).save(path)
    return path


def test_loading_with_a_missing_file(saved_mlp, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_mlp, broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="weights.safetensors is missing"):
        fxforge.load(broken)


def test_loading_a_corrupted_file(saved_mlp, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_mlp, broken)
    data = bytearray((broken / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (broken / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its checksum"):
        fxforge.load(broken)


def test_loading_a_corrupted_manifest(saved_mlp, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_mlp, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is corrupted"):
        fxforge.load(broken)


def test_onnx_backend_checks_against_eager(llama):
    compiled = fxforge.compile(llama.model, llama.args, llama.kwargs, passes="fuse_rms_norm", backend="onnx")
    assert compiled.report.backend_check.ok
    assert compiled.report.backend_check.max_error <= 1e-4
    args, kwargs = llama.make_inputs(batch=3, seq=5)
    with torch.no_grad():
        expected = llama.model(*args, **kwargs, use_cache=False).logits
    assert torch.allclose(compiled(*args, **kwargs), expected, atol=1e-4)


def test_a_pass_verifies_against_the_previous_results_outputs_without_rerunning_it(llama, monkeypatch):
    """In a pipeline the graph before a pass is the previous pass's result, already run at the
    same inputs: verification reuses those outputs (same report), one graph run fewer per shape.
    quantize (a pass with semantics) ends the chain of exact passes before it and is checked on
    its own, so each later check starts from a result already run."""
    from fxforge.passes import verification

    calls = []
    real = verification.run_graph
    monkeypatch.setattr(verification, "run_graph", lambda gm, inputs: calls.append(gm) or real(gm, inputs))
    passes = "quantize(bits=8),fuse_attention"
    cached = fxforge.compile(llama.model, llama.args, llama.kwargs, passes=passes)
    with_cache = len(calls)
    assert cached.graph_module not in verification._RESULT_OUTPUTS  # the final graph's outputs are not kept
    calls.clear()
    monkeypatch.setattr(verification, "_RESULT_OUTPUTS", _NeverKeeps())
    plain = fxforge.compile(llama.model, llama.args, llama.kwargs, passes=passes)
    shapes = [len(r.verified_shapes) for r in plain.report.pipeline.records]
    assert shapes == [len(r.verified_shapes) for r in cached.report.pipeline.records] and shapes[1] == 2
    assert len(calls) - with_cache == sum(shapes[1:])  # each later pass's graph-before runs, once per shape
    for a, b in zip(cached.report.pipeline.records, plain.report.pipeline.records):
        assert a.check_error == b.check_error and [o.max_abs for o in a.loss] == [o.max_abs for o in b.loss]


class _NeverKeeps(dict):
    """A `_RESULT_OUTPUTS` that forgets everything: verification as without the reuse."""

    def setdefault(self, key, default=None):
        return [] if default is None else default

    def get(self, key, default=None):
        return default
