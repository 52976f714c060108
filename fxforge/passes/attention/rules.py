"""The recognizers of pass `fuse_attention`: `Rule` rows on `fxforge.ir.match`.

Each recognizer is a table of rows `Rule(name, pattern, rewrite, check)`: the `pattern` is the
whole piece of graph with named captures, the `check` (on fake-tensor metadata the pattern
cannot see) returns why a candidate is refused, and the `rewrite` *describes* the piece —
the value it stands for, a scale factor, or a recipe — without editing the graph.
`read(TABLE, node)` (from `fxforge.ir.match`) returns the first row's description, or a
`NoMatch` saying why every row failed. The matcher in `fuse_attention.py` strings the tables
together along the path

    softmax(MASK_RULES(SCALE_RULES(matmul(SCALE_RULES(Q), KEY_TRANSPOSE_RULES(SCALE_RULES(K)))))) @ V

with `IDENTITY_RULES` looked through everywhere and `REPEAT_KV_RULES` peeling grouped-query
repetition off K and V. Rows that need a new node (a permute, a negated mask) describe it as
a `Build` recipe that the pass materializes only once the whole subgraph has matched, so a
failed match never leaves a half-rewritten graph behind.

To add a spelling: add a row to the table of the piece it spells differently.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxforge.ir.match import CASTS, Capture, Lit, Match, NoMatch, Op, Rule, Through, read

aten = torch.ops.aten


@dataclass(frozen=True)
class Build:
    """A node to create at rewrite time: `target(*args, **kwargs)`; args may hold Builds."""

    target: Any
    args: tuple
    kwargs: tuple[tuple[str, Any], ...] = ()


Value = Node | Build


def _found(result: Any) -> Any:
    """`read`'s result, or None when it is a NoMatch (the callers branch on None)."""
    return None if isinstance(result, NoMatch) else result


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


