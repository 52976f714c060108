"""Channel-coupling analysis: which slices of which parameters must be pruned together.

Structured pruning removes whole channels (a hidden unit, an attention head, a conv filter).
Removing channel j of one tensor forces removing the matching channels of every tensor it flows
into or out of: the rows of the producing weight, the columns of the consuming weight, the
entries of a norm's weight, both sides of a residual add, and, through the reshapes that split
hidden size into (heads, head_dim), whole blocks of rows. This module derives those couplings
from the FX graph and its shape metadata, so no model-specific knowledge is needed.

Model. Every dimension of every tensor in the graph is a product of *atomic axes*. A reshape
`(b, s, 64) -> (b, s, 4, 16)` splits the axis of size 64 into an outer axis of 4 (heads) and
an inner axis of 16 (head_dim); a merge `(b, s, 4, 16) -> (b, s, 64)` makes the 64 their
product; a `split`/`cat` along a channel dimension makes it a concatenation (a sum) of axes.
Ops couple axes (a residual add couples its operands' last dims, a linear its input's last
dim with the weight's columns, ...), recorded in a union-find with refinement. A pruning group
is one atomic axis class; removing unit u of it removes, in each member dimension, exactly the
indices whose coordinate along that axis is u. Grouped-query attention falls out: repeat_kv's
`unsqueeze -> expand -> reshape` makes the query-head dim the product (kv_head, repeat), so
removing a kv head removes its whole group of query heads (group kind "heads") and removing a
repeat index removes one query head inside every group ("query_heads").

`groups(gm)` lists the groups (`CouplingAnalysis.graph` is the networkx graph of coupled
(node, dim, factor) triples, one connected component per group). Couplings the analysis cannot
prove (an op it does not know, a slice of a channel dim, a literal-size tensor factory, a dim
that reaches the graph's inputs or outputs) *block* the groups involved, with the reason: the
prune pass skips them and lists them, instead of producing a broken graph. Slices that tile a
dim exactly (a fused qkv or gate_up projection split by slices) are a concatenation, like a
split. A head/channel group that a width-dependent reduction runs over (a LayerNorm over all
heads, a softmax over channels) is blocked: removing its units would not be zeroing them; a
mean over it is allowed, the surgery rescales it (`CouplingAnalysis.mean_rescales`).
"""
from __future__ import annotations

import itertools
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import sympy
import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

Size = Any  # an int or a sympy expression (symbolic batch / sequence sizes)


class _Unprovable(Exception):
    """Two dims met whose coupling cannot be expressed (e.g. sizes that do not divide)."""


# --------------------------------------------------------------------------- axes


def _size_of(dim: Any) -> Size:
    if isinstance(dim, torch.SymInt):
        expr = dim.node.expr
        return int(expr) if expr.is_number else expr
    return int(dim)


def _is_static(size: Size) -> bool:
    return isinstance(size, int)


def _equal(a: Size, b: Size) -> bool:
    if _is_static(a) and _is_static(b):
        return a == b
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _divides(small: Size, big: Size) -> Size | None:
    """big / small if it is a whole number (or a whole-number expression), else None."""
    if _is_static(small) and _is_static(big):
        return big // small if small and big % small == 0 else None
    ratio = sympy.cancel(sympy.sympify(big) / sympy.sympify(small))
    num, den = sympy.fraction(ratio)
    if den != 1:
        return None
    return int(ratio) if ratio.is_number else ratio


