"""Queries and edits on the fxforge IR that every pass shares.

Passes never poke at GraphModule internals directly; they use these helpers, which keep three
things true after every edit: parameters/buffers are registered where `get_attr` nodes point,
unused ones are deleted, and `node.meta["val"]` (fake tensors with symbolic shapes) is valid
(`refresh_meta`).
"""
from __future__ import annotations

import fnmatch
import operator
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

aten = torch.ops.aten


# --------------------------------------------------------------------------- linear sites


@dataclass
class LinearSite:
    """One `aten.linear(x, W, b)` node whose weight is a parameter of the graph."""

    node: Node
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    module_path: str

    @property
    def input(self) -> Node:
        return self.node.args[0]


def linear_sites(
    gm: GraphModule,
    targets: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    include_lm_head: bool = False,
) -> list[LinearSite]:
    """Every linear layer of the graph, optionally filtered by module-path patterns.

    `targets` and `exclude` are fnmatch patterns over the module path ("layers.*.self_attn.*_proj",
    "*.mlp.*"); a bare name matches as a suffix ("q_proj" matches "model.layers.0.self_attn.q_proj").
    The LM head (a linear named *lm_head* or whose weight is tied to an embedding) is left out
    unless `include_lm_head` is set: quantizing or adapting it is rarely what users want by default.
    """
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        weight = node.args[1]
        if not (isinstance(weight, Node) and weight.op == "get_attr"):
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        out_features, in_features = get_attr(gm, weight.target).shape
        path = _weight_module_path(weight.target)
        sites.append(LinearSite(
            node=node,
            weight_name=weight.target,
            bias_name=bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None,
            in_features=in_features,
            out_features=out_features,
            module_path=path,
        ))
    if not include_lm_head:
        sites = [s for s in sites if not is_lm_head(gm, s)]
    if targets is not None:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        sites = [s for s in sites if matches_any(s.module_path, patterns)]
    if exclude:
        patterns = [exclude] if isinstance(exclude, str) else list(exclude)
        sites = [s for s in sites if not matches_any(s.module_path, patterns)]
    return sites


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    """fnmatch with suffix semantics: "q_proj" matches "model.layers.0.self_attn.q_proj"."""
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, "*." + p) for p in patterns)


def is_lm_head(gm: GraphModule, site: LinearSite) -> bool:
    if "lm_head" in site.module_path.split(".")[-1]:
        return True
    weight = site.node.args[1]
    return any(u.target == aten.embedding.default for u in weight.users)


def _weight_module_path(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] if "." in weight_name else weight_name


# --------------------------------------------------------------------------- attributes


def get_attr(gm: GraphModule, name: str) -> torch.Tensor:
    """The parameter or buffer a `get_attr` node named `name` reads."""
    obj: Any = gm
    for atom in name.split("."):
        obj = getattr(obj, atom)
    return obj


def has_attr(gm: GraphModule, name: str) -> bool:
    try:
        get_attr(gm, name)
        return True
    except AttributeError:
        return False


def set_attr(gm: GraphModule, name: str, value: torch.Tensor, *, buffer: bool | None = None,
             trainable: bool | None = None) -> None:
    """Create or replace the parameter/buffer `name`.

    `buffer=None` keeps the kind of an existing attribute (a new one becomes a parameter if
    floating point, else a buffer). `trainable` sets requires_grad on parameters.
    """
    *path, leaf = name.split(".")
    mod: nn.Module = gm
    for atom in path:
        if not hasattr(mod, atom):
            mod.add_module(atom, nn.Module())
        mod = getattr(mod, atom)
    if buffer is None:
        if leaf in mod._parameters:
            buffer = False
        elif leaf in mod._buffers:
            buffer = True
        else:
            buffer = not value.is_floating_point()
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    if buffer:
        mod.register_buffer(leaf, value.detach())
    else:
        grad = value.requires_grad if trainable is None else trainable
        mod.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=grad))


def delete_attr(gm: GraphModule, name: str) -> None:
    *path, leaf = name.split(".")
    mod: nn.Module = gm
    for atom in path:
        mod = getattr(mod, atom)
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def unique_attr_name(gm: GraphModule, base: str) -> str:
    """`base`, or `base_1`, `base_2`... whichever is free."""
    base = re.sub(r"[^0-9a-zA-Z_.]", "_", base)
    name, i = base, 0
    while has_attr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_attr(gm: GraphModule, base_name: str, value: torch.Tensor, *, buffer: bool | None = None,
             trainable: bool | None = None, before: Node | None = None) -> Node:
    """Register a new parameter/buffer under a free name near `base_name`; return its get_attr node."""
    name = unique_attr_name(gm, base_name)
    set_attr(gm, name, value, buffer=buffer, trainable=trainable)
    return attr_node(gm, name, before=before)


