"""The IR graph as JSON: nodes, targets and arguments, no tensors and no pickle.

fx graphs do not pickle (op overloads are C++ objects) and a pickled GraphModule re-traces its
code on load, which breaks on weightless tensors; so fxforge writes its own small, readable
format. Every node is {name, op, target, args, kwargs, module_path}; a call target is a name
from `fxforge.ir.allowlist` (`torch.ops.aten.linear.default`, `operator.getitem`); arguments
encode nodes, containers, scalars, dtypes, devices, layouts and memory formats. Shape metadata
is not stored: a loaded graph is re-traced to rebuild it.

Reading is checked field by field: FX later turns node names, attribute paths and keyword
names into Python source, so `graph_from_json` refuses anything that is not plain data of the
expected type *before* the node is created (see `fxforge.ir.allowlist`). Every refusal is an
`ArtifactError` naming the node and the field.
"""
from __future__ import annotations

import keyword
from typing import Any, Collection

import torch
from torch.fx import Graph, Node

from fxforge.errors import ArtifactError
from fxforge.ir.allowlist import (
    IDENTIFIER,
    check_attr_path,
    check_node_name,
    resolve_target,
    target_name,
)

FORMAT = "fxforge-graph-v1"
NODE_FIELDS = frozenset({"name", "op", "target", "args", "kwargs", "module_path"})
MAX_DEPTH = 32  # nesting of encoded arguments; deeper JSON is refused, not recursed into

_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values()
                   if isinstance(v, torch.memory_format)}
_NAMED_VALUES = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}


# ----------------------------------------------------------------------------------- writing


def graph_to_json(graph: Graph) -> dict[str, Any]:
    """The graph as JSON-ready data; ArtifactError if a node could not be loaded back."""
    nodes = []
    for node in graph.nodes:
        where = f"node '{node.name}'"
        check_node_name(node.name, what=f"{where}: name")
        if node.op == "call_function":
            target: Any = target_name(node.target)
        elif node.op == "get_attr":
            target = check_attr_path(node.target, what=f"{where}: get_attr target")
        elif node.op == "placeholder":
            target = check_node_name(node.target, what=f"{where}: placeholder target", allow_builtins=True)
        elif node.op == "output":
            target = node.target
        else:
            raise ArtifactError(f"cannot save {where}: {node.op} nodes are not part of fxforge's IR "
                                f"(trace with fxforge.trace so modules and methods are inlined)")
        nodes.append({
            "name": node.name,
            "op": node.op,
            "target": target,
            "args": _encode(node.args, where),
            "kwargs": _encode(dict(node.kwargs), where),
            # informative only; loading refuses control characters, so they are not written
            "module_path": path if (path := str(node.meta.get("module_path", ""))).isprintable() else "",
        })
    return {"format": FORMAT, "nodes": nodes}


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v, where) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ArtifactError(f"cannot save {where}: a dict argument has non-string keys")
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}  # keeps inf/nan and every bit of precision
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start, where), _encode(value.stop, where), _encode(value.step, where)]}
    raise ArtifactError(f"cannot save {where}: argument {value!r} of type {type(value).__name__} "
                        f"has no JSON form (nodes, containers, scalars, dtypes, devices, slices)")


# ----------------------------------------------------------------------------------- reading


