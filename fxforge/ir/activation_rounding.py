"""Ops that round their activations when they run (8-bit activation quantization), and what
checking a graph that holds them needs.

`fxforge::linear_w8a8` and `fxforge::linear_int8_mixed` quantize their input at run time: per
token, per tensor, or with outlier columns chosen over every token of the call. Two things follow
that have nothing to do with the op being wrong:

- **Rounding flips.** An op that rounds turns a 1e-7 difference in its input into a whole
  quantization step (absmax/127) when a value sits at a rounding boundary. An exact pass that
  sums floats in another order before such an op (`fuse_attention`'s fused softmax), or a backend
  that does (ONNX Runtime's LayerNorm), lands one step away on a few elements, and the step
  travels to the outputs: measured 1e-3 relative L2 on the composition matrix's GPT-2.
- **Call-wide statistics.** A per-tensor scale or an outlier set is taken over the tokens of one
  call, so a KV-cached step quantizes its new tokens on their own and lands within the op's own
  quantization error of the uncached run (measured relative L2 1e-2 = the W8A8 loss itself).

So an exact pass after an activation-quantizing pass is proved on the graphs with activations
left unrounded (`unrounded()`: each op computes x·Ŵᵀ with its dequantized weight, the function
it approximates): the pass must be exact on that, at the pass's own tolerance, while the loss
it reports is measured with the rounding. A backend, which cannot be told not to round, is held
to `ACTIVATION_ROUNDING` instead (`fxforge.backends.check_tolerance`).

An op module declares `unrounded(*args)`: the op's value on the same arguments with float
activations. Ops that round nothing declare nothing.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch.fx import GraphModule
from torch.overrides import TorchFunctionMode

from fxforge.ir.verify import Tolerance

# What two correct runs of a graph with 8-bit activations may differ by when one of them rounds
# the floats before a quantizer differently (a backend): a few elements one step (1/127 of
# their row's absmax) apart. Measured 2.1e-3 relative L2, cosine 0.999998 (ONNX vs eager,
# GPT-2 of the composition matrix after llm_int8); the op's own quantization error is 0.7-1e-2
# relative L2 there. 2e-2 / 0.9995 holds the flips with room and still rejects a wrong scale,
# zero point or outlier column, which moves outputs by the size of the activations.
ACTIVATION_ROUNDING = Tolerance.lossy(max_rel=2e-2, min_cosine=0.9995)


def _unrounded_of(op_name: str) -> Callable | None:
    from fxforge.ir.ops import get_op

    return getattr(sys.modules.get(get_op(op_name).module), "unrounded", None)


def rounding_ops(gm: GraphModule) -> list[str]:
    """The fxforge ops of `gm` that round their activations (those whose module declares `unrounded`)."""
    from fxforge.ir.ops import op_name_of

    names = {op_name_of(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    return sorted(name for name in names if name and _unrounded_of(name) is not None)


_ACTIVE: list["unrounded"] = []


def unrounding() -> bool:
    """True inside `unrounded()`: outputs computed outside it (with rounding) must not stand in."""
    return bool(_ACTIVE)


class unrounded(TorchFunctionMode):
    """Within this context, every activation-rounding fxforge op computes its `unrounded` value
    (intercepted at the call, so graphs, semantics references and custom checks are all covered
    without copying any graph)."""

    def __init__(self, op_names: list[str]):
        super().__init__()
        from fxforge.ir.ops import get_op

        self._table = {get_op(name).overload: _unrounded_of(name) for name in op_names}

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        replacement = self._table.get(func)
        if replacement is not None:
            return replacement(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


__all__ = ["ACTIVATION_ROUNDING", "rounding_ops", "unrounded", "unrounding"]