def attr_node(gm: GraphModule, name: str, before: Node | None = None) -> Node:
    """A get_attr node for `name` (reusing an existing one), placed before `before`'s users."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            return node
    anchor = before if before is not None else _first_non_placeholder(gm.graph)
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(name)
    value = get_attr(gm, name)
    node.meta["val"] = _fake_like(gm, value)
    return node


def _first_non_placeholder(graph: torch.fx.Graph) -> Node:
    for node in graph.nodes:
        if node.op != "placeholder":
            return node
    return graph.output_node()


def remove_unused_attrs(gm: GraphModule) -> list[str]:
    """Erase get_attr nodes without users and delete attributes no node reads. Returns the names deleted."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = []
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            delete_attr(gm, name)
            removed.append(name)
    gm.delete_all_unused_submodules()
    return removed


def params_and_buffers(gm: GraphModule) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


# --------------------------------------------------------------------------- rewriting


def replace_with_call(
    gm: GraphModule,
    root: Node,
    target: Any,
    args: tuple,
    kwargs: dict | None = None,
) -> Node:
    """Replace the value computed by `root` with `target(*args, **kwargs)` and drop dead nodes.

    The new node is inserted right before `root`, inherits its module path, and every user of
    `root` reads the new node instead. Nodes of the old subgraph that become unused are erased.
    """
    with gm.graph.inserting_before(root):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta["module_path"] = root.meta.get("module_path", "")
    if "nn_module_stack" in root.meta:
        new.meta["nn_module_stack"] = root.meta["nn_module_stack"]
    if "val" in root.meta:
        new.meta["val"] = root.meta["val"]
    root.replace_all_uses_with(new)
    erase_dead(gm)
    return new


_SIDE_EFFECTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                 aten.sym_constrain_range_for_size.default}


def erase_dead(gm: GraphModule) -> None:
    """Dead-code elimination that also drops unused get_attr nodes and attributes."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op == "call_function" and node.target in _SIDE_EFFECTS:
                continue
            if node.op == "call_function" and getattr(node.target, "_schema", None) is not None \
                    and node.target._schema.is_mutable:
                continue
            gm.graph.erase_node(node)
            changed = True
    remove_unused_attrs(gm)


def finalize(gm: GraphModule) -> GraphModule:
    """Lint, recompile and refresh shape metadata: call once at the end of every pass."""
    gm.graph.lint()
    gm.recompile()
    refresh_meta(gm)
    return gm


# --------------------------------------------------------------------------- metadata


def refresh_meta(gm: GraphModule) -> None:
    """Recompute `node.meta["val"]` for every node by fake-tensor propagation.

    Placeholders keep their symbolic fake values from tracing, so dynamic dimensions stay
    symbolic; parameters are converted to fake tensors in the same mode.

    Incremental: a node is propagated again only when something its value depends on changed
    since it was last propagated (its target, constant arguments, the values of its input nodes,
    the tensor a get_attr reads, or a value set by hand), see `_MetaInterpreter`. Why: fake-tensor
    propagation with symbolic shapes costs ~1-3 ms a node (sympy arithmetic on every size and
    stride), and every pass ends with a refresh: a 4-layer TinyLlama-shaped decoder paid ~0.8 CPU s
    per pass to re-derive shapes of nodes the pass never touched.
    """
    from torch._guards import detect_fake_mode

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None or any(v is None for v in vals):
        return  # a graph built by hand without metadata: nothing to keep valid
    mode.allow_non_fake_inputs = True
    interp = _MetaInterpreter(gm, mode)
    with mode:
        interp.run(*vals)


# node.meta key: (what the node's value was propagated from, that value). Copied with the node's
# metadata (structural copies share it), so a pass's result re-propagates only what it rewrote.
_SIGNATURE = "fxforge_meta_signature"


class _Same:
    """Compares by identity: targets, metadata values and tensors in a node's signature."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def _frozen(arg: Any, env: dict) -> Any:
    """`arg` (a node's args or kwargs) as a comparable value: input nodes by the identity of their
    propagated value, plain Python/torch constants by value, anything else by identity."""
    if isinstance(arg, Node):
        return _Same(env.get(arg))
    if isinstance(arg, (list, tuple)):
        return (type(arg), tuple(_frozen(a, env) for a in arg))
    if isinstance(arg, dict):
        return (dict, tuple((k, _frozen(v, env)) for k, v in arg.items()))
    if arg is None or isinstance(arg, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                       torch.memory_format)) and not isinstance(arg, torch.SymInt):
        return (type(arg), arg)
    if isinstance(arg, slice):
        return (slice, _frozen((arg.start, arg.stop, arg.step), env))
    return _Same(arg)


