"""fxforge.load rebuilds shape metadata from the manifest's input shapes, without tracing
(fxforge/artifact_shapes.py): same outputs, dynamic dims still symbolic and shared, later passes
run on the loaded graph; an artifact without the field still loads (by re-tracing)."""
import json
import shutil

import pytest
import torch
from verification_helpers import build_tinyllama_shaped

import fxforge
import fxforge.artifact as artifact_module
from fxforge.ir.shapes import second_shape_inputs
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.registry import get_pass_class


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, kwargs = build_tinyllama_shaped(hidden=128)
    compiled = fxforge.compile(model, (), kwargs, passes="quantize(bits=4)")
    directory = tmp_path_factory.mktemp("artifact") / "out"
    compiled.save(directory)
    return compiled, directory


def _no_trace(*args, **kwargs):
    raise AssertionError("fxforge.load traced the model")


def test_load_does_not_trace_and_computes_the_same(saved, monkeypatch):
    compiled, directory = saved
    manifest = json.loads((directory / "manifest.json").read_text())
    shapes = manifest["input_shapes"]
    assert len(shapes) == 2 and all(isinstance(d, str) for dims in shapes for d in dims)  # every dim dynamic
    assert shapes[0][1] == shapes[1][1]  # one sequence length for input_ids and attention_mask
    monkeypatch.setattr(artifact_module, "trace", _no_trace)
    loaded = fxforge.load(directory)
    gm = loaded.graph_module
    inputs = compiled.example_inputs
    assert all(torch.equal(a, b) for a, b in zip(run_graph(gm, inputs), run_graph(compiled.graph_module, inputs)))
    second = second_shape_inputs(gm, inputs)  # reads the symbolic dims of the placeholders
    assert second is not None and second[0].shape != inputs[0].shape
    assert all(torch.equal(a, b) for a, b in zip(run_graph(gm, second), run_graph(compiled.graph_module, second)))
    ids, mask = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    assert all(isinstance(d, torch.SymInt) for d in (*ids.shape, *mask.shape))
    assert str(ids.shape[1]) == str(mask.shape[1]) and str(ids.shape[0]) != str(ids.shape[1])
    # every node has its metadata back, so passes run on the loaded graph (verified at two shapes)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output",))
    run_pass(get_pass_class("fuse_attention")(), gm, PassContext(example_inputs=tuple(inputs)))


def test_an_artifact_without_input_shapes_is_re_traced(saved, tmp_path, monkeypatch):
    compiled, directory = saved
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["input_shapes"]  # as written before the field existed (the manifest is not hashed)
    (old / "manifest.json").write_text(json.dumps(manifest))
    calls = []
    real = artifact_module.trace
    monkeypatch.setattr(artifact_module, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded = fxforge.load(old)
    assert calls == [1]
    inputs = compiled.example_inputs
    assert all(torch.equal(a, b) for a, b in zip(run_graph(loaded.graph_module, inputs),
                                                 run_graph(compiled.graph_module, inputs)))
