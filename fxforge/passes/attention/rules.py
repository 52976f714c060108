"""The recognizers of pass `fuse_attention`: small rule tables over aten nodes.

Each table is a list of rows `((targets...), handler)`; a handler looks at one node and
returns what it recognized or None. `apply_rules(table, node)` returns the first hit. The
matcher in `fuse_attention.py` strings the tables together along the path

    softmax(mask_rules(scale_rules(matmul(scale_rules(Q), key_rules(scale_rules(K)))))) @ V

and `repeat_kv_rules` peel grouped-query repetition off K and V. Nothing here edits the
graph: rows that need a new node (a permute, a negated mask) return a `Build` recipe that
the pass materializes only once the whole subgraph has matched, so a failed match never
leaves a half-rewritten graph behind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

Handler = Callable[[Node], Any]
RuleTable = list[tuple[tuple[Any, ...], Handler]]


@dataclass(frozen=True)
class Build:
    """A node to create at rewrite time: `target(*args, **kwargs)`; args may hold Builds."""

    target: Any
    args: tuple
    kwargs: tuple[tuple[str, Any], ...] = ()


Value = Node | Build


def apply_rules(table: RuleTable, node: object) -> Any:
    """The result of the first row of `table` whose target and handler match `node`, else None."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    for targets, handler in table:
        if node.target in targets:
            found = handler(node)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------- shape helpers


def fake(node: object) -> torch.Tensor | None:
    """The fake tensor recorded for `node` by tracing, if any."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """True when two (possibly symbolic) sizes are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # sizes from different shape environments: cannot prove anything
        return False


def broadcasts_to(shape: Sequence[Any], target: Sequence[Any]) -> bool:
    """True when `shape` provably broadcasts to `target` without enlarging it."""
    if len(shape) > len(target):
        return False
    for size, want in zip(reversed(list(shape)), reversed(list(target))):
        if not (same_size(size, 1) or same_size(size, want)):
            return False
    return True


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _scalar(value: object) -> float | None:
    """A Python number as float; a node is never a constant scale (it could change at run time)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --------------------------------------------------------------------------- value identities


def _same_dtype_cast(node: Node) -> Node | None:
    # x.to(x.dtype) -> x
    src = node.args[0]
    before, after = fake(src), fake(node)
    if before is None or after is None or before.dtype != after.dtype:
        return None
    return src


def _copy(node: Node) -> Node | None:
    # x.contiguous() -> x;  x.clone() -> x
    return node.args[0] if isinstance(node.args[0], Node) else None


def _full_slice(node: Node) -> Node | None:
    # x[:, :, 0:end] with end past the size -> x
    src, start = node.args[0], _arg(node, 2, "start", 0)
    step = _arg(node, 4, "step", 1)
    before, after = fake(src), fake(node)
    if start not in (0, None) or step != 1 or before is None or after is None or before.dim() != after.dim():
        return None
    return src if all(same_size(a, b) for a, b in zip(before.shape, after.shape)) else None


def _same_shape_view(node: Node) -> Node | None:
    # x.view(x.shape) -> x   (Falcon re-views its scores and probabilities to the shape they have)
    src = node.args[0]
    before, after = fake(src), fake(node)
    if before is None or after is None or before.dim() != after.dim():
        return None
    return src if all(same_size(a, b) for a, b in zip(before.shape, after.shape)) else None


IDENTITY_RULES: RuleTable = [
    ((aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device), _same_dtype_cast),
    ((aten.contiguous.default, aten.clone.default, aten.alias.default), _copy),
    ((aten.slice.Tensor,), _full_slice),
    ((aten.view.default, aten.reshape.default, aten._unsafe_view.default), _same_shape_view),
]


def skip_identities(node: object, passed: list[Node] | None = None) -> object:
    """Follow value-preserving nodes (same-dtype casts, copies) up to their source.

    The nodes walked through are appended to `passed` when it is given.
    """
    while True:
        source = apply_rules(IDENTITY_RULES, node)
        if source is None:
            return node
        if passed is not None:
            passed.append(node)
        node = source


# --------------------------------------------------------------------------- scales


def _scale_mul(node: Node) -> tuple[Node, float] | None:
    # x * c -> (x, c);  c * x -> (x, c)
    a, b = node.args[:2]
    if isinstance(a, Node) and _scalar(b) is not None:
        return a, _scalar(b)
    if isinstance(b, Node) and _scalar(a) is not None:
        return b, _scalar(a)
    return None


def _scale_div(node: Node) -> tuple[Node, float] | None:
    # x / c -> (x, 1/c)
    a, b = node.args[:2]
    c = _scalar(b)
    if not isinstance(a, Node) or c is None or c == 0.0 or node.kwargs.get("rounding_mode") is not None:
        return None
    return a, 1.0 / c


# In-place forms (`scores /= sqrt(d)` in Falcon) are the same value: the matcher's single-use
# check guarantees no other reader sees the mutated input.
SCALE_RULES: RuleTable = [
    ((aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar), _scale_mul),
    ((aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar), _scale_div),
]


def peel_scales(node: object) -> tuple[object, float, list[Node]]:
    """(source, product of constant factors, nodes walked through) for x * c1 / c2 ... ."""
    factor, passed = 1.0, []
    node = skip_identities(node, passed)
    while True:
        found = apply_rules(SCALE_RULES, node)
        if found is None:
            return node, factor, passed
        passed.append(node)
        node, c = found
        factor *= c
        node = skip_identities(node, passed)


# --------------------------------------------------------------------------- softmax


def _softmax_last_dim(node: Node) -> Node | None:
    # softmax(x, -1) -> x;  softmax(x, -1, dtype=x.dtype) -> x;  _softmax(x, -1, False) -> x
    x = node.args[0]
    val = fake(x)
    if val is None or val.dim() != 4 or int(node.args[1]) % 4 != 3:
        return None
    if node.target == aten._softmax.default and node.args[2]:
        return None  # half_to_float changes the dtype: not the op's numerics
    dtype = _arg(node, 2, "dtype") if node.target == aten.softmax.int else None
    if dtype is not None and dtype != val.dtype:
        return None
    return x


SOFTMAX_RULES: RuleTable = [
    ((aten.softmax.int, aten._softmax.default, aten._safe_softmax.default), _softmax_last_dim),
]
SOFTMAX_TARGETS = tuple(t for targets, _ in SOFTMAX_RULES for t in targets)


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class MaskMatch:
    """The scores before masking and the mask in the op's form (bool True = attend, or additive)."""

    scores: Node
    mask: Value
    node: Node  # the masking node itself (its only user must be the softmax)