def _same_size(a: Any, b: Any) -> bool:
    """Equal ints, or SymInts/SymFloats/SymBools of the same symbolic expression (no guard added)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return a.node.expr == b.node.expr
    return a == b


def _equivalent(old: Any, new: Any) -> bool:
    """Whether a node's new fake value says nothing the old one does not (same kind, shape,
    strides, offset, dtype, device): then the old object is kept, and its users need no new
    propagation."""
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return (type(old) is type(new) and getattr(old, "fake_mode", None) is getattr(new, "fake_mode", None)
                and old.dtype == new.dtype and old.device == new.device
                and old.layout == new.layout and old.requires_grad == new.requires_grad
                and old.dim() == new.dim()
                and all(_same_size(x, y) for x, y in zip(old.shape, new.shape))
                and all(_same_size(x, y) for x, y in zip(old.stride(), new.stride()))
                and _same_size(old.storage_offset(), new.storage_offset()))
    if isinstance(old, (list, tuple)):
        return (type(old) is type(new) and len(old) == len(new)
                and all(_equivalent(x, y) for x, y in zip(old, new)))
    if isinstance(old, (torch.SymInt, torch.SymFloat, torch.SymBool, bool, int, float)):
        return _same_size(old, new)
    return old is new


def _signature(gm: GraphModule, n: Node, env: dict) -> tuple:
    """What `n`'s propagated value depends on (`env`: each input node's current value)."""
    entry: tuple = (n.op, _Same(n.target), _frozen(n.args, env), _frozen(n.kwargs, env))
    if n.op == "get_attr":
        try:
            value = get_attr(gm, n.target)
        except AttributeError:
            value = None
        if isinstance(value, torch.Tensor):  # a weight replaced under the same name is read again
            entry += (_Same(value), tuple(value.shape), value.stride(), value.dtype, value.device,
                      value.requires_grad)
        else:
            entry += (_Same(value),)
    elif n.op == "call_module":
        entry += (_Same(gm.get_submodule(n.target)),)
    return entry


def adopt_meta(gm: GraphModule) -> None:
    """Record the values torch.export propagated as `refresh_meta`'s own, so that the first
    refresh after tracing re-derives only what a rewrite changed (0.7 s of 2 for a 4-layer
    TinyLlama-shaped decoder's canonicalization). Only for values made by the fake mode the
    graph's placeholders carry: a freshly exported graph (fxforge.ir.trace)."""
    env = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "output":
            continue
        env[node] = val
        if val is not None and node.op != "placeholder":
            node.meta[_SIGNATURE] = (_signature(gm, node, env), val)


class _MetaInterpreter(torch.fx.Interpreter):
    """Fake-tensor propagation that skips nodes whose value cannot have changed (refresh_meta)."""

    def __init__(self, gm: GraphModule, mode: Any):
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode

    def run_node(self, n: Node) -> Any:
        if n.op in ("placeholder", "output"):  # placeholders keep their traced values
            result = super().run_node(n)
            if n.op == "placeholder":
                n.meta["val"] = result
            return result
        signature = _signature(self.module, n, self.env)
        old = n.meta.get("val")
        stored = n.meta.get(_SIGNATURE)
        if old is not None and stored is not None and stored[1] is old and stored[0] == signature:
            return old  # propagated from exactly these inputs before: the same value again
        result = self._propagate(n)
        if old is not None and _equivalent(old, result):
            result = old  # same shape as before: its users' values stay valid
        n.meta["val"] = result
        n.meta[_SIGNATURE] = (signature, result)
        return result

    def _propagate(self, n: Node) -> Any:
        if n.op == "get_attr":
            real = super().run_node(n)
            return self.mode.from_tensor(real, static_shapes=True) if isinstance(real, torch.Tensor) else real
        return super().run_node(n)


def _fake_like(gm: GraphModule, value: torch.Tensor) -> Any:
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    return mode.from_tensor(value, static_shapes=True)


def shape_of(node: Node) -> torch.Size | None:
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None


# --------------------------------------------------------------------------- summaries


@dataclass
class GraphSummary:
    nodes: int
    ops: Counter
    param_bytes: dict[str, int]
    param_count: int

    @property
    def total_param_bytes(self) -> int:
        return sum(self.param_bytes.values())

    def __str__(self) -> str:
        lines = [f"nodes: {self.nodes}   parameters: {self.param_count:,}   "
                 f"bytes: {format_bytes(self.total_param_bytes)}"]
        lines += [f"  {dtype:<16} {format_bytes(n)}" for dtype, n in sorted(self.param_bytes.items())]
        lines.append("ops:")
        lines += [f"  {count:5d}  {name}" for name, count in self.ops.most_common()]
        return "\n".join(lines)


def summarize(gm: GraphModule) -> GraphSummary:
    """Op histogram and parameter bytes by dtype."""
    ops: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            ops[op_display_name(node.target)] += 1
    param_bytes: Counter = Counter()
    count = 0
    seen: set[int] = set()
    for tensor in params_and_buffers(gm).values():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        param_bytes[str(tensor.dtype).replace("torch.", "")] += tensor.numel() * tensor.element_size()
        count += tensor.numel()
    return GraphSummary(nodes=len(gm.graph.nodes), ops=ops, param_bytes=dict(param_bytes), param_count=count)


def op_display_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def nodes_by_op(gm: GraphModule, target: Any) -> Iterator[Node]:
    return (n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)
