"""Helpers shared by tests (importable because pyproject sets pytest's pythonpath to tests/)."""
import copy
import functools



@functools.lru_cache(maxsize=None)
def _traced_zoo(name: str):
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.models import get_model

    zoo = get_model(name)
    gm = trace(zoo.model, zoo.args, zoo.kwargs)
    raw = copy.deepcopy(gm)
    canonicalize(gm)
    return zoo, raw, gm


def traced_zoo(name: str, canonical: bool = True):
    """(ZooModel, GraphModule) for a zoo model, traced once per session; the graph is a copy."""
    zoo, raw, canonical_gm = _traced_zoo(name)
    return zoo, copy.deepcopy(canonical_gm if canonical else raw)


def export_op_module(module, example, path, options=None):
    """Export a one-op test module to ONNX as fxforge's ONNX backend does (opset, `options`,
    translation table, weight layouts folded as the backend folds them; the rest of its post-export
    optimization is left out so the lowering's own nodes are what the test sees) with a dynamic
    batch; returns (onnx model, ORT session)."""
    import onnx
    import onnxruntime as ort
    import torch

    from fxforge.backends.onnx.optimize import fold_weight_layouts
    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        module, (example,), dynamo=True, custom_translation_table=translation_table(options),
        opset_version=OPSET_VERSION, dynamic_shapes=({0: batch},), verbose=False, optimize=False,
    )
    fold_weight_layouts(program.model.graph)
    program.save(str(path))
    return onnx.load(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_ort(session, x):
    """The first output of a one-input ORT session, as a torch tensor."""
    import torch

    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def assert_onnx_matches_eager_at_shapes(runner, gm, zoo, shapes=((3, 9), (1, 21)), tol: float = 1e-4) -> None:
    """`runner` (an OnnxRunner of `gm`) equals eager `gm` on the zoo model's inputs at each (batch, seq).

    Neither default shape is an export size (2 or 4, 16), so fixed axes show up here."""
    import torch
    import torch.utils._pytree as pytree

    from fxforge.ir.trace import flatten_inputs

    for batch, seq in shapes:
        args, kwargs = zoo.make_inputs(batch=batch, seq=seq)
        inputs = flatten_inputs(gm, args, kwargs)
        with torch.no_grad():
            expected = pytree.tree_leaves(gm(*inputs))
        got = runner(*inputs)
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert g.shape == e.shape and (g - e).abs().max() <= tol, (batch, seq, (g - e).abs().max())