def _additive(node: Node) -> list[MaskMatch]:
    # S + M -> (S, additive M);  M + S -> (S, additive M)
    a, b = node.args[:2]
    if node.kwargs.get("alpha", 1) != 1 or not (isinstance(a, Node) and isinstance(b, Node)):
        return []
    return [MaskMatch(a, b, node), MaskMatch(b, a, node)]


def _fill_value(value: object) -> float | None:
    """The negative constant a masked score is set to: a number, or a 0-d full/scalar_tensor node."""
    if isinstance(value, Node):
        if value.target == aten.full.default and list(value.args[0]) == []:
            value = value.args[1]
        elif value.target == aten.scalar_tensor.default:
            value = value.args[0]
        else:
            return None
    c = _scalar(value)
    return c if c is not None and c < 0 else None


def _where_fill(node: Node) -> list[MaskMatch]:
    # where(b, S, -inf) -> (S, bool b);  where(b, S, c<0) -> (S, additive where(b, 0, c))
    cond, scores, other = node.args[:3]
    fill = _fill_value(other)
    if fill is None or not isinstance(scores, Node) or not _is_bool(cond):
        return []
    if fill == -math.inf:
        return [MaskMatch(scores, cond, node)]
    return [MaskMatch(scores, _additive_from_hidden(Build(aten.logical_not.default, (cond,)), fill, scores), node)]


def _masked_fill(node: Node) -> list[MaskMatch]:
    # S.masked_fill(m, -inf) -> (S, bool ~m);  S.masked_fill(m, c<0) -> (S, additive where(m, c, 0))
    scores, hidden, value = node.args[:3]
    fill = _fill_value(value)
    if fill is None or not isinstance(scores, Node) or not _is_bool(hidden):
        return []
    if fill == -math.inf:
        return [MaskMatch(scores, Build(aten.logical_not.default, (hidden,)), node)]
    return [MaskMatch(scores, _additive_from_hidden(hidden, fill, scores), node)]


def _is_bool(node: object) -> bool:
    val = fake(node)
    return val is not None and val.dtype == torch.bool


def _additive_from_hidden(hidden: Value, fill: float, scores: Node) -> Build:
    # hidden positions get `fill`, the others 0, in the scores' dtype: the mask stays mask-shaped.
    zeros = Build(aten.zeros_like.default, (hidden,), (("dtype", fake(scores).dtype),))
    return Build(aten.masked_fill.Scalar, (zeros, hidden, fill))