def _scalar(value: object) -> float | None:
    """A Python number as float; a node is never a constant scale (it could change at run time)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _same_shape(a: object, b: object) -> str | None:
    """None when `a` and `b` provably have one shape, else why not."""
    before, after = fake(a), fake(b)
    if before is None or after is None:
        return "no shape metadata"
    if before.dim() != after.dim() or not all(same_size(x, y) for x, y in zip(before.shape, after.shape)):
        return f"shape {tuple(after.shape)} is not provably {tuple(before.shape)}"
    return None


def _source(_gm: Any, found: Match) -> Any:
    return found["src"]


_NODE = Capture("src", Node, "a node")


# --------------------------------------------------------------------------- value identities


def _dtype_kept(found: Match) -> str | None:
    before, after = fake(found["src"]), fake(found.root)
    if before is None or after is None:
        return "no dtype metadata"
    return None if before.dtype == after.dtype else f"casts {before.dtype} to {after.dtype}"


def _slice_keeps_all(found: Match) -> str | None:
    return None if found["start"] in (0, None) else f"starts at {found['start']}"


IDENTITY_RULES: list[Rule] = [
    # x.to(x.dtype) -> x
    Rule("same_dtype_cast", Op((aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device),
                               Capture("src")), _source, _dtype_kept),
    # x.contiguous() -> x;  x.clone() -> x
    Rule("copy", Op((aten.contiguous.default, aten.clone.default, aten.alias.default), _NODE), _source),
    # x[:, :, 0:end] with end past the size -> x
    Rule("full_slice", Op(aten.slice.Tensor, Capture("src"), Capture("dim"), Capture("start"), Capture("end"), Lit(1)),
         _source, lambda m: _slice_keeps_all(m) or _same_shape(m["src"], m.root)),
    # x.view(x.shape) -> x   (Falcon re-views its scores and probabilities to the shape they have)
    Rule("same_shape_view", Op((aten.view.default, aten.reshape.default, aten._unsafe_view.default), Capture("src")),
         _source, lambda m: _same_shape(m["src"], m.root)),
]


def skip_identities(node: object, passed: list[Node] | None = None) -> object:
    """Follow value-preserving nodes (same-dtype casts, copies) up to their source.

    The nodes walked through are appended to `passed` when it is given.
    """
    while True:
        source = _found(read(IDENTITY_RULES, node))
        if source is None:
            return node
        if passed is not None:
            passed.append(node)
        node = source


def _identity_step(value: Any) -> Any:
    """One step of `skip_identities`, for `Through` patterns."""
    return read(IDENTITY_RULES, value)


# --------------------------------------------------------------------------- scales


_CONSTANT = Capture("c", lambda v: _scalar(v) is not None, "a constant number")

# In-place forms (`scores /= sqrt(d)` in Falcon) are the same value: the matcher's single-use
# check guarantees no other reader sees the mutated input.
SCALE_RULES: list[Rule] = [
    # x * c -> (x, c);  c * x -> (x, c)
    Rule("scale_mul", Op((aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar),
                         _NODE, _CONSTANT, commutative=True),
         lambda _gm, m: (m["src"], _scalar(m["c"]))),
    # x / c -> (x, 1/c)
    Rule("scale_div", Op((aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar), _NODE, _CONSTANT),
         lambda _gm, m: (m["src"], 1.0 / _scalar(m["c"])),
         lambda m: ("divides by zero" if _scalar(m["c"]) == 0.0 else
                    "rounds" if m.root.kwargs.get("rounding_mode") is not None else None)),
]


def peel_scales(node: object) -> tuple[object, float, list[Node]]:
    """(source, product of constant factors, nodes walked through) for x * c1 / c2 ... ."""
    factor, passed = 1.0, []
    node = skip_identities(node, passed)
    while True:
        found = _found(read(SCALE_RULES, node))
        if found is None:
            return node, factor, passed
        passed.append(node)
        node, c = found
        factor *= c
        node = skip_identities(node, passed)


# --------------------------------------------------------------------------- softmax-invariant score ops

LOWEST_FLOOR = -1e30  # a floor at or below this only touches masked scores (whose probability is 0)
_ZEROS = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)


def _is_zero(value: object) -> bool:
    return constant_number(value) == 0.0 or (isinstance(value, Node) and value.target in _ZEROS)


def _zero_added(found: Match) -> str | None:
    # x + 0 (DeBERTa adds a zero relative term), zeros + x (GPT-NeoX-Japanese's baddbmm into zeros)
    if not _is_zero(found["zero"]):
        return "adds no zero"
    return _same_shape(found["src"], found.root)


def _floor_lowest(found: Match) -> str | None:
    # max(x, lowest): XGLM clamps masked scores at the dtype's lowest value so -inf never appears
    c = constant_number(found["floor"])
    if c is None or c > LOWEST_FLOOR:
        return "the floor is not far below any unmasked score"
    return _same_shape(found["src"], found.root)


def _row_max_of_itself(found: Match, dim: Any = None) -> str | None:
    # S - max(S, -1, keepdim): the max must be over the key axis of the very tensor it shifts
    dim = found["dim"] if dim is None else dim
    val = fake(found["src"])
    if val is None or found["same"] is not found["src"]:
        return "subtracts the row maximum of another tensor"
    if int(dim) % val.dim() != val.dim() - 1 or not found["keepdim"]:
        return f"subtracts a maximum over dim {dim}, not each key row's"
    return None


def _with_nodes(*names: str):
    """A rewrite giving (source, [the named helper nodes the rewrite also removes])."""
    return lambda _gm, m: (m["src"], [m[n] for n in names])


_ROW_MAX = Op(operator.getitem,
              Op(aten.max.dim, Capture("same"), Capture("dim"), Capture("keepdim"), name="max"), Lit(0), name="item")
SCORE_IDENTITY_RULES: list[Rule] = [
    # S + 0 -> S;  zeros + S -> S
    Rule("add_zero", Op((aten.add.Tensor, aten.add_.Tensor), _NODE, Capture("zero"), Lit(1)), _with_nodes(),
         _zero_added),
    Rule("zero_add", Op((aten.add.Tensor, aten.add_.Tensor), Capture("zero"), _NODE, Lit(1)), _with_nodes(),
         _zero_added),
    # max(S, lowest) -> S: only scores already masked to the far negative are clamped, and their
    # probability is 0 either way (a row with every key masked is no attention the op computes)
    Rule("floor_lowest", Op((aten.max.other, aten.maximum.default, aten.clamp_min.default),
                            _NODE, Capture("floor"), commutative=True),
         _with_nodes(), _floor_lowest),
    # S - max(S, -1, keepdim=True) -> S: a per-row shift, which the softmax cancels (MiMo, GPT-OSS
    # stabilize by hand); the max node goes with the rewrite
    Rule("minus_row_max", Op(aten.sub.Tensor, _NODE, _ROW_MAX, Lit(1)), _with_nodes("item", "max"),
         _row_max_of_itself),
    Rule("minus_row_amax", Op(aten.sub.Tensor, _NODE, Op(aten.amax.default, Capture("same"),
                                                           Capture("dim", lambda d: len(d) == 1, "one dim"),
                                                           Capture("keepdim"), name="max"), Lit(1)),
         _with_nodes("max"), lambda m: _row_max_of_itself(m, m["dim"][0])),
]


def skip_score_identities(node: object, passed: list[Node] | None = None) -> object:
    """Follow score ops the softmax does not see (S + 0, a floor at the lowest value, the row
    maximum subtracted) and value identities up to their source; the nodes walked (and helper
    nodes such as that maximum) are appended to `passed`."""
    while True:
        node = skip_identities(node, passed)
        found = _found(read(SCORE_IDENTITY_RULES, node))
        if found is None:
            return node
        source, helpers = found
        if passed is not None:
            passed.extend([node, *helpers])
        node = source


def _appended_columns(found: Match) -> str | None:
    scores, *sinks = found["tensors"]
    val = fake(scores)
    if val is None or val.dim() != 4:
        return "not 4-D scores"
    if int(found["dim"]) % 4 != 3:
        return f"concatenates along dim {found['dim']}, not the key axis"
    if not all(isinstance(t, Node) and fake(t) is not None and fake(t).dim() == 4 for t in sinks):
        return "the appended columns are not 4-D tensors"
    if any(_depends_on(t, scores) for t in sinks):
        return "the appended columns are computed from the scores"
    return None


def _depends_on(node: Node, other: Node, limit: int = 64) -> bool:
    stack, seen = [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is other:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


# cat([S, sink], -1) -> (S, [sink]): a learned per-head logit appended as an extra key column
# (GPT-OSS, MiMo, DeepSeek-V4 attention sinks); the matching slice drops its probability after
# the softmax, so the sink only enlarges the denominator
SINK_COLUMNS_RULE = Rule("sink_columns", Op(aten.cat.default, Capture("tensors", lambda t: len(t) >= 2, "a list"),
                                            Capture("dim")),
                         lambda _gm, m: (m["tensors"][0], list(m["tensors"][1:])), _appended_columns)


def sink_columns(node: object) -> tuple[Node, list[Node]] | None:
    """(scores, [appended sink columns]) when `node` is cat([scores, sinks...], -1), else None."""
    return _found(read([SINK_COLUMNS_RULE], node))


# --------------------------------------------------------------------------- softmax


def _softmax_last_dim(found: Match) -> str | None:
    # softmax(x, -1), softmax(x, -1, dtype=x.dtype), _softmax(x, -1, False) keep the op's numerics
    # 3-D scores are head-merged (B·H, Lq, Lk): the matcher needs a view showing H above them
    val = fake(found["src"])
    if val is None or val.dim() not in (3, 4):
        return "scores are not 4-D (or head-merged 3-D)"
    if int(found["dim"]) % val.dim() != val.dim() - 1:
        return f"over dim {found['dim']}, not the key axis"
    if found.root.target == aten._softmax.default:
        return "half_to_float changes the dtype" if found["third"] else None
    if found.root.target == aten.softmax.int and found["third"] not in (None, val.dtype):
        return f"computes in {found['third']}, not the scores' {val.dtype}"
    return None


_SOFTMAX_LAST_DIM = Rule("softmax_last_dim", Op((aten.softmax.int, aten._softmax.default, aten._safe_softmax.default),
                                                 Capture("src"), Capture("dim"), Capture("third")),
                         _source, _softmax_last_dim)
SOFTMAX_TARGETS = tuple(_SOFTMAX_LAST_DIM.pattern.targets)  # the anchors: every softmax node


def _computed_wide_and_cast_back(found: Match) -> str | None:
    # softmax of bf16/fp16 scores computed in float32, probabilities rounded back to the scores'
    # dtype before P·V: the fused op does the same (float32 softmax inside, output in q's dtype),
    # so the pair is one softmax "in the scores' dtype" up to that one rounding.
    scores, wide, probs = fake(found["src"]), fake(found["softmax"]), fake(found.root)
    if scores is None or wide is None or probs is None:
        return "no dtype metadata"
    if scores.dim() != 4:
        return "scores are not 4-D"
    if int(found["dim"]) % 4 != 3:
        return f"over dim {found['dim']}, not the key axis"
    if scores.dtype not in (torch.bfloat16, torch.float16) or wide.dtype != torch.float32:
        return f"softmax of {scores.dtype} scores in {wide.dtype}, not a float32 softmax of bf16/fp16 scores"
    if probs.dtype != scores.dtype:
        return f"casts the probabilities to {probs.dtype}, not back to the scores' {scores.dtype}"
    return None


# softmax(x, -1, dtype=float32).to(x.dtype) -> x  (transformers' bf16/fp16 eager attention);
# read at the cast, which `probabilities` makes the anchor instead of the softmax.
CAST_BACK_SOFTMAX_RULE = Rule(
    "float32_softmax_cast_back",
    Op(CASTS, Op((aten.softmax.int, aten._softmax.default), Capture("src"), Capture("dim"), Capture("third"),
                 single_use=True, name="softmax")),
    _source, _computed_wide_and_cast_back)

SOFTMAX_RULES: list[Rule] = [
    # softmax(x, -1) -> x;  read's result is the scores the softmax normalizes
    _SOFTMAX_LAST_DIM,
    # softmax(x, -1, dtype=float32).to(x.dtype) -> x  (x bf16/fp16), read at the cast
    CAST_BACK_SOFTMAX_RULE,
]


def probabilities(softmax: Node) -> Node:
    """The node holding the attention probabilities `softmax` computes: its cast back to the
    scores' dtype when it is a float32 softmax of bf16/fp16 scores cast back, else the softmax."""
    user = only_user(softmax)
    if user is not None and not isinstance(read([CAST_BACK_SOFTMAX_RULE], user), NoMatch):
        return user
    return softmax


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class MaskMatch:
    """The scores before masking and the mask in the op's form (bool True = attend, or additive)."""

    scores: Node
    mask: Value
    node: Node  # the masking node itself (its only user must be the softmax)


