"""A readable, stable text form of an FX graph, and `assert_graph` to compare it with expected text.

Pattern passes are tested by what the graph looks like before and after, written out:

    assert_graph(fused, '''
        x = input()
        rms_norm = fxforge.rms_norm(x, @norm.weight, 1e-06)
        return rms_norm
    ''')

One line per node, `name = op(args)`: placeholders are `input()`; get_attr nodes are not lines
but appear in arguments as `@qualified.name`; ops are spelled `aten.<op>[.<overload>]` /
`fxforge.<op>` (".default" dropped), Python functions by name (`getitem`), call_module as
`module[<target>]`, methods as `.method`; constants by their repr (tensors as
`tensor(shape, dtype)`); the output as `return ...`. `shapes=True` appends each node's
`meta["val"]` shape and dtype as a comment. Indentation and blank lines of the expected text
do not matter; a mismatch fails with a unified diff.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch.fx import GraphModule, Node


def op_text(target: Any) -> str:
    """`aten.pow.Tensor_Scalar`, `aten.mm`, `fxforge.rms_norm`, `getitem`, ..."""
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target.namespace, target._opname
        overload = target._overloadname
        return f"{namespace}.{name}" + ("" if overload == "default" else f".{overload}")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target).replace("torch.ops.", "")
    return getattr(target, "__name__", str(target))


def value_text(value: Any) -> str:
    """An argument as text: nodes by name (get_attr as @target), containers and constants spelled out."""
    if isinstance(value, Node):
        return f"@{value.target}" if value.op == "get_attr" else value.name
    if isinstance(value, tuple):
        inner = ", ".join(value_text(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor({tuple(value.shape)}, {str(value.dtype).replace('torch.', '')})"
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    return repr(value)


def _call_text(node: Node) -> str:
    args = [value_text(a) for a in node.args]
    args += [f"{k}={value_text(v)}" for k, v in node.kwargs.items()]
    if node.op == "call_function":
        head = op_text(node.target)
    elif node.op == "call_module":
        head = f"module[{node.target}]"
    else:  # call_method
        head = f".{node.target}"
    return f"{head}({', '.join(args)})"


def _shape_comment(node: Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"  # {tuple(val.shape)} {str(val.dtype).replace('torch.', '')}"
    return ""


def graph_text(gm: GraphModule, shapes: bool = False) -> str:
    """The graph of `gm`, one line per node (see the module docstring)."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            line = f"{node.name} = input()"
        elif node.op == "output":
            (out,) = node.args
            line = f"return {value_text(out)}"
        else:
            line = f"{node.name} = {_call_text(node)}"
        lines.append(line + (_shape_comment(node) if shapes else ""))
    return "\n".join(lines)


def normalize(text: str) -> str:
    """Expected text without indentation, blank lines or trailing spaces (none carries meaning)."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def assert_graph(gm: GraphModule, expected: str, shapes: bool = False) -> None:
    """Fail with a unified diff (expected → actual) unless `gm`'s text form is `expected`."""
    actual = graph_text(gm, shapes=shapes)
    want = normalize(expected)
    if actual != want:
        diff = "\n".join(difflib.unified_diff(want.splitlines(), actual.splitlines(), "expected", "actual",
                                              lineterm=""))
        raise AssertionError(f"graph differs from the expected text:\n{diff}\n\nactual graph:\n{actual}")


def call_args(node: Node) -> dict[str, Any]:
    """The arguments of an op node by their schema names (defaults filled in), so tests read
    `call_args(op)["is_causal"]` rather than `op.args[4]`."""
    schema = node.target._schema
    named = dict(zip((a.name for a in schema.arguments), node.args))
    named.update(node.kwargs)
    for argument in schema.arguments:
        if argument.name not in named and argument.has_default_value():
            named[argument.name] = argument.default_value
    return named