class _Axes:
    """Union-find over atomic axes, where a class may later be refined into a product or sum."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[Size] = []
        self.split: dict[int, tuple[str, list[int]]] = {}  # root -> ("prod"|"sum", children)
        self.blocked: dict[int, str] = {}  # root -> why it may not be pruned

    def new(self, size: Size) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def block(self, a: int, reason: str) -> None:
        root = self.find(a)
        self.blocked.setdefault(root, reason)
        kind_children = self.split.get(root)
        if kind_children:
            for child in kind_children[1]:
                if self.find(child) not in self.blocked:
                    self.block(child, reason)

    def product(self, children: list[int]) -> int:
        """A new axis that is the row-major product of `children` (outer first)."""
        children = [c for c in children if self.size[self.find(c)] != 1]
        if len(children) == 1:
            return children[0]
        size: Size = 1
        for c in children:
            size = size * self.size[self.find(c)]
        axis = self.new(size if _is_static(size) else sympy.expand(size))
        if children:
            self.split[axis] = ("prod", children)
        return axis

    def concat(self, children: list[int]) -> int:
        """A new axis that is the concatenation of `children` (a `cat` / inverse of `split`)."""
        sizes = [self.size[self.find(c)] for c in children]
        if not all(_is_static(s) for s in sizes):
            raise _Unprovable("concatenation of symbolic sizes")
        if len(children) == 1:
            return children[0]
        axis = self.new(sum(sizes))
        self.split[axis] = ("sum", list(children))
        return axis

    def factors(self, a: int) -> list[int]:
        """`a` as a product of axes that are not product-split (sum-split ones stay whole)."""
        root = self.find(a)
        kind_children = self.split.get(root)
        if kind_children and kind_children[0] == "prod":
            return [f for c in kind_children[1] for f in self.factors(c)]
        return [] if self.size[root] == 1 else [root]

    def refine(self, a: int, outer: Size) -> tuple[int, int]:
        """Split the unsplit axis `a` into (outer, inner) with the given outer size."""
        root = self.find(a)
        if root in self.split:
            raise _Unprovable("a concatenated channel dim is reshaped across its segments")
        inner = _divides(outer, self.size[root])
        if inner is None:
            raise _Unprovable(f"size {outer} does not divide {self.size[root]}")
        o, i = self.new(outer), self.new(inner)
        self.split[root] = ("prod", [o, i])
        if root in self.blocked:
            self.blocked[o] = self.blocked[i] = self.blocked[root]
        return o, i

    def unify(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if not _equal(self.size[ra], self.size[rb]):
            raise _Unprovable(f"coupled dims of different sizes {self.size[ra]} and {self.size[rb]}")
        sa, sb = self.split.pop(ra, None), self.split.pop(rb, None)
        self.parent[rb] = ra
        reason = self.blocked.pop(rb, None) or self.blocked.get(ra)
        if sa is None or sb is None:
            if sa or sb:
                self.split[ra] = sa or sb
        elif sa[0] == "prod" and sb[0] == "prod":
            self.split[ra] = sa
            self.unify_products(sa[1], sb[1])
        elif sa[0] == sb[0] == "sum" and len(sa[1]) == len(sb[1]):
            self.split[ra] = sa
            for x, y in zip(sa[1], sb[1]):
                self.unify(x, y)
        else:
            self.split[ra] = sa
            raise _Unprovable("a dim is both a concatenation and a product of others")
        if reason:
            self.block(ra, reason)

    def unify_products(self, xs: Iterable[int], ys: Iterable[int]) -> None:
        """Couple two row-major products of axes with the same total size (a reshape)."""
        left = deque(f for x in xs for f in self.factors(x))
        right = deque(f for y in ys for f in self.factors(y))
        while left and right:
            x, y = self.find(left.popleft()), self.find(right.popleft())
            sx, sy = self.size[x], self.size[y]
            if _equal(sx, sy):
                self.unify(x, y)
            elif _divides(sy, sx) is not None:
                outer, inner = self.refine(x, sy)
                self.unify(outer, y)
                left.extendleft(reversed(self.factors(inner)))
            elif _divides(sx, sy) is not None:
                outer, inner = self.refine(y, sx)
                self.unify(x, outer)
                right.extendleft(reversed(self.factors(inner)))
            else:
                raise _Unprovable(f"reshape factors {sx} and {sy} do not nest")
        if left or right:
            raise _Unprovable("reshape with different total sizes")

    def coords(self, a: int) -> list[tuple[tuple[int, int], ...]]:
        """For each index of axis `a`: its coordinate along every leaf axis it is built from."""
        root = self.find(a)
        kind_children = self.split.get(root)
        if kind_children is None:
            size = self.size[root]
            return [((root, i),) for i in range(size)] if size != 1 else [()]
        kind, children = kind_children
        parts = [self.coords(c) for c in children]
        if kind == "sum":
            return [c for part in parts for c in part]
        return [sum(combo, ()) for combo in itertools.product(*parts)]

    def leaves(self, a: int) -> list[int]:
        root = self.find(a)
        kind_children = self.split.get(root)
        if kind_children is None:
            return [root]
        out: list[int] = []
        for c in kind_children[1]:
            out += [leaf for leaf in self.leaves(c) if leaf not in out]
        return out

    def reason(self, leaf: int) -> str | None:
        return self.blocked.get(self.find(leaf))


# --------------------------------------------------------------------------- rules


_Dims = list[int]  # one axis per tensor dimension


class _Analyzer:
    """Walks the graph once, creating axes for every tensor dim and coupling them by op rules."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.ax = _Axes()
        self.dims: dict[Node, Any] = {}  # node -> _Dims, or a list of _Dims for tuple outputs
        self.params: dict[str, _Dims] = {}  # parameter name -> dims (shared by its get_attr nodes)
        self.notes: list[tuple[str, str]] = []  # (node, reason) for every blocking rule that fired
        # (node, reduced axes, "mean" | "other"): reductions whose result depends on the reduced
        # width, not only on the values (a sum does not: zeroed channels add nothing). Pruning a
        # head/channel group through one would not compute the graph with those units zeroed:
        # a mean is rescaled by the surgery, anything else (a norm, a softmax, a max) blocks.
        self.reductions: list[tuple[Node, list[int], str]] = []
        # slice node -> (the parts its input's dim is concatenated from, its index): slices
        # that tile a dim exactly (`_slice_partition`); the surgery moves their bounds
        self.slice_parts: dict[Node, tuple[list[int], int]] = {}

    # ---- helpers
    def fresh(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            return [self.ax.new(_size_of(d)) for d in val.shape]
        if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
            return [self.fresh(v) if isinstance(v, torch.Tensor) else None for v in val]
        return None

    def of(self, arg: Any) -> _Dims | None:
        if isinstance(arg, Node):
            d = self.dims.get(arg)
            if d is not None and (not d or isinstance(d[0], int)):
                return d
        return None

    def tensor_args(self, node: Node) -> list[Node]:
        flat = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n)
        out: list[Node] = []
        torch.fx.node.map_arg(flat, lambda n: out.append(n) if self.dims.get(n) is not None else None)
        return out

    def block_all(self, node: Node, reason: str) -> None:
        self.notes.append((node.name, reason))
        for n in [node, *self.tensor_args(node)]:
            for axis in _flatten_dims(self.dims.get(n)):
                self.ax.block(axis, reason)

    def reduces(self, node: Node, axes: list[int], kind: str = "other") -> None:
        self.reductions.append((node, list(axes), kind))

    def same(self, a: _Dims, b: _Dims) -> None:
        for x, y in zip(a, b):
            self.ax.unify(x, y)

    def broadcast(self, out: _Dims, arg: _Dims) -> None:
        """Right-aligned broadcasting: equal non-1 sizes are the same channels."""
        for x, y in zip(reversed(out), reversed(arg)):
            sx, sy = self.ax.size[self.ax.find(x)], self.ax.size[self.ax.find(y)]
            if sy != 1 and _equal(sx, sy):
                self.ax.unify(x, y)

    def run(self) -> "_Analyzer":
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for n in self.tensor_args(node):
                    for axis in _flatten_dims(self.dims[n]):
                        self.ax.block(axis, "reaches the graph's outputs")
                continue
            self.dims[node] = self.fresh(node.meta.get("val"))
            if self.dims[node] is None:
                continue
            try:
                self.apply(node)
            except _Unprovable as exc:
                self.block_all(node, f"coupling at node '{node.name}' cannot be proven: {exc}")
        return self

    def apply(self, node: Node) -> None:
        out = self.dims[node]
        if node.op == "placeholder":
            for axis in out:
                self.ax.block(axis, "comes from the graph's inputs")
            return
        if node.op == "get_attr":
            known = self.params.setdefault(node.target, out)
            if known is not out:
                self.same(known, out)
            return
        if node.op != "call_function":
            self.block_all(node, f"{node.op} node '{node.name}' is not analyzed")
            return
        rule = _RULES.get(node.target)
        if rule is None:
            rule = _elementwise if _is_pointwise(node.target) else None
        if rule is None:
            name = getattr(node.target, "__name__", str(node.target))
            self.block_all(node, f"op {name} at node '{node.name}' is not known to the dependency "
                                 f"analysis (add a rule in fxforge/ir/depgraph.py)")
            return
        rule(self, node, out)