def graph_from_json(data: Any, tensor_names: Collection[str] | None = None) -> Graph:
    """Build the graph `data` describes, checking every field first.

    `tensor_names`: the tensors the artifact holds; a get_attr naming anything else is refused.
    No Python source is generated here (that happens when a GraphModule is built from the
    result), and each node is checked before it is created.
    """
    if not isinstance(data, dict):
        raise ArtifactError(f"graph.json must hold an object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"graph.json is not an {FORMAT} graph (format: {_short(data.get('format'))})")
    if set(data) != {"format", "nodes"}:
        raise ArtifactError(f"graph.json has unexpected fields {sorted(set(data) - {'format', 'nodes'})}")
    items = data["nodes"]
    if not isinstance(items, list) or not items:
        raise ArtifactError("graph.json field 'nodes' must be a non-empty list")
    graph = Graph()
    env: dict[str, Node] = {}
    for index, item in enumerate(items):
        _add_node(graph, env, index, item, tensor_names, last=index == len(items) - 1)
    try:
        graph.lint()
    except Exception as exc:  # lint checks FX's own invariants; any failure is a malformed file
        raise ArtifactError(f"graph.json describes an invalid graph: {exc}") from exc
    return graph


def _add_node(graph: Graph, env: dict[str, Node], index: int, item: Any,
              tensor_names: Collection[str] | None, *, last: bool) -> None:
    if not isinstance(item, dict):
        raise ArtifactError(f"graph.json node #{index} must be an object, got {type(item).__name__}")
    missing, extra = {"name", "op"} - set(item), set(item) - NODE_FIELDS
    if missing or extra:
        raise ArtifactError(f"graph.json node #{index} has missing fields {sorted(missing)} / "
                            f"unknown fields {sorted(extra)}")
    name = check_node_name(item["name"], what=f"graph.json node #{index}: name")
    where = f"graph.json node '{name}'"
    if name in env:
        raise ArtifactError(f"{where}: the name is used by an earlier node; node names must be unique")
    op = item["op"]
    module_path = item.get("module_path", "")
    if not isinstance(module_path, str) or len(module_path) > 1024 or not module_path.isprintable():
        raise ArtifactError(f"{where}: module_path must be a printable string")
    args = _decode(item.get("args", {"tuple": []}), env, f"{where}: args", 0)
    kwargs = _decode(item.get("kwargs", {"dict": {}}), env, f"{where}: kwargs", 0)
    if not isinstance(args, tuple):
        raise ArtifactError(f"{where}: args must be an encoded tuple")
    if not isinstance(kwargs, dict):
        raise ArtifactError(f"{where}: kwargs must be an encoded dict")
    for key in kwargs:  # FX writes `key=value` into the generated call
        if not IDENTIFIER.fullmatch(key) or keyword.iskeyword(key) or key.startswith("__"):
            raise ArtifactError(f"{where}: keyword argument name {_short(key)} is not a plain identifier")
    if (op == "output") != last:
        raise ArtifactError(f"{where}: the graph must end with exactly one output node (op {_short(op)})")
    if op == "placeholder":
        # FX writes the target into the signature of forward() and the name into its body
        target = check_node_name(item.get("target", name), what=f"{where}: placeholder target",
                                 allow_builtins=True)
        if args or kwargs:
            raise ArtifactError(f"{where}: a placeholder takes no arguments (no default values)")
        node = graph.create_node("placeholder", target, name=name)
    elif op == "get_attr":
        target = check_attr_path(item.get("target"), what=f"{where}: get_attr target")
        if tensor_names is not None and target not in tensor_names:
            raise ArtifactError(f"{where}: get_attr target '{target}' is not a tensor of this artifact")
        if args or kwargs:
            raise ArtifactError(f"{where}: a get_attr node takes no arguments")
        node = graph.create_node("get_attr", target, name=name)
    elif op == "call_function":
        node = graph.create_node("call_function", resolve_target(item.get("target"), what=f"{where}: target"),
                                 args, kwargs, name=name)
    elif op == "output":
        if len(args) != 1 or kwargs:
            raise ArtifactError(f"{where}: the output node takes one argument")
        node = graph.create_node("output", "output", args, name=name)
    else:
        raise ArtifactError(f"{where}: unsupported op {_short(op)} (placeholder, get_attr, "
                            f"call_function, output)")
    if node.name != name:  # FX renamed it: the name clashes with one it reserves
        raise ArtifactError(f"{where}: the name clashes with a name FX reserves")
    node.meta["module_path"] = module_path
    env[name] = node


def _decode(value: Any, env: dict[str, Node], where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ArtifactError(f"{where}: arguments nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ArtifactError(f"{where}: {_short(value)} is not an encoded value (a scalar or a "
                            f"one-key object such as {{\"node\": name}})")
    (kind, payload), = value.items()
    if kind == "node":
        if not isinstance(payload, str) or payload not in env:
            raise ArtifactError(f"{where}: refers to node {_short(payload)}, which is not defined before it")
        return env[payload]
    if kind in ("list", "tuple", "slice"):
        if not isinstance(payload, list) or (kind == "slice" and len(payload) != 3):
            raise ArtifactError(f"{where}: a {kind} must be encoded as a list"
                                + (" of three values" if kind == "slice" else ""))
        items = [_decode(v, env, where, depth + 1) for v in payload]
        return items if kind == "list" else tuple(items) if kind == "tuple" else slice(*items)
    if kind == "dict":
        if not isinstance(payload, dict):
            raise ArtifactError(f"{where}: a dict must be encoded as an object")
        return {k: _decode(v, env, where, depth + 1) for k, v in payload.items()}
    if kind == "float":
        try:
            number = float(payload) if isinstance(payload, str) and len(payload) < 64 else None
        except ValueError:
            number = None
        if number is None:
            raise ArtifactError(f"{where}: {_short(payload)} is not a float")
        return number
    if kind in _NAMED_VALUES:
        table = _NAMED_VALUES[kind]
        if not isinstance(payload, str) or payload not in table:
            raise ArtifactError(f"{where}: {_short(payload)} is not a torch {kind}")
        return table[payload]
    if kind == "device":
        try:
            if not isinstance(payload, str) or len(payload) > 32:
                raise ValueError
            return torch.device(payload)
        except (RuntimeError, ValueError):
            raise ArtifactError(f"{where}: {_short(payload)} is not a device") from None
    raise ArtifactError(f"{where}: unknown encoded value kind {_short(kind)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