def _fill_value(value: object) -> float | None:
    """The negative constant a masked score is set to: a number, or a 0-d constant node."""
    c = constant_number(value)
    return c if c is not None and c < 0 else None


# A 0-d tensor constant of the model (GPT-Neo's `masked_bias`, DeBERTa's scale) reaches the
# graph as get_attr -> lift_fresh_copy -> detach_: the same value, read once at trace time.
_CONSTANT_COPIES = (aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default,
                    aten.clone.default, aten.alias.default)


def constant_number(value: object) -> float | None:
    """`value` as a Python float when it is a number or a 0-d constant node (full([], c),
    scalar_tensor(c), or a 0-d tensor attribute of the module read through copies), else None."""
    if not isinstance(value, Node):
        return _scalar(value)
    while value.target in _CONSTANT_COPIES and value.args and isinstance(value.args[0], Node):
        value = value.args[0]
    if value.target == aten.full.default and list(value.args[0]) == []:
        return _scalar(value.args[1])
    if value.target == aten.scalar_tensor.default:
        return _scalar(value.args[0])
    if value.op == "get_attr" and value.graph.owning_module is not None:
        from fxforge.ir.graph import get_attr

        try:
            tensor = get_attr(value.graph.owning_module, value.target)
        except AttributeError:
            return None
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 0 and tensor.is_floating_point():
            return float(tensor)
    return None


