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


def export_op_module(module, example, path):
    """Export a one-op test module to ONNX exactly as fxforge's ONNX backend does (opset,
    translation table, optimize=False, 8-bit weight transposes folded) with a dynamic batch; returns (onnx model, ORT session)."""
    import onnx
    import onnxruntime as ort
    import torch

    from fxforge.backends.onnx.fold_weights import fold_weight_transposes
    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        module, (example,), dynamo=True, custom_translation_table=translation_table(),
        opset_version=OPSET_VERSION, dynamic_shapes=({0: batch},), verbose=False, optimize=False,
    )
    fold_weight_transposes(program.model)
    program.save(str(path))
    return onnx.load(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_ort(session, x):
    """The first output of a one-input ORT session, as a torch tensor."""
    import torch

    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