def _flatten_dims(d: Any) -> list[int]:
    if d is None:
        return []
    if d and isinstance(d[0], int):
        return list(d)
    return [a for part in d if part for a in part]


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# Rules: rule(analyzer, node, out_dims) couples the node's output dims with its inputs' dims.

def _elementwise(a: _Analyzer, node: Node, out: _Dims) -> None:
    # x + y, x * y, silu(x), where(c, x, y), to(x, dtype) ...: broadcast dims are the same channels
    for arg in a.tensor_args(node):
        dims = a.of(arg)
        if dims is not None:
            a.broadcast(out, dims)


def _linear(a: _Analyzer, node: Node, out: _Dims) -> None:
    # linear(x, W, b): x[..., in] · W[out, in]ᵀ + b[out]
    x, w, b = a.of(node.args[0]), a.of(node.args[1]), a.of(_arg(node, 2, "bias"))
    a.same(x[:-1], out[:-1])
    a.ax.unify(x[-1], w[1])
    a.ax.unify(out[-1], w[0])
    if b is not None:
        a.ax.unify(out[-1], b[0])


def _matmul(a: _Analyzer, node: Node, out: _Dims) -> None:
    # matmul(x[..., m, k], y[..., k, n]) -> [..., m, n]; batch dims broadcast
    x, y = a.of(node.args[0]), a.of(node.args[1])
    if len(x) < 2 or len(y) < 2:
        raise _Unprovable("matmul with a 1-D operand")
    a.broadcast(out[:-2], x[:-2])
    a.broadcast(out[:-2], y[:-2])
    a.ax.unify(x[-1], y[-2])
    a.ax.unify(out[-2], x[-2])
    a.ax.unify(out[-1], y[-1])


def _transpose(a: _Analyzer, node: Node, out: _Dims) -> None:
    x = a.of(node.args[0])
    perm = list(range(len(x)))
    if node.target == aten.permute.default:
        perm = [_norm_dim(d, len(x)) for d in node.args[1]]
    elif node.target == aten.t.default:
        perm = perm[::-1]
    else:
        d0, d1 = (_norm_dim(d, len(x)) for d in node.args[1:3])
        perm[d0], perm[d1] = perm[d1], perm[d0]
    a.same(out, [x[p] for p in perm])


def _unsqueeze(a: _Analyzer, node: Node, out: _Dims) -> None:
    x = a.of(node.args[0])
    d = _norm_dim(node.args[1], len(out))
    a.same(out[:d] + out[d + 1:], x)


def _squeeze(a: _Analyzer, node: Node, out: _Dims) -> None:
    # removed dims have size 1, so a squeeze is a reshape
    a.ax.unify_products(a.of(node.args[0]), out)


def _reshape(a: _Analyzer, node: Node, out: _Dims) -> None:
    # view(x, sizes): row-major, so the flattened factor lists line up
    a.ax.unify_products(a.of(node.args[0]), out)


def _expand(a: _Analyzer, node: Node, out: _Dims) -> None:
    # expand: dims of size 1 become new axes (GQA's repeat), others stay the same channels
    a.broadcast(out, a.of(node.args[0]))


def _identity(a: _Analyzer, node: Node, out: _Dims) -> None:
    a.same(out, a.of(node.args[0]))


def _slice_bounds(node: Node, size: int) -> tuple[int, int] | None:
    """(start, end) of a step-1 slice with literal bounds, clamped to `size`; else None."""
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = size if end is None else end
    if step != 1 or not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = (v + size if v < 0 else v for v in (start, end))
    return max(0, min(start, size)), max(0, min(end, size))


def _slice_partition(a: _Analyzer, node: Node, x: _Dims, d: int) -> int | None:
    """The axis of `node`'s part when every user of its input is a slice along d and together
    they tile the dim exactly (a fused projection split by slices: Phi-3's qkv and gate_up):
    the dim is then a concatenation of the parts, like a split's. None otherwise."""
    source = node.args[0]
    known = a.slice_parts.get(node)
    if known is not None:
        return known[0][known[1]]
    size = a.ax.size[a.ax.find(x[d])]
    if not _is_static(size):
        return None
    bounds = []
    for user in source.users:
        if user.target != aten.slice.Tensor or user.args[0] is not source or \
                _norm_dim(_arg(user, 1, "dim", 0), len(x)) != d:
            return None
        b = _slice_bounds(user, size)
        if b is None or b[0] >= b[1]:
            return None
        bounds.append((b, user))
    bounds.sort(key=lambda item: item[0])
    if bounds[0][0][0] != 0 or bounds[-1][0][1] != size or len(bounds) < 2 or any(
            prev[0][1] != nxt[0][0] for prev, nxt in zip(bounds, bounds[1:])):
        return None
    parts = [a.ax.new(end - start) for (start, end), _ in bounds]
    a.ax.unify(x[d], a.ax.concat(parts))
    for i, (_, user) in enumerate(bounds):
        a.slice_parts[user] = (parts, i)
    return parts[a.slice_parts[node][1]]