def _is_bool(node: object) -> bool:
    val = fake(node)
    return val is not None and val.dtype == torch.bool


def _additive_from_hidden(hidden: Value, fill: float, scores: Node) -> Build:
    # hidden positions get `fill`, the others 0, in the scores' dtype: the mask stays mask-shaped.
    zeros = Build(aten.zeros_like.default, (hidden,), (("dtype", fake(scores).dtype),))
    return Build(aten.masked_fill.Scalar, (zeros, hidden, fill))


_FILL = Capture("fill", lambda v: _fill_value(v) is not None, "a negative constant")
_BOOL = "a bool tensor"
_SCORES = Capture("scores", Node, "a node")


def _where_fill(_gm: Any, m: Match) -> list[MaskMatch]:
    # where(b, S, -inf) -> (S, bool b);  where(b, S, c<0) -> (S, additive where(b, 0, c))
    fill, scores, cond = _fill_value(m["fill"]), m["scores"], m["cond"]
    if fill == -math.inf:
        return [MaskMatch(scores, cond, m.root)]
    return [MaskMatch(scores, _additive_from_hidden(Build(aten.logical_not.default, (cond,)), fill, scores), m.root)]


def _masked_fill(_gm: Any, m: Match) -> list[MaskMatch]:
    # S.masked_fill(m, -inf) -> (S, bool ~m);  S.masked_fill(m, c<0) -> (S, additive where(m, c, 0))
    fill, scores, hidden = _fill_value(m["fill"]), m["scores"], m["hidden"]
    if fill == -math.inf:
        return [MaskMatch(scores, Build(aten.logical_not.default, (hidden,)), m.root)]
    return [MaskMatch(scores, _additive_from_hidden(hidden, fill, scores), m.root)]


