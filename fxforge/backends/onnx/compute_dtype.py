"""Which float dtype the ONNX model computes in, and the graph rewrite that gets it there.

ONNX Runtime's CPU provider has no bfloat16 kernels for most ops (Mul, MatMul, Gemm: "Could
not find an implementation for Mul(14)") and few float16 ones, and numpy cannot hold bfloat16
inputs. So a bfloat16/float16 graph is exported computing in float32 (backend option
`dtype="float32"`, the default `"auto"` on CPU): its low-precision weights are upcast, every
dtype the graph names (casts, `full`, `arange`, ...) becomes float32, float inputs are cast on
the way in and outputs cast back to the graph's own dtypes on the way out, so callers see what
eager returns. The weights keep their dtype: each is cast to float32 where it is read
(`Cast` in the ONNX graph, moved below layout ops and Gathers by `low_precision_weights.py`),
so the file and ORT hold a bf16 model's bytes once, not a float32 copy (twice those bytes).
`dtype="float32"` stores float32 copies instead (2P, faster decoding: the casts cost time).
`dtype="model"` exports the graph as it is (for providers with low-precision kernels).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from fxforge.ir.graph import finalize, get_attr, set_attr

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


def has_low_precision_tensors(gm: GraphModule) -> bool:
    """Whether `gm` holds bfloat16/float16 weights or buffers."""
    return any(t.dtype in LOW_PRECISION for t in (*gm.parameters(), *gm.buffers()))


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


def as_float32_graph(gm: GraphModule, keep_weights: bool = True) -> GraphModule:
    """A copy of `gm` computing in float32: each read of a low-precision weight cast to float32
    (the weight itself stays as it is), dtypes in the graph rewritten. Shares all of `gm`'s
    tensors (passes/cow.py): no float32 copy of the weights is made; `gm` is unchanged.
    `keep_weights=False`: the weights themselves are upcast (float32 copies)."""
    from fxforge.passes.cow import structural_copy

    from fxforge.ir.ops import op_name_of

    work = structural_copy(gm)
    low = {name for name, t in [*work.named_parameters(), *work.named_buffers()] if t.dtype in LOW_PRECISION}
    if not keep_weights:  # float32 copies of the weights (twice a bf16 model's bytes): ORT's fastest
        for name in low:
            set_attr(work, name, get_attr(work, name).float(), trainable=False)
        low = set()
    # fxforge ops' lowerings read their tensors as constants (MatMulNBits' scales, ...): those
    # (small) tensors are upcast here; aten ops read a cast like any other value
    for node in work.graph.nodes:
        if node.op == "get_attr" and node.target in low and any(
                u.op == "call_function" and op_name_of(u.target) for u in node.users):
            set_attr(work, node.target, get_attr(work, node.target).float(), trainable=False)
            low.discard(node.target)
    for node in work.graph.nodes:
        node.args = _upcast(node.args)
        node.kwargs = _upcast(node.kwargs)
    for node in list(work.graph.nodes):
        if node.op == "get_attr" and node.target in low and node.users:
            with work.graph.inserting_after(node):
                cast = work.graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                                {"dtype": torch.float32})
            node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
    for node in work.graph.nodes:
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