def _slice(a: _Analyzer, node: Node, out: _Dims) -> None:
    x = a.of(node.args[0])
    d = _norm_dim(_arg(node, 1, "dim", 0), len(x))
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    full = (start in (None, 0) and step == 1 and
            (end is None or (isinstance(end, int) and _is_static(a.ax.size[a.ax.find(x[d])])
                             and end >= a.ax.size[a.ax.find(x[d])])))
    a.same(out[:d] + out[d + 1:], x[:d] + x[d + 1:])
    if full:
        a.ax.unify(out[d], x[d])
        return
    part = _slice_partition(a, node, x, d)
    if part is not None:
        a.ax.unify(out[d], part)
        return
    reason = f"sliced by node '{node.name}'"
    a.ax.block(x[d], reason)
    a.ax.block(out[d], reason)


def _select(a: _Analyzer, node: Node, out: _Dims) -> None:
    x = a.of(node.args[0])
    d = _norm_dim(node.args[1], len(x))
    a.same(out, x[:d] + x[d + 1:])
    a.ax.block(x[d], f"indexed by node '{node.name}'")


def _cat(a: _Analyzer, node: Node, out: _Dims) -> None:
    # cat([x, y], d): other dims equal; dim d is the concatenation of the inputs' dims d
    inputs = [a.of(t) for t in node.args[0]]
    inputs = [x for x in inputs if x is not None and len(x) == len(out)]
    d = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    for x in inputs:
        a.same(out[:d] + out[d + 1:], x[:d] + x[d + 1:])
    a.ax.unify(out[d], a.ax.concat([x[d] for x in inputs]))


def _split(a: _Analyzer, node: Node, out: list[_Dims]) -> None:
    # split(x, sizes, d): each part keeps the other dims; dim d is the concatenation of the parts
    x = a.of(node.args[0])
    d = _norm_dim(_arg(node, 2, "dim", 0), len(x))
    for part in out:
        a.same(part[:d] + part[d + 1:], x[:d] + x[d + 1:])
    a.ax.unify(x[d], a.ax.concat([part[d] for part in out]))


def _getitem(a: _Analyzer, node: Node, out: _Dims) -> None:
    parts = a.dims.get(node.args[0])
    if parts is None or not isinstance(node.args[1], int):
        raise _Unprovable("getitem of an unanalyzed value")
    a.same(out, parts[node.args[1]])


def _layer_norm(a: _Analyzer, node: Node, out: Any) -> None:
    # layer_norm(x, shape, w, b): normalizes (and scales) the last len(shape) dims
    x = a.of(node.args[0])
    y = out[0] if node.target == aten.native_layer_norm.default else out
    a.same(y, x)
    k = len(node.args[1])
    a.reduces(node, x[-k:])
    for param in (_arg(node, 2, "weight"), _arg(node, 3, "bias")):
        p = a.of(param)
        if p is not None:
            a.same(p, x[-k:])


def _rms_norm(a: _Analyzer, node: Node, out: _Dims) -> None:
    # fxforge.rms_norm(x, w, eps): out = x normalized over the last dim, times w
    x, w = a.of(node.args[0]), a.of(node.args[1])
    a.same(out, x)
    a.reduces(node, x[-1:])
    if w is not None:
        a.ax.unify(w[0], x[-1])


def _aten_rms_norm(a: _Analyzer, node: Node, out: _Dims) -> None:
    # rms_norm(x, shape, w, eps): normalizes (and scales) the last len(shape) dims
    x, w = a.of(node.args[0]), a.of(_arg(node, 2, "weight"))
    a.same(out, x)
    k = len(node.args[1])
    a.reduces(node, x[-k:])
    if w is not None:
        a.same(w, x[-k:])


def _softmax(a: _Analyzer, node: Node, out: _Dims) -> None:
    # softmax(x, d): same dims; each output depends on the whole of dim d (its width included)
    x = a.of(node.args[0])
    a.same(out, x)
    a.reduces(node, [x[_norm_dim(node.args[1], len(x))]])


def _sdpa(a: _Analyzer, node: Node, out: _Dims) -> None:
    # scaled_dot_product_attention(q[.., Hq, L, E], k[.., Hk, S, E], v[.., Hk, S, Ev], mask, p,
    # causal, scale, enable_gqa) -> [.., Hq, L, Ev]: q·kᵀ contracts E (a sum), P·v contracts S;
    # with Hk < Hq (GQA) query head i reads key/value head i // (Hq / Hk): Hq = (Hk, repeat)
    q, k, v = (a.of(node.args[i]) for i in range(3))
    mask = a.of(_arg(node, 3, "attn_mask"))
    a.same(out[:-1], q[:-1])
    a.ax.unify(q[-1], k[-1])
    a.ax.unify(out[-1], v[-1])
    a.ax.unify(k[-2], v[-2])
    a.same(k[:-3], q[:-3])
    a.same(v[:-1], k[:-1])
    hq, hk = (a.ax.size[a.ax.find(x[-3])] for x in (q, k))
    if _equal(hq, hk):
        a.ax.unify(q[-3], k[-3])
    else:
        repeat = _divides(hk, hq)
        if repeat is None or not _is_static(repeat):
            raise _Unprovable(f"{hq} query heads over {hk} key/value heads")
        a.ax.unify(q[-3], a.ax.product([k[-3], a.ax.new(repeat)]))
    if mask is not None:
        a.broadcast(out[:-1] + [k[-2]], mask)
    if _arg(node, 6, "scale") is None:  # the default scale 1/sqrt(E) follows E's width
        a.ax.block(q[-1], f"the default scale 1/sqrt(head_dim) of node '{node.name}' follows the head width")


def _gather(a: _Analyzer, node: Node, out: _Dims) -> None:
    # gather(x, d, index) -> index's shape: out[..i..] = x[.., index[..i..], ..] along d (picked by
    # data: blocked), the same position of x in every other dim (the same channels when the
    # sizes agree, a slice of x's dim when index is shorter there)
    x, index = a.of(node.args[0]), a.of(node.args[2])
    d = _norm_dim(node.args[1], len(x))
    a.same(out, index)
    for i, (o, axis) in enumerate(zip(out, x)):
        if i != d and _equal(a.ax.size[a.ax.find(o)], a.ax.size[a.ax.find(axis)]):
            a.ax.unify(o, axis)
        else:
            reason = f"indexed by node '{node.name}' (gather)"
            a.ax.block(axis, reason)
            a.ax.block(o, reason)