# S + M -> (S, additive M);  M + S -> (S, additive M): both readings, the score walk picks.
# Also how the walk reads a position bias (S + B, ALiBi) below the mask.
# In-place `scores += bias` (MPNet's relative position bias) is the same value: the matcher's
# single-use check guarantees no other reader sees the mutated scores.
ADDITIVE_RULE = Rule("additive", Op((aten.add.Tensor, aten.add_.Tensor), Capture("a", Node), Capture("b", Node), Lit(1)),
                     lambda _gm, m: [MaskMatch(m["a"], m["b"], m.root), MaskMatch(m["b"], m["a"], m.root)])
MASK_RULES: list[Rule] = [
    ADDITIVE_RULE,
    Rule("where_fill", Op((aten.where.self, aten.where.ScalarOther), Capture("cond", _is_bool, _BOOL), _SCORES, _FILL),
         _where_fill),
    Rule("masked_fill", Op((aten.masked_fill.Scalar, aten.masked_fill.Tensor),
                           _SCORES, Capture("hidden", _is_bool, _BOOL), _FILL), _masked_fill),
]


def additive_terms(node: object) -> list[MaskMatch]:
    """Both readings of `node` as `scores + term` (an add of two nodes, alpha 1); [] if it is none."""
    return _found(read([ADDITIVE_RULE], node)) or []


def mask_candidates(node: Node) -> list[MaskMatch]:
    """Every way of reading `node` (the softmax input) as scores plus a mask; [] if it is no mask."""
    return _found(read(MASK_RULES, node)) or []


# --------------------------------------------------------------------------- K transposed


def _last_two(found: Match) -> str | None:
    val = fake(found["src"])
    if val is None or val.dim() != 4:
        return "not 4-D"
    dims = sorted(int(d) % 4 for d in (found["d0"], found["d1"]))
    return None if dims == [2, 3] else f"swaps dims {found['d0']}, {found['d1']}, not the last two"


def _permute_back(_gm: Any, found: Match) -> Build:
    perm = [int(p) % 4 for p in found["perm"]]
    return Build(aten.permute.default, (found["src"], [perm[0], perm[1], perm[3], perm[2]]))


KEY_TRANSPOSE_RULES: list[Rule] = [
    # Kᵀ = K.transpose(-2, -1) -> K
    Rule("transpose_last_two", Op(aten.transpose.int, Capture("src"), Capture("d0"), Capture("d1")), _source, _last_two),
    # Kᵀ = x.permute(p) -> K = x.permute(p with its last two entries swapped)
    Rule("permute", Op(aten.permute.default, Capture("src"), Capture("perm", lambda p: len(p) == 4, "a 4-D permutation")),
         _permute_back),
]


