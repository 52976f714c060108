"""torch.onnx's type-promotion pass without re-running every node through fake tensors.

Before translating, `torch.onnx.export` inserts explicit casts where an op mixes dtypes
(`insert_type_promotion_nodes`, an FX interpreter): it runs every node of the graph again under
fake tensors just to have each input's dtype at hand, although an fxforge graph carries exactly
those values already (`node.meta["val"]`, kept valid by `refresh_meta`). On a 4-layer
TinyLlama-shaped int4 decoder that re-run was ~1 of the ~2.3 s of the export.

`reusing_graph_values()` swaps in the same pass with one change: a node the pass leaves as it
is hands on its `meta["val"]` instead of being run; a node it rewrites (a cast inserted, its
inputs promoted) is run and its value updated exactly as torch does. Casts are inserted by
torch's own code, from the same dtypes, so the graph and the ONNX it becomes are the same
(tests/backends/onnx/test_export_fast_paths.py). Where the torch internals this relies on are
not there, nothing is swapped.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def _fast_pass() -> Any | None:
    """The replacement of `_fx_passes.insert_type_promotion_nodes`, or None if torch differs."""
    try:
        from torch.onnx._internal.fx.passes import type_promotion as tp
    except ImportError:
        return None
    base = getattr(tp, "_TypePromotionInterpreter", None)
    transform = getattr(tp, "InsertTypePromotion", None)
    if base is None or transform is None or not hasattr(base, "_maybe_promote_node"):
        return None

    class ReusingTypePromotion(base):  # type: ignore[misc, valid-type]
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.op in ("placeholder", "output") or n.meta.get("val") is None:
                return super().run_node(n)
            before = (n.target, n.args, n.kwargs)
            with self._set_current_node(n):
                if rule := tp.get_type_promotion_rule(n, self.type_promotion_table):
                    self._maybe_promote_node(n, rule)  # reruns and re-records n if it rewrote it
            if (n.target, n.args, n.kwargs) != before:
                return self.env[n]
            return n.meta["val"]

    def insert_type_promotion_nodes(graph_module: torch.fx.GraphModule) -> None:
        for module in graph_module.modules():
            if not isinstance(module, torch.fx.GraphModule):
                raise AssertionError(f"Expected GraphModule, got {type(module)}")
            promotion = transform(module)
            promotion.interpreter = ReusingTypePromotion(module, promotion.interpreter.type_promotion_table)
            promotion.run()

    return insert_type_promotion_nodes


@contextlib.contextmanager
def reusing_graph_values() -> Iterator[None]:
    """Within this block torch.onnx's type promotion reuses each unchanged node's fake value."""
    try:
        from torch.onnx._internal.exporter import _fx_passes
    except ImportError:
        yield
        return
    fast = _fast_pass()
    original = getattr(_fx_passes, "insert_type_promotion_nodes", None)
    if fast is None or original is None:
        yield
        return
    _fx_passes.insert_type_promotion_nodes = fast
    try:
        yield
    finally:
        _fx_passes.insert_type_promotion_nodes = original


__all__ = ["reusing_graph_values"]
