"""One way to match and rewrite subgraphs: whole-pattern rules with named captures.

A `Rule` is one row: a `pattern` (the whole subgraph, written top-down from its root), a
`check` on what the pattern captured that says why a candidate is refused, and a `rewrite`:

    x32 = Capture("x32")
    RULE = Rule(
        "rms_norm",
        pattern=Op(aten.mul.Tensor, Attr("weight"), Casts(Op(aten.mul.Tensor, x32, ...)), commutative=True),
        check=lambda m: None if m["eps"] > 0 else "eps must be positive",
        rewrite=lambda gm, m: replace_root(gm, m, fxforge_op, (m["x32"], m["weight"], m["eps"])),
    )
    result = apply_rules(gm, [RULE])        # result.rewrites, result.refused [(node, reason)]

`match(pattern, node)` returns a `Match` (root node + captures by name) or a `NoMatch` whose
`reason` names the first place the candidate differs from the pattern.

Why not torch.fx's own matcher (`torch.fx.passes.utils.matcher_utils.SubgraphMatcher`, which
`subgraph_rewriter` uses): tried on our aten-level graphs, it matches one fixed spelling, and
ours vary in ways it cannot say. Casts come and go with the dtype (an fp32 RMSNorm has
`to(float32)` nodes or none, a bf16 one two), so every optional cast doubles the patterns;
`mul` operands come in either order (again doubling); `ignore_literals` is all or nothing,
so it cannot capture `eps` while still requiring `mean` over `[-1]` and `pow(·, 2)`; it says
nothing about why a candidate failed; and it requires every interior node to be used only
inside the match, where our passes decide per node (an RMSNorm's `rsqrt` must be private, its
`pow` need not). `Casts`, `commutative=True`, `Capture(kind=...)`, `single_use=True` and
`NoMatch.reason` are those four things, in about as many lines as the patterns would have taken.

Two additions for rules that are one piece of a larger match (the attention family's
recognizers in `fxforge/passes/attention/rules.py`):

- `Through(inner, step)`: `inner` behind any number of nodes that `step` sees through (a
  same-dtype cast, a same-shape view, a copy...). `Casts` is the fixed case of this; attention's
  "value-keeping" nodes are decided by rules that read fake-tensor metadata, so the step is
  a function (usually `lambda v: read(RULES, v)`).
- `read(rules, node)`: a rule may *describe* its rewrite instead of performing it — its
  `rewrite` returns a value (a source node, a scale factor, a recipe of nodes to build) and
  leaves the graph alone. `read` returns that description from the first rule that matches
  and passes its check, else a `NoMatch` with every rule's reason. A caller assembling a
  larger match (softmax, mask, Q·Kᵀ, P·V) rewrites only once the whole of it has matched, so
  a failed larger match never leaves a half-rewritten graph behind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import replace_with_call

aten = torch.ops.aten

# Casts that keep the value of a tensor the way a pattern cares about (dtype moves only).
CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout})


class NoMatch:
    """A failed match; `reason` says where and how the candidate differs. Falsy."""

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"NoMatch({self.reason!r})"


@dataclass
class Match:
    """A successful match: the root node and every capture by name (`match["eps"]`)."""

    root: Node
    captures: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]


class _Fail(Exception):
    """Why a pattern did not bind; `depth` counts the Op nodes that did match on the way down,
    so of two failed operand orders the one that got further is reported."""

    def __init__(self, reason: str, depth: int = 0):
        super().__init__(reason)
        self.depth = depth


class Pattern:
    """A pattern for one value of the graph (a node, or a literal argument)."""

    def bind(self, value: Any, captures: dict[str, Any]) -> None:  # raises _Fail(reason)
        raise NotImplementedError


def _show(value: Any) -> str:
    if isinstance(value, Node):
        return f"`{value.name}`" + (f" ({value.target})" if value.op == "call_function" else f" ({value.op})")
    return repr(value)


@dataclass
class Capture(Pattern):
    """Any value, captured under `name`; the same name twice must be the very same value.

    `kind`: a type (e.g. float) the value must be an instance of, or a predicate."""

    name: str
    kind: type | Callable[[Any], bool] | None = None
    describe: str = ""  # what `kind` accepts, for the failure reason

    def bind(self, value: Any, captures: dict[str, Any]) -> None:
        if self.kind is not None:
            ok = isinstance(value, self.kind) if isinstance(self.kind, type) else self.kind(value)
            if not ok:
                what = self.describe or getattr(self.kind, "__name__", "accepted")
                raise _Fail(f"{self.name}: {_show(value)} is not {what}")
        if self.name in captures and captures[self.name] is not value:
            raise _Fail(f"{self.name}: {_show(value)} is not the {_show(captures[self.name])} captured before")
        captures[self.name] = value


def Attr(name: str) -> Capture:  # noqa: N802 (reads as a pattern constructor)
    """A get_attr node (a parameter or buffer), captured under `name`."""
    return Capture(name, lambda v: isinstance(v, Node) and v.op == "get_attr", "a parameter or buffer (get_attr)")


@dataclass
class Lit(Pattern):
    """A literal argument equal to `value` (lists and tuples compare as sequences)."""

    value: Any

    def bind(self, value: Any, captures: dict[str, Any]) -> None:
        norm = list(value) if isinstance(value, (list, tuple)) else value
        want = list(self.value) if isinstance(self.value, (list, tuple)) else self.value
        if isinstance(value, Node) or norm != want:
            raise _Fail(f"expected {self.value!r}, got {_show(value)}")


def _as_pattern(p: Any) -> Pattern:
    return p if isinstance(p, Pattern) else Lit(p)


@dataclass(init=False)
class Op(Pattern):
    """A call_function node of one of `targets` whose arguments match `args` in order.

    Arguments the node leaves out are read from its kwargs by schema name, then from the
    schema's defaults. `commutative`: two-argument ops may match their arguments swapped.
    `single_use`: the node must have exactly one user (the pattern node above it), so
    rewriting the root leaves no half of the subgraph behind. `name` captures the node itself.
    """

    targets: frozenset
    args: tuple[Pattern, ...]
    commutative: bool = False
    single_use: bool = False
    name: str | None = None

    def __init__(self, targets: Any, *args: Any, commutative: bool = False, single_use: bool = False,
                 name: str | None = None):
        self.targets = frozenset(targets) if isinstance(targets, (set, frozenset, list, tuple)) else frozenset({targets})
        self.args = tuple(_as_pattern(a) for a in args)
        self.commutative, self.single_use, self.name = commutative, single_use, name

    def bind(self, value: Any, captures: dict[str, Any]) -> None:
        if not (isinstance(value, Node) and value.op == "call_function" and value.target in self.targets):
            wanted = " or ".join(sorted(str(t) for t in self.targets))
            raise _Fail(f"expected {wanted}, got {_show(value)}")
        if self.single_use and len(value.users) != 1:
            raise _Fail(f"{_show(value)} has {len(value.users)} users; the pattern needs it private")
        actual = [_argument(value, i) for i in range(len(self.args))]
        orders = [actual, actual[::-1]] if self.commutative and len(actual) == 2 else [actual]
        failure: _Fail | None = None
        for order in orders:
            trial = dict(captures)
            try:
                for pattern, arg in zip(self.args, order):
                    pattern.bind(arg, trial)
            except _Fail as error:
                if failure is None or error.depth + 1 > failure.depth:
                    failure = _Fail(f"{_show(value)}: {error}", error.depth + 1)
                continue
            captures.clear()
            captures.update(trial)
            if self.name:
                Capture(self.name).bind(value, captures)
            return
        try:
            raise failure
        finally:
            # The raised error's traceback holds this frame; dropping the frame's own reference
            # to the error breaks the cycle, so the graph the frame holds is freed by reference
            # counting (tests/passes/test_copy_on_write.py runs pipelines with the GC off).
            failure = None


@dataclass
class Casts(Pattern):
    """`inner` behind zero or more value-keeping casts (`CASTS`), each with a single user."""

    inner: Any

    def bind(self, value: Any, captures: dict[str, Any]) -> None:
        while isinstance(value, Node) and value.op == "call_function" and value.target in CASTS:
            if len(value.users) != 1:
                raise _Fail(f"cast {_show(value)} has {len(value.users)} users; the pattern needs it private")
            value = value.args[0]
        _as_pattern(self.inner).bind(value, captures)


@dataclass
class Through(Pattern):
    """`inner` behind zero or more nodes that `step` sees through.

    `step(value)` returns the value a node stands for (its source), or None / a `NoMatch`
    when `value` is not one to look through. Unlike `Casts`, the nodes passed need not be
    private; a pattern that will erase them checks their users itself."""

    inner: Any
    step: Callable[[Any], Any]

    def bind(self, value: Any, captures: dict[str, Any]) -> None:
        while True:
            source = self.step(value)
            if source is None or isinstance(source, NoMatch):
                break
            value = source
        _as_pattern(self.inner).bind(value, captures)


def strip_casts(value: Any) -> Any:
    """`value` without the value-keeping casts in front of it."""
    while isinstance(value, Node) and value.op == "call_function" and value.target in CASTS:
        value = value.args[0]
    return value


_MISSING = object()


def _argument(node: Node, index: int) -> Any:
    """Argument `index` of `node`: positional, else by schema name from kwargs, else the default."""
    if index < len(node.args):
        return node.args[index]
    schema = getattr(node.target, "_schema", None)
    if schema is None or index >= len(schema.arguments):
        return _MISSING
    argument = schema.arguments[index]
    if argument.name in node.kwargs:
        return node.kwargs[argument.name]
    return argument.default_value if argument.has_default_value() else _MISSING


def match(pattern: Pattern, node: Node) -> Match | NoMatch:
    """Match `pattern` with its root at `node`."""
    captures: dict[str, Any] = {}
    try:
        pattern.bind(node, captures)
    except _Fail as error:
        return NoMatch(str(error))
    return Match(node, captures)


Check = Callable[[Match], "str | None"]
Rewrite = Callable[[GraphModule, Match], Any]


@dataclass(frozen=True)
class Rule:
    """One row: the whole `pattern`, a `check` returning why a match is refused (None: accept),
    and the `rewrite` that replaces it (return False when it declined after all)."""

    name: str
    pattern: Op
    rewrite: Rewrite
    check: Check | None = None


@dataclass
class RuleResult:
    rewrites: int = 0
    refused: list[tuple[Node, str]] = field(default_factory=list)  # matched, but the check said no


def apply_rules(gm: GraphModule, rules: Sequence[Rule], nodes: Iterable[Node] | None = None) -> RuleResult:
    """Try `rules` in order at each call_function node (graph order, nodes erased by an
    earlier rewrite skipped); the first rule that matches and passes its check rewrites."""
    result = RuleResult()
    roots = {t for rule in rules for t in rule.pattern.targets}
    for node in list(gm.graph.nodes if nodes is None else nodes):
        if getattr(node, "_erased", False) or node.op != "call_function" or node.target not in roots:
            continue
        for rule in rules:
            if node.target not in rule.pattern.targets:
                continue
            found = match(rule.pattern, node)
            if not found:
                continue
            reason = rule.check(found) if rule.check else None
            if reason:
                result.refused.append((node, f"{rule.name}: {reason}"))
                continue
            if rule.rewrite(gm, found) is not False:
                result.rewrites += 1
                break
    return result


def read(rules: Sequence[Rule], value: Any) -> Any:
    """What the first of `rules` that matches `value` and passes its check reads it as.

    For rules whose `rewrite` describes a replacement instead of performing it (see the module
    docstring): returns `rule.rewrite(gm, match)` of the first such rule, else a `NoMatch`
    naming every rule tried and why it failed. The graph is not changed here."""
    reasons: list[str] = []
    for rule in rules:
        found = match(rule.pattern, value) if isinstance(value, Node) else NoMatch(f"{_show(value)} is no node")
        if not found:
            reasons.append(f"{rule.name}: {found.reason}")
            continue
        refusal = rule.check(found) if rule.check else None
        if refusal:
            reasons.append(f"{rule.name}: {refusal}")
            continue
        return rule.rewrite(value.graph.owning_module, found)
    return NoMatch("; ".join(reasons) or "no rules")


def replace_root(gm: GraphModule, found: Match, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
    """Replace the matched root with `target(*args, **kwargs)`; the rest of the match that is
    no longer used is erased (see `fxforge.ir.graph.replace_with_call`)."""
    return replace_with_call(gm, found.root, target, args, kwargs)