def untranspose_key(kt: Node) -> Value:
    """K from Kᵀ: strip the transpose that made it, or build K = Kᵀ.transpose(-2, -1)."""
    found = _found(read(KEY_TRANSPOSE_RULES, kt))
    if found is not None:
        return found
    return Build(aten.transpose.int, (kt, -2, -1))  # any other layout: transpose it back


# --------------------------------------------------------------------------- repeat_kv (GQA)


def _repeated_heads(found: Match) -> str | None:
    # (B, Hkv, L, D) -> expand (B, Hkv, g, L, D) -> reshape (B, Hkv·g, L, D)
    kv_val, exp_val, out_val = fake(found["kv"]), fake(found["expanded"]), fake(found.root)
    if kv_val is None or exp_val is None or out_val is None or kv_val.dim() != 4 or out_val.dim() != 4:
        return "not 4-D key/value heads"
    groups = exp_val.shape[2]
    if not isinstance(groups, int):
        return "symbolic repetition count"
    b, h, length, d = kv_val.shape
    if not all(same_size(x, y) for x, y in zip(exp_val.shape, (b, h, groups, length, d))):
        return f"expands to {tuple(exp_val.shape)}, not {groups} copies of each head"
    if not all(same_size(x, y) for x, y in zip(out_val.shape, (b, h * groups, length, d))):
        return f"reshapes to {tuple(out_val.shape)}, not the repeated heads"
    return None


def _interleaved_heads(found: Match) -> str | None:
    val, dim = fake(found["src"]), found["dim"]
    if val is None or val.dim() != 4:
        return "not 4-D key/value heads"
    return None if dim is not None and int(dim) % 4 == 1 else f"repeats along dim {dim}, not the heads"


_UNSQUEEZED = Op(aten.unsqueeze.default, Capture("kv"), Capture("udim", lambda d: int(d) in (2, -3), "dim 2"))
REPEAT_KV_RULES: list[Rule] = [
    # reshape(expand(k[:, :, None], (B, Hkv, g, L, D)), (B, Hkv·g, L, D)) -> (k, g)
    Rule("expand_reshape", Op((aten.reshape.default, aten.view.default, aten._unsafe_view.default),
                              Through(Op(aten.expand.default, Through(_UNSQUEEZED, _identity_step), name="expanded"),
                                      _identity_step)),
         lambda _gm, m: (m["kv"], fake(m["expanded"]).shape[2]), _repeated_heads),
    # k.repeat_interleave(g, dim=1) -> (k, g)
    Rule("repeat_interleave", Op(aten.repeat_interleave.self_int, Capture("src"), Capture("repeats", int, "an int"),
                                 Capture("dim")),
         lambda _gm, m: (m["src"], m["repeats"]), _interleaved_heads),
]


def peel_repeat_kv(node: Value) -> tuple[Value, int]:
    """(k, groups) when `node` repeats each key/value head `groups` times, else (node, 1)."""
    if isinstance(node, Build):
        return node, 1
    found = _found(read(REPEAT_KV_RULES, skip_identities(node)))
    return found if found is not None else (node, 1)


def only_user(node: Node) -> Node | None:
    """The single user of `node`, or None when it has none or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


__all__ = [
    "Build", "Value", "fake", "same_size", "broadcasts_to", "IDENTITY_RULES", "SCALE_RULES",
    "skip_identities", "peel_scales", "SCORE_IDENTITY_RULES", "skip_score_identities", "constant_number", "SINK_COLUMNS_RULE", "sink_columns", "SOFTMAX_RULES", "SOFTMAX_TARGETS", "CAST_BACK_SOFTMAX_RULE", "probabilities",
    "MaskMatch", "ADDITIVE_RULE", "MASK_RULES",
    "additive_terms", "mask_candidates", "KEY_TRANSPOSE_RULES", "untranspose_key", "REPEAT_KV_RULES", "peel_repeat_kv",
    "only_user",
]