MASK_RULES: RuleTable = [
    ((aten.add.Tensor,), _additive),
    ((aten.where.self, aten.where.ScalarOther), _where_fill),
    ((aten.masked_fill.Scalar, aten.masked_fill.Tensor), _masked_fill),
]


def mask_candidates(node: Node) -> list[MaskMatch]:
    """Every way of reading `node` (the softmax input) as scores plus a mask; [] if it is no mask."""
    for targets, handler in MASK_RULES:
        if isinstance(node, Node) and node.op == "call_function" and node.target in targets:
            return handler(node)
    return []


# --------------------------------------------------------------------------- K transposed


def _transpose_last_two(node: Node) -> Node | None:
    # Kᵀ = K.transpose(-2, -1) -> K
    src = node.args[0]
    val = fake(src)
    if val is None or val.dim() != 4 or sorted(int(d) % 4 for d in node.args[1:3]) != [2, 3]:
        return None
    return src


def _permute(node: Node) -> Build | None:
    # Kᵀ = x.permute(p) -> K = x.permute(p with its last two entries swapped)
    src, perm = node.args[:2]
    if len(perm) != 4:
        return None
    perm = [int(p) % 4 for p in perm]
    return Build(aten.permute.default, (src, [perm[0], perm[1], perm[3], perm[2]]))


KEY_TRANSPOSE_RULES: RuleTable = [
    ((aten.transpose.int,), _transpose_last_two),
    ((aten.permute.default,), _permute),
]


def untranspose_key(kt: Node) -> Value:
    """K from Kᵀ: strip the transpose that made it, or build K = Kᵀ.transpose(-2, -1)."""
    found = apply_rules(KEY_TRANSPOSE_RULES, kt)
    if found is not None:
        return found
    return Build(aten.transpose.int, (kt, -2, -1))  # any other layout: transpose it back


# --------------------------------------------------------------------------- repeat_kv (GQA)


def _expand_reshape(node: Node) -> tuple[Node, int] | None:
    # reshape(expand(k[:, :, None], (B, Hkv, g, L, D)), (B, Hkv·g, L, D)) -> (k, g)
    expanded = skip_identities(node.args[0])
    if not (isinstance(expanded, Node) and expanded.target == aten.expand.default):
        return None
    unsqueezed = skip_identities(expanded.args[0])
    if not (isinstance(unsqueezed, Node) and unsqueezed.target == aten.unsqueeze.default
            and int(unsqueezed.args[1]) in (2, -3)):
        return None
    kv = unsqueezed.args[0]
    kv_val, exp_val, out_val = fake(kv), fake(expanded), fake(node)
    if kv_val is None or exp_val is None or out_val is None or kv_val.dim() != 4 or out_val.dim() != 4:
        return None
    groups = exp_val.shape[2]
    if not isinstance(groups, int):
        return None
    b, h, length, d = kv_val.shape
    expected_expand = (b, h, groups, length, d)
    expected_out = (b, h * groups, length, d)
    if not all(same_size(x, y) for x, y in zip(exp_val.shape, expected_expand)):
        return None
    if not all(same_size(x, y) for x, y in zip(out_val.shape, expected_out)):
        return None
    return kv, groups


def _repeat_interleave(node: Node) -> tuple[Node, int] | None:
    # k.repeat_interleave(g, dim=1) -> (k, g)
    src, repeats = node.args[0], _arg(node, 1, "repeats")
    dim = _arg(node, 2, "dim")
    val = fake(src)
    if not isinstance(repeats, int) or val is None or val.dim() != 4 or dim is None or int(dim) % 4 != 1:
        return None
    return src, repeats


REPEAT_KV_RULES: RuleTable = [
    ((aten.reshape.default, aten.view.default, aten._unsafe_view.default), _expand_reshape),
    ((aten.repeat_interleave.self_int,), _repeat_interleave),
]


def peel_repeat_kv(node: Value) -> tuple[Value, int]:
    """(k, groups) when `node` repeats each key/value head `groups` times, else (node, 1)."""
    if isinstance(node, Build):
        return node, 1
    found = apply_rules(REPEAT_KV_RULES, skip_identities(node))
    return found if found is not None else (node, 1)


def only_user(node: Node) -> Node | None:
    """The single user of `node`, or None when it has none or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


__all__ = [
    "Build", "Value", "RuleTable", "apply_rules", "fake", "same_size", "broadcasts_to",
    "skip_identities", "peel_scales", "SOFTMAX_RULES", "SOFTMAX_TARGETS", "MaskMatch",
    "mask_candidates", "untranspose_key", "peel_repeat_kv", "only_user",
]