def _im2col(a: _Analyzer, node: Node, out: _Dims) -> None:
    # im2col(x[N, C, H, W], kernel, ...) -> [N, C·kh·kw, L]: channel c owns rows c·k .. c·k+k-1
    x, kernel = a.of(node.args[0]), node.args[1]
    taps = 1
    for k in kernel:
        taps *= k
    a.ax.unify(out[0], x[0])
    a.ax.unify(out[1], a.ax.product([x[1], _literal_axis(a, taps, node)]) if taps != 1 else x[1])


def _batch_norm(a: _Analyzer, node: Node, out: Any) -> None:
    # batch_norm(x, w, b, mean, var, ...): per-channel (dim 1) affine
    x = a.of(node.args[0])
    y = out[0] if isinstance(out[0], list) else out
    a.same(y, x)
    for param in node.args[1:5]:
        p = a.of(param)
        if p is not None:
            a.ax.unify(p[0], x[1])
    if isinstance(out[0], list):  # (y, saved mean, saved rstd): the saved stats are per channel
        for extra in out[1:]:
            if extra and len(extra) == 1:
                a.ax.unify(extra[0], x[1])


def _conv(a: _Analyzer, node: Node, out: _Dims) -> None:
    # conv(x[N, Cin, ...], W[Cout, Cin/groups, ...], b[Cout]); spatial dims are new axes
    x, w, b = a.of(node.args[0]), a.of(node.args[1]), a.of(_arg(node, 2, "bias"))
    groups = _arg(node, 6, "groups", 1)
    if node.target == aten.convolution.default:
        groups = node.args[8]
        if node.args[6]:
            raise _Unprovable("transposed convolution")
    if groups != 1:
        if not (_is_depthwise(a, x, w, groups)):
            raise _Unprovable("grouped convolution (only depthwise, one filter per channel, is analyzed)")
        # depthwise (Mamba's / Hyena's short conv): filter c reads and writes channel c only
        a.ax.unify(out[0], x[0])
        a.ax.unify(out[1], x[1])
        a.ax.unify(out[1], w[0])
        if b is not None:
            a.ax.unify(out[1], b[0])
        return
    a.ax.unify(out[0], x[0])
    a.ax.unify(x[1], w[1])
    a.ax.unify(out[1], w[0])
    if b is not None:
        a.ax.unify(out[1], b[0])


def _is_depthwise(a: _Analyzer, x: _Dims, w: _Dims, groups: Any) -> bool:
    """groups == in channels == out channels and one input channel per filter."""
    size = lambda axis: a.ax.size[a.ax.find(axis)]  # noqa: E731
    return (isinstance(groups, int) and _is_static(size(x[1])) and groups == size(x[1]) == size(w[0])
            and size(w[1]) == 1)


def _pool(a: _Analyzer, node: Node, out: Any) -> None:
    # pooling keeps batch and channels; spatial dims are new axes
    x = a.of(node.args[0])
    y = out[0] if out and isinstance(out[0], list) else out
    a.same(y[:-2], x[:-2])


