"""The IR graph as JSON: nodes, targets and arguments, no tensors and no pickle.

fx graphs do not pickle (op overloads are C++ objects) and a pickled GraphModule re-traces its
code on load, which breaks on weightless tensors; so fxforge writes its own small, readable
format. Every node is {name, op, target, args, kwargs}; a target is a dotted name resolved
against `torch.ops` (`aten.linear.default`, `fxforge.linear_wq.default`) or `operator`;
arguments encode nodes, containers, scalars, dtypes, devices, layouts and memory formats.
Shape metadata is not stored: a loaded graph is re-traced to rebuild it.
"""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
from torch.fx import Graph, Node

FORMAT = "fxforge-graph-v1"


def graph_to_json(graph: Graph) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes:
        nodes.append({
            "name": node.name,
            "op": node.op,
            "target": _target_name(node.target) if node.op == "call_function" else node.target,
            "args": _encode(node.args),
            "kwargs": _encode(node.kwargs),
            "module_path": node.meta.get("module_path", ""),
        })
    return {"format": FORMAT, "nodes": nodes}


def graph_from_json(data: dict[str, Any]) -> Graph:
    if data.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} graph (format: {data.get('format')!r})")
    graph = Graph()
    env: dict[str, Node] = {}
    for item in data["nodes"]:
        args, kwargs = _decode(item["args"], env), _decode(item["kwargs"], env)
        op = item["op"]
        if op == "placeholder":
            node = graph.placeholder(item["name"])
        elif op == "get_attr":
            node = graph.get_attr(item["target"])
        elif op == "call_function":
            node = graph.call_function(_resolve_target(item["target"]), tuple(args), dict(kwargs))
        elif op == "output":
            node = graph.output(args[0])
        else:
            raise ValueError(f"unsupported node kind {op!r} in serialized graph")
        node.name = item["name"]
        node.meta["module_path"] = item.get("module_path", "")
        env[item["name"]] = node
    graph.lint()
    return graph


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        raise ValueError(f"cannot serialize higher-order op {target.__name__}")
    module = getattr(target, "__module__", None)
    if target in vars(operator).values() or module in ("_operator", "operator"):
        return f"operator.{target.__name__}"
    if module == "math":
        return f"math.{target.__name__}"
    if module == "builtins":
        return f"builtins.{target.__name__}"
    if module and module.startswith("torch"):
        return f"{module}.{target.__name__}"
    raise ValueError(f"cannot serialize call target {target!r}: only torch ops, operator, math and "
                     f"builtins functions can be saved")


def _resolve_target(name: str) -> Any:
    root, _, rest = name.partition(".")
    obj: Any = {"operator": operator, "math": math, "builtins": builtins, "torch": torch}[root]
    if root == "torch" and not rest.startswith("ops."):
        import importlib

        module_name, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module_name), attr)
    for atom in rest.split("."):
        obj = getattr(obj, atom)
    return obj


def _encode(value: Any) -> Any:
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
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
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    raise ValueError(f"cannot serialize argument {value!r} of type {type(value).__name__}")


def _decode(value: Any, env: dict[str, Node]) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return env[payload]
    if kind == "list":
        return [_decode(v, env) for v in payload]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in payload)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in payload.items()}
    if kind == "float":
        return float(payload)
    if kind in ("dtype", "layout", "memory_format"):
        return getattr(torch, payload)
    if kind == "device":
        return torch.device(payload)
    if kind == "slice":
        return slice(*(_decode(v, env) for v in payload))
    raise ValueError(f"unknown encoded value kind {kind!r}")
