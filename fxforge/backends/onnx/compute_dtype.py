"""Which float dtype the ONNX model computes in, and the graph rewrite that gets it there.

ONNX Runtime's CPU provider has no bfloat16 kernels for most ops (Mul, MatMul, Gemm: "Could
not find an implementation for Mul(14)") and few float16 ones, and numpy cannot hold bfloat16
inputs. So a bfloat16/float16 graph is exported computing in float32 (backend option
`dtype="float32"`, the default `"auto"` on CPU): its low-precision weights are upcast, every
dtype the graph names (casts, `full`, `arange`, ...) becomes float32, float inputs are cast on
the way in and outputs cast back to the graph's own dtypes on the way out, so callers see what
eager returns. The ONNX model's weights are then float32 (twice a bf16 model's bytes).
`dtype="model"` exports the graph as it is (for providers with low-precision kernels).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from fxforge.ir.graph import finalize, set_attr

LOW_PRECISION = (torch.bfloat16, torch.float16)
CHOICES = ("auto", "float32", "model")


def graph_float_dtypes(gm: GraphModule) -> set[torch.dtype]:
    """The floating dtypes of `gm`'s weights, buffers and float inputs."""
    dtypes = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.is_floating_point():
            dtypes.add(val.dtype)
    return dtypes


def needs_float32(gm: GraphModule, dtype: str) -> bool:
    """Whether `dtype` (the backend option) asks for a float32 rewrite of `gm`."""
    if dtype not in CHOICES:
        raise ValueError(f"onnx backend option dtype must be one of {', '.join(CHOICES)}, got {dtype!r}")
    return dtype != "model" and bool(graph_float_dtypes(gm) & set(LOW_PRECISION))


def output_dtypes(gm: GraphModule) -> list[torch.dtype | None]:
    """The dtype of each flat output of `gm` (None where unknown or not a tensor)."""
    outputs = gm.graph.output_node().args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    found: list[torch.dtype | None] = []
    for out in outputs:
        val = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
        found.append(val.dtype if isinstance(val, torch.Tensor) else None)
    return found


def as_float32_graph(gm: GraphModule) -> GraphModule:
    """A copy of `gm` computing in float32: low-precision weights upcast, dtypes in the graph
    rewritten. Shares `gm`'s float32 and integer tensors (passes/cow.py); `gm` is unchanged."""
    from fxforge.passes.cow import structural_copy

    work = structural_copy(gm)
    for name, t in [*work.named_parameters(), *work.named_buffers()]:
        if t.dtype in LOW_PRECISION:
            set_attr(work, name, t.float(), trainable=False)
    for node in work.graph.nodes:
        node.args = _upcast(node.args)
        node.kwargs = _upcast(node.kwargs)
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dtype in LOW_PRECISION:
            with val.fake_mode:  # placeholders keep their symbolic shapes, only the dtype changes
                node.meta["val"] = val.to(torch.float32)
    return finalize(work)


def float32_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """`inputs` with low-precision float tensors cast to float32."""
    return tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype in LOW_PRECISION else x for x in inputs)


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return torch.float32 if value in LOW_PRECISION else value
    if isinstance(value, tuple):
        return tuple(_upcast(v) for v in value)
    if isinstance(value, list):
        return [_upcast(v) for v in value]
    if isinstance(value, dict):
        return {k: _upcast(v) for k, v in value.items()}
    return value