def _reduce(a: _Analyzer, node: Node, out: _Dims) -> None:
    # mean(x, dims, keepdim): kept dims stay the same channels
    x = a.of(node.args[0])
    dims = _arg(node, 1, "dim", None)
    keepdim = _arg(node, 2, "keepdim", False)
    if dims is None:
        return
    dims = {_norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    kept = [axis for i, axis in enumerate(x) if i not in dims]
    if node.target != aten.sum.dim_IntList:
        a.reduces(node, [x[i] for i in sorted(dims)], "mean" if node.target == aten.mean.dim else "other")
    if keepdim:
        a.same([o for i, o in enumerate(out) if i not in dims], kept)
    else:
        a.same(out, kept)


def _reduce_at(dim_index: int, keepdim_index: int) -> Callable[..., None]:
    """A reduction whose `dim`/`keepdim` arguments sit at other positions than mean's."""
    def rule(a: _Analyzer, node: Node, out: _Dims) -> None:
        x = a.of(node.args[0])
        dims = _arg(node, dim_index, "dim", None)
        keepdim = _arg(node, keepdim_index, "keepdim", False)
        if dims is None:
            return
        dims = {_norm_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
        kept = [axis for i, axis in enumerate(x) if i not in dims]
        a.reduces(node, [x[i] for i in sorted(dims)])
        a.same([o for i, o in enumerate(out) if i not in dims] if keepdim else out, kept)
    return rule


def _stack(a: _Analyzer, node: Node, out: _Dims) -> None:
    # stack([x, y], d): a new dim d (one index per input, its own axis); the others are the inputs'
    d = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    for t in node.args[0]:
        x = a.of(t)
        if x is not None:
            a.same(out[:d] + out[d + 1:], x)
    a.ax.block(out[d], f"size is the input count of node '{node.name}'")


def _unbind(a: _Analyzer, node: Node, out: list[_Dims]) -> None:
    # unbind(x, d): each part is x indexed at one position of dim d (a select per part)
    x = a.of(node.args[0])
    d = _norm_dim(_arg(node, 1, "dim", 0), len(x))
    for part in out:
        if part is not None:
            a.same(part, x[:d] + x[d + 1:])
    a.ax.block(x[d], f"indexed by node '{node.name}' (unbind)")


def _view_as(a: _Analyzer, node: Node, out: _Dims) -> None:
    # view_as(x, other): a reshape to other's shape
    a.ax.unify_products(a.of(node.args[0]), out)
    a.same(out, a.of(node.args[1]))


def _literal_axis(a: _Analyzer, size: int, node: Node) -> int:
    """A new axis whose size is a literal argument of `node` (a repeat count, a stack's input
    count): removing one of its units would need that literal changed, so it is blocked."""
    axis = a.ax.new(size)
    a.ax.block(axis, f"size is a literal count of node '{node.name}'")
    return axis


def _repeat(a: _Analyzer, node: Node, out: _Dims) -> None:
    # repeat(x, reps): dim i of the output is reps[i] tiles of x's dim (row-major: the tile index
    # is the outer factor); leading extra dims are new axes. The reps are counts, not sizes, so
    # pruning x's channels needs no rewrite of them.
    x, reps = a.of(node.args[0]), list(node.args[1])
    lead = len(out) - len(x)
    for i, axis in enumerate(x):
        rep = reps[lead + i]
        if isinstance(rep, Node) and isinstance(rep.meta.get("val"), torch.SymInt):
            rep = _size_of(rep.meta["val"])  # a batch-sized count (BLOOM tiles ALiBi per sample)
        elif not isinstance(rep, int):
            raise _Unprovable("repeat by a count that is neither a literal nor a size")
        if rep == 1:
            a.ax.unify(out[lead + i], axis)
        else:
            a.ax.unify(out[lead + i], a.ax.product([_literal_axis(a, rep, node), axis]))


def _repeat_interleave(a: _Analyzer, node: Node, out: _Dims) -> None:
    # repeat_interleave(x, r, d): output index i*r + k is x's index i (x's axis is the outer factor)
    x, reps, d = a.of(node.args[0]), _arg(node, 1, "repeats"), _arg(node, 2, "dim", None)
    if d is None or not isinstance(reps, int):
        raise _Unprovable("repeat_interleave without a dim or by a symbolic count")
    d = _norm_dim(d, len(x))
    a.same(out[:d] + out[d + 1:], x[:d] + x[d + 1:])
    a.ax.unify(out[d], a.ax.product([x[d], _literal_axis(a, reps, node)]) if reps != 1 else x[d])


def _expand_as(a: _Analyzer, node: Node, out: _Dims) -> None:
    # expand_as(x, other): expand x to other's shape (other's dims are the output's)
    a.broadcast(out, a.of(node.args[0]))
    a.same(out, a.of(node.args[1]))


def _topk(a: _Analyzer, node: Node, out: list[_Dims]) -> None:
    # topk(x, k, d) -> (values, indices): dim d keeps k of its entries (a data-dependent slice)
    x = a.of(node.args[0])
    d = _norm_dim(_arg(node, 2, "dim", -1), len(x))
    reason = f"top-k selected by node '{node.name}'"
    a.ax.block(x[d], reason)
    for part in out:
        if part is not None:
            a.same(part[:d] + part[d + 1:], x[:d] + x[d + 1:])
            a.ax.block(part[d], reason)


def _pad(a: _Analyzer, node: Node, out: _Dims) -> None:
    # pad(x, [l_last, r_last, l_prev, r_prev, ...]): padded dims change size (blocked like a
    # slice), the others stay the same channels
    x, pad = a.of(node.args[0]), list(node.args[1])
    padded = {len(x) - 1 - i // 2 for i, amount in enumerate(pad) if not (isinstance(amount, int) and amount == 0)}
    for i, (o, axis) in enumerate(zip(out, x)):
        if i in padded:
            a.ax.block(axis, f"padded by node '{node.name}'")
            a.ax.block(o, f"padded by node '{node.name}'")
        else:
            a.ax.unify(o, axis)


def _embedding(a: _Analyzer, node: Node, out: _Dims) -> None:
    # embedding(W[vocab, d], ids) -> [*ids.shape, d]; rows are picked by token id
    w, ids = a.of(node.args[0]), a.of(node.args[1])
    a.same(out[:-1], ids)
    a.ax.unify(out[-1], w[1])
    a.ax.block(w[0], f"rows are indexed by token ids at node '{node.name}'")


def _factory(a: _Analyzer, node: Node, out: _Dims) -> None:
    # zeros/ones/full/arange...: a literal size cannot follow a pruned dim
    for axis in out:
        if _is_static(a.ax.size[a.ax.find(axis)]):
            a.ax.block(axis, f"size is a literal of tensor factory '{node.name}'")


def _ignore(a: _Analyzer, node: Node, out: Any) -> None:
    pass


_POINTWISE_TAGS = (torch.Tag.pointwise,)


def _is_pointwise(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and any(t in target.tags for t in _POINTWISE_TAGS)


_RULES: dict[Any, Callable[..., None]] = {
    aten.linear.default: _linear,
    aten.matmul.default: _matmul, aten.bmm.default: _matmul, aten.mm.default: _matmul,
    aten.transpose.int: _transpose, aten.permute.default: _transpose, aten.t.default: _transpose,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze, aten.squeeze.default: _squeeze,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.flatten.using_ints: _reshape,
    aten.expand.default: _expand,
    aten.slice.Tensor: _slice, aten.select.int: _select,
    aten.cat.default: _cat,
    # chunk(x, n, d) is split into n equal parts (GPT-NeoX / MPT split their fused QKV so)
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split, aten.chunk.default: _split,
    operator.getitem: _getitem,
    aten.layer_norm.default: _layer_norm, aten.native_layer_norm.default: _layer_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.batch_norm.default: _batch_norm,
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.convolution.default: _conv,
    aten.max_pool2d.default: _pool, aten.avg_pool2d.default: _pool,
    aten.adaptive_avg_pool2d.default: _pool, aten.max_pool2d_with_indices.default: _pool,
    aten._adaptive_avg_pool2d.default: _pool,
    aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce, aten.amax.default: _reduce,
    aten.softmax.int: _softmax, aten._softmax.default: _softmax, aten.log_softmax.int: _softmax,
    aten._log_softmax.default: _softmax, aten._safe_softmax.default: _softmax,
    aten.gather.default: _gather, aten.im2col.default: _im2col,
    # aliases of pointwise ops that carry no pointwise tag
    aten.multiply.Tensor: _elementwise, aten.subtract.Tensor: _elementwise,
    aten.divide.Tensor: _elementwise,
    aten.rms_norm.default: _aten_rms_norm, aten.scaled_dot_product_attention.default: _sdpa, aten.reshape_as.default: _view_as,
    aten.contiguous.default: _identity, aten.clone.default: _identity, aten.alias.default: _identity,
    aten.detach.default: _identity, aten.dropout.default: _identity,
    aten.to.dtype: _identity, aten.to.device: _identity, aten.to.dtype_layout: _identity,
    aten._to_copy.default: _identity,
    aten.embedding.default: _embedding,
    aten.zeros.default: _factory, aten.ones.default: _factory, aten.full.default: _factory,
    aten.empty.memory_format: _factory, aten.arange.default: _factory, aten.arange.start: _factory,
    aten.arange.start_step: _factory, aten.new_ones.default: _factory, aten.new_zeros.default: _factory,
    aten.scalar_tensor.default: _factory, aten.zeros_like.default: _elementwise,
    aten.ones_like.default: _elementwise, aten.full_like.default: _elementwise,
    aten.where.self: _elementwise, aten.where.ScalarOther: _elementwise,
    aten.where.ScalarSelf: _elementwise, aten.__and__.Tensor: _elementwise,
    aten.__or__.Tensor: _elementwise, aten.masked_fill.Scalar: _elementwise,
    aten.sym_size.int: _ignore,
    aten.stack.default: _stack, aten.unbind.int: _unbind,
    aten.type_as.default: _identity, aten.view_as.default: _view_as, aten.repeat.default: _repeat,
    aten.logsumexp.default: _reduce, aten.linalg_vector_norm.default: _reduce_at(2, 3),
    aten.repeat_interleave.self_int: _repeat_interleave, aten.expand_as.default: _expand_as,
    aten.topk.default: _topk, aten.pad.default: _pad, aten.constant_pad_nd.default: _pad,
}


def _register_fxforge_rules() -> None:
    """Rules for fxforge's own ops that passes may emit before pruning runs."""
    try:
        _RULES[torch.ops.fxforge.rms_norm.default] = _rms_norm
    except (AttributeError, RuntimeError):  # op library not loaded
        pass


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class GroupMember:
    """One parameter dimension in a group: unit u of the group owns `indices[u]` of that dim."""

    name: str
    dim: int
    indices: torch.Tensor  # (units, per_unit) long

    @property
    def per_unit(self) -> int:
        return int(self.indices.shape[1])

    def slices(self, unit: int) -> list[int]:
        return self.indices[unit].tolist()


@dataclass
class Group:
    """A set of parameter slices that must be removed together, `units` times over.

    kind: "heads" (whole attention heads; with GQA whole key/value groups), "query_heads"
    (one query head inside every key/value group), "head_dim", "channels" (hidden units of an
    MLP, conv filters), "hidden" (the residual stream: every layer reads it) or "other".
    blocked: why the group may not be pruned (None if it may).
    """

    id: int
    units: int
    members: list[GroupMember]
    kind: str = "other"
    blocked: str | None = None
    consumers: list[str] = field(default_factory=list)  # linear/conv weights reading the channels
    producers: list[str] = field(default_factory=list)  # linear/conv weights writing them

    @property
    def prunable(self) -> bool:
        return self.blocked is None

    params_per_unit: int = 0  # parameters removed with one unit (all member slices)
    leaf: int = -1  # the atomic axis (internal id) this group is

    @property
    def module_path(self) -> str:
        names = self.consumers or self.producers or [m.name for m in self.members]
        return names[0].rsplit(".", 1)[0]

    def member(self, name: str) -> GroupMember | None:
        return next((m for m in self.members if m.name == name), None)

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"blocked: {self.blocked}"
        lines = [f"group {self.id} [{self.kind}] {self.units} units ({state})"]
        lines += [f"  {m.name}[dim {m.dim}] {m.per_unit} per unit" for m in self.members]
        return "\n".join(lines)


class CouplingAnalysis:
    """The result of analyzing one graph: axes per (node, dim), groups, and the networkx graph."""

    def __init__(self, gm: GraphModule):
        _register_fxforge_rules()
        self.gm = gm
        self._an = _Analyzer(gm).run()
        self.ax = self._an.ax
        self.dims = self._an.dims
        self.params = self._an.params
        self.slice_parts = self._an.slice_parts
        self.graph = self._build_graph()
        self.groups = self._build_groups()

    # ---- the networkx view
    def _build_graph(self) -> nx.Graph:
        """Nodes (fx node name, dim, factor); edges join triples built from the same atomic axis."""
        g = nx.Graph()
        first: dict[int, tuple[str, int, int]] = {}
        for node, d in self.dims.items():
            if d is None or (d and not isinstance(d[0], int)):
                continue
            for dim, axis in enumerate(d):
                for factor, leaf in enumerate(self.ax.leaves(axis)):
                    key = (node.name, dim, factor)
                    g.add_node(key, axis=leaf, size=self.ax.size[leaf])
                    if leaf in first:
                        g.add_edge(first[leaf], key)
                    else:
                        first[leaf] = key
        return g

    def _build_groups(self) -> list[Group]:
        tensors = {name: t for name, t in _named_tensors(self.gm).items()}
        by_leaf: dict[int, list[GroupMember]] = {}
        activations: set[int] = set()
        for node, d in self.dims.items():
            if node.op in ("get_attr", "placeholder") or d is None:
                continue
            for axis in _flatten_dims(d):
                activations.update(self.ax.leaves(axis))
        for name, d in self.params.items():
            for dim, axis in enumerate(d):
                coords = self.ax.coords(axis)
                for leaf in self.ax.leaves(axis):
                    if not _is_static(self.ax.size[leaf]):
                        continue
                    units = self.ax.size[leaf]
                    rows: list[list[int]] = [[] for _ in range(units)]
                    for index, coord in enumerate(coords):
                        for l, c in coord:
                            if l == leaf:
                                rows[c].append(index)
                    by_leaf.setdefault(leaf, []).append(
                        GroupMember(name, dim, torch.tensor(rows, dtype=torch.long)))
        widths = self._width_dependent()
        groups = []
        for leaf, members in by_leaf.items():
            if leaf not in activations or self.ax.size[leaf] <= 1:
                continue  # a parameter-only dim (a conv kernel's spatial size): not a channel
            group = Group(id=len(groups), units=self.ax.size[leaf], members=members,
                          blocked=self.ax.reason(leaf))
            group.params_per_unit = sum(
                m.per_unit * (tensors[m.name].numel() // tensors[m.name].shape[m.dim]) for m in members)
            self._classify(group, leaf)
            group.leaf = leaf
            if group.blocked is None and group.kind in ("heads", "query_heads", "channels"):
                group.blocked = widths.get(leaf)
            groups.append(group)
        return groups

    def _width_dependent(self) -> dict[int, str]:
        """Leaf -> why removing its units is not zeroing them: a reduction other than a sum or
        a mean (the surgery rescales those, `mean_rescales`) runs over it — a LayerNorm or an
        rms_norm op over all heads, a softmax or a max over the channels."""
        out: dict[int, str] = {}
        for node, axes, kind in self._an.reductions:
            if kind == "mean":
                continue
            for axis in axes:
                for leaf in self.ax.leaves(axis):
                    out.setdefault(leaf, f"node '{node.name}' normalizes or reduces over these "
                                         f"channels (its result depends on their count)")
        return out

    def mean_rescales(self, pruned: dict[int, set[int]]) -> list[tuple[Node, Any]]:
        """(mean node, new/old width) for every mean over a dim that `pruned` shrinks: scaling
        its result by new/old keeps it sum/old, what it computed with the units zeroed."""
        out = []
        for node, axes, kind in self._an.reductions:
            if kind != "mean" or not any(self.touched(axis, pruned) for axis in axes):
                continue
            ratio = 1.0
            for axis in axes:
                if self.touched(axis, pruned):
                    ratio *= self.new_size(axis, pruned) / self.ax.size[self.ax.find(axis)]
            out.append((node, ratio))
        return out

    def _classify(self, group: Group, leaf: int) -> None:
        weight_users = _weight_roles(self.gm)
        for m in group.members:
            role = weight_users.get(m.name)
            if role is None:
                continue
            if m.dim == 1:
                group.consumers.append(m.name)
            elif m.dim == 0:
                group.producers.append(m.name)
        # a norm's scale (1-D, read by no linear, one entry per channel the linears read) marks
        # the residual stream; a linear's bias is 1-D too but belongs to its producer (BLOOM's
        # heads, coupled across layers by one ALiBi bias, have biased projections), and a 1-D
        # parameter with one entry per head (Doge's per-head A) is no norm: both stay heads
        biases = _bias_names(self.gm)
        widest = max((m.per_unit for m in group.members if m.name in weight_users), default=1)
        norm_like = any(weight_users.get(m.name) is None and m.name not in biases and m.dim == 0 and
                        len(self.params[m.name]) == 1 and m.per_unit == widest for m in group.members)
        if len(group.consumers) > 1 and norm_like or len(set(group.consumers)) > 2:
            group.kind = "hidden"
            return
        ref = next((m for m in group.members if m.name in group.consumers and m.dim == 1), None) or \
            next((m for m in group.members if m.name in group.producers and m.dim == 0), None)
        if ref is None:
            return
        rows = ref.indices[0].tolist()
        runs = [len(list(run)) for _, run in itertools.groupby(
            (i - k for k, i in enumerate(rows)))]  # lengths of contiguous index runs
        if ref.per_unit == 1:
            group.kind = "channels"  # one hidden unit / filter per unit
        elif len(runs) == 1:
            group.kind = "heads"  # one contiguous block: a head (or a whole GQA key/value group)
        elif min(runs) > 1:
            group.kind = "query_heads"  # a block in every GQA group: one query head per group
        else:
            group.kind = "head_dim"  # one index in every head

    # ---- queries used by the surgery
    def new_size(self, axis: int, pruned: dict[int, set[int]]) -> int:
        """The size of a dim (given by its axis) after removing `pruned` units of each leaf."""
        return len(self.keep_indices(axis, pruned))

    def keep_indices(self, axis: int, pruned: dict[int, set[int]]) -> list[int]:
        leaves = set(self.ax.leaves(axis))
        if not leaves & pruned.keys():
            return list(range(self.ax.size[self.ax.find(axis)])) if _is_static(
                self.ax.size[self.ax.find(axis)]) else []
        return [i for i, coord in enumerate(self.ax.coords(axis))
                if not any(c in pruned.get(l, ()) for l, c in coord)]

    def touched(self, axis: int, pruned: dict[int, set[int]]) -> bool:
        return bool(set(self.ax.leaves(axis)) & {k for k, v in pruned.items() if v})


def _named_tensors(gm: GraphModule) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False))}


_WEIGHTED = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.convolution.default}


def _weight_roles(gm: GraphModule) -> dict[str, str]:
    """Weight name -> "linear"/"conv" for the weights of linear and conv nodes."""
    roles = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHTED:
            w = node.args[1]
            if isinstance(w, Node) and w.op == "get_attr":
                roles[w.target] = "linear" if node.target == aten.linear.default else "conv"
    return roles


def _bias_names(gm: GraphModule) -> set[str]:
    """Names of the parameters read as the bias of a linear or conv node."""
    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHTED:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if isinstance(bias, Node) and bias.op == "get_attr":
                names.add(bias.target)
    return names


def analyze(gm: GraphModule) -> CouplingAnalysis:
    """Run the coupling analysis on `gm` (shape metadata must be present: run `finalize` first)."""
    return CouplingAnalysis(gm)


def groups(gm: GraphModule, include_blocked: bool = False) -> list[Group]:
    """The pruning groups of `gm`: parameter slices that must be removed together.

        >>> for g in groups(gm):
        ...     print(g.describe())
        group 3 [heads] 2 units (prunable)
          model.layers.0.self_attn.q_proj.weight[dim 0] 32 per unit
          ...

    Blocked groups (coupling unproven, or reaching the graph's inputs/outputs) are left out
    unless `include_blocked`; each carries the reason in `blocked`.
    """
    found = analyze(gm).groups
    return found if include_blocked else [g for g in found if g.prunable]


__all__ = ["CouplingAnalysis", "Group", "GroupMember", "analyze", "groups"]
