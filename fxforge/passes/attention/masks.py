"""Proofs about attention masks for `fuse_attention` and `add_kv_cache`: purely causal, a causal
sliding window, all-visible, or neither.

A small abstract interpreter walks the mask's subgraph and gives each node one of these values:

    Index(rank, axis, offset)   an integer tensor equal to (position along `axis`) + offset
    Const(value)                every element equal (ones, full, zeros, a scalar)
    Band(rank, c, hidden, lo)   a bool tensor: key j visible from query i iff lo <= j - i <= c
                                (lo None: no lower edge; c None: no upper edge; hidden=True: the
                                tensor is True outside that set, a "masked" map)
    AddBand(rank, c, lo)        an additive float mask: 0 where lo <= j - i <= c, far below zero elsewhere

built from arange/unsqueeze/expand/slice/le/lt/ge/gt/and/not/where/triu/tril and materialized
buffers, plus what transformers' masking_utils spells around them: positions gathered with
`index` (position_ids[b, q_idx]), `cumsum` over ones, and the packed-sequence check
cumsum(diff(position_ids) != 1) compared for equality, which is constant when the positions
are a plain arange. Anything else (a padding mask read from an input, a gather, a view) is unknown, and
an unknown mask is kept as it is. `classify_mask` answers "causal" only for Band(c=0) or
AddBand(c=0) with no lower edge whose last two dims are exactly the query and key lengths, so
dropping the mask for `is_causal=True` is provably the same computation. A band with both edges,
0 <= i - j < w (Mistral's `sliding_window`, GPT-Neo's local layers), is "sliding_window" with
`window` w: `fuse_attention` keeps such a mask as it is, and `add_kv_cache` narrows its own
causal/tree mask to the same window instead of dropping it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.ancestors import ancestors
from fxforge.passes.attention.rules import Build, fake, same_size

aten = torch.ops.aten
FAR_NEGATIVE = -1e30  # additive fills at or below this zero a probability exactly in fp32/bf16
# A pattern-only reading (which keys a mask hides, not whether dropping it is exact) also takes
# fills at or below this: GPT-Neo's -1e9, BERT-era -10000 (exp(-1e4) underflows to 0 in fp32).
PATTERN_NEGATIVE = -1e4
_PATTERN_ONLY = "pattern_only"  # memo key: the reading explain_mask was asked for


@dataclass(frozen=True)
class Index:
    rank: int
    axis: int  # counted from the right: -1 is the key axis, -2 the query axis
    offset: int


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Band:
    rank: int
    c: int | None  # upper edge of j - i (None: none)
    hidden: bool = False
    lo: int | None = None  # lower edge of j - i (None: none): a sliding window's far end


@dataclass(frozen=True)
class AddBand:
    rank: int
    c: int | None
    lo: int | None = None


Abstract = Index | Const | Band | AddBand | None


@dataclass(frozen=True)
class MaskVerdict:
    """What the analyser proved about a mask: `kind` "causal", "sliding_window" (with `window` w:
    key j visible from query i iff 0 <= i - j < w), "all" or None (keep the mask), and why."""

    kind: str | None
    reason: str
    window: int | None = None


def classify_mask(mask: Node | Build, gm: GraphModule | None, lq: Any, lk: Any) -> str | None:
    """"causal" if `mask` is exactly the causal triangle over (lq, lk), "sliding_window" if it is a causal
    band of a fixed width, "all" if it hides nothing, else None."""
    return explain_mask(mask, gm, lq, lk).kind


def explain_mask(mask: Node | Build, gm: GraphModule | None, lq: Any, lk: Any,
                 pattern_only: bool = False) -> MaskVerdict:
    """`classify_mask` with its reason: what was proved, or why the mask must be kept as it is.

    `pattern_only`: prove which keys the mask hides, taking any fill at or below PATTERN_NEGATIVE
    as hiding (for `add_kv_cache`, which replaces the mask by its own); by default only fills at or
    below FAR_NEGATIVE, so that `fuse_attention` dropping the mask is exact."""
    memo: dict = {_PATTERN_ONLY: pattern_only}
    value = _eval(mask, gm, memo)
    if isinstance(value, Const) and (value.value is True or (not isinstance(value.value, bool) and value.value == 0)):
        # every key visible (bool True) or nothing added (additive 0); False is not "all"
        return MaskVerdict("all", "the mask hides no key")
    if value is None:
        leaf = _first_unknown(mask, memo)
        if isinstance(leaf, Node) and leaf.op == "placeholder":
            what = f"the model input `{leaf.name}`"
        elif isinstance(leaf, Node):
            what = f"`{leaf.name}` ({leaf.target})"
        else:
            what = "a value"
        return MaskVerdict(None, f"the mask depends on {what}, which the analyser cannot interpret "
                                 f"(a model input, an op it has no rule for, or values it cannot combine): kept as it is")
    shape = _shape(mask)
    if shape is None or len(shape) < 2 or not (same_size(shape[-2], lq) and same_size(shape[-1], lk)):
        return MaskVerdict(None, f"the mask's last two dims {None if shape is None else tuple(shape[-2:])} are "
                                 f"not the query and key lengths ({lq}, {lk})")
    if isinstance(value, Band) and value.hidden:
        return MaskVerdict(None, "the mask marks hidden keys (True = hidden), not visible ones")
    if isinstance(value, (Band, AddBand)):
        if value.c == 0 and value.lo is None:
            return MaskVerdict("causal", "the mask is the causal triangle: key j visible from query i iff j <= i")
        if value.c == 0 and value.lo is not None and value.lo <= 0:
            window = 1 - value.lo
            return MaskVerdict("sliding_window", f"the mask is a causal sliding window: key j visible from "
                                                 f"query i iff 0 <= i - j < {window}", window=window)
        return MaskVerdict(None, f"the mask is a band {_band_text(value)}, not the causal triangle (j - i <= 0)")
    return MaskVerdict(None, f"the mask is a constant {value.value!r} that hides keys")


def _band_text(band: Band | AddBand) -> str:
    if band.lo is None:
        return f"j - i <= {band.c}"
    return f"j - i >= {band.lo}" if band.c is None else f"{band.lo} <= j - i <= {band.c}"


def _visible(band: Band) -> Band | None:
    """The same bool tensor read as its visible set (hidden=False), when that set is one band."""
    if not band.hidden:
        return band
    if band.lo is None and band.c is not None:  # True where j - i > c: visible j - i >= c + 1
        return Band(band.rank, None, lo=band.c + 1)
    if band.c is None and band.lo is not None:  # True where j - i < lo
        return Band(band.rank, band.lo - 1)
    return None  # outside a two-sided band: two pieces


def _meet(a: Band | AddBand, b: Band | AddBand) -> tuple[int, int | None, int | None]:
    """(rank, upper, lower) of the intersection of two visible bands."""
    uppers = [c for c in (a.c, b.c) if c is not None]
    lowers = [lo for lo in (a.lo, b.lo) if lo is not None]
    return max(a.rank, b.rank), min(uppers) if uppers else None, max(lowers) if lowers else None


def _first_unknown(node: object, memo: dict) -> object:
    """The node nearest the inputs whose value the analyser could not give (all its inputs known)."""
    while isinstance(node, Node):
        unknown = [a for a in node.all_input_nodes if a in memo and memo[a] is None]
        if not unknown:
            return node
        node = unknown[0]
    return node


def _shape(value: object) -> tuple | None:
    if isinstance(value, Build):
        return _shape(value.args[0])
    val = fake(value)
    return tuple(val.shape) if val is not None else None


def _kw(node: Node | Build) -> dict:
    """Keyword arguments of a node or of a recipe (which holds them as pairs)."""
    return dict(node.kwargs)


def _dtype(value: object) -> torch.dtype | None:
    """A node's dtype; a recipe's is its dtype argument or its first argument's (as the rules build them:
    the additive form of a bool mask is zeros_like(mask, dtype=float).masked_fill(...))."""
    if isinstance(value, Build):
        kwargs = dict(value.kwargs)
        return kwargs["dtype"] if "dtype" in kwargs else _dtype(value.args[0]) if value.args else None
    val = fake(value)
    return val.dtype if val is not None else None


def _eval(node: object, gm: GraphModule | None, memo: dict) -> Abstract:
    if isinstance(node, bool):
        return Const(node)
    if isinstance(node, (int, float)):
        return Const(node)
    if isinstance(node, Build):
        return _RULES.get(node.target, _unknown)(node, gm, memo)
    if not isinstance(node, Node):
        return None
    if node in memo:
        return memo[node]
    if node.op == "get_attr" and gm is not None:
        result = _buffer(gm, node)
    elif node.op == "call_function":
        result = _RULES.get(node.target, _unknown)(node, gm, memo)
    else:
        result = None
    memo[node] = result
    return result


def _unknown(node, gm, memo) -> Abstract:
    return None


def _args(node, gm, memo, n: int) -> list[Abstract]:
    return [_eval(a, gm, memo) for a in node.args[:n]]


# --------------------------------------------------------------------------- leaves


def _arange(node, gm, memo) -> Abstract:
    # arange(n) -> Index(0);  arange(s, e) -> Index(s)
    args = node.args
    start = args[0] if node.target != aten.arange.default else 0
    step = args[2] if node.target == aten.arange.start_step else 1
    return Index(1, -1, start) if isinstance(start, int) and step == 1 else None


def _constant(node, gm, memo) -> Abstract:
    # ones/new_ones/full/zeros/scalar_tensor -> Const(value)
    t, dtype = node.target, _dtype(node)
    if dtype is None and t not in (aten.full.default, aten.scalar_tensor.default):
        return None
    if t in (aten.ones.default, aten.new_ones.default, aten.ones_like.default):
        return Const(True if dtype == torch.bool else 1.0)
    if t in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default):
        return Const(False if dtype == torch.bool else 0.0)
    if t == aten.full.default:
        return Const(node.args[1])
    if t == aten.scalar_tensor.default:
        return Const(node.args[0])
    return None


def _buffer(gm: GraphModule, node: Node) -> Abstract:
    # a materialized tril(ones) / triu(-inf, 1) buffer -> Band(0) / AddBand(0); a band of diagonals
    # (GPT-Neo's local layers: tril(ones) ^ tril(ones, -w)) -> Band(0, lo=1 - w) / AddBand(0, lo=1 - w)
    from fxforge.ir.graph import get_attr

    try:
        value = get_attr(gm, node.target)
    except AttributeError:
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return Const(value.item())  # a 0-d fill (GPT-Neo's masked_bias)
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return None
    if any(s != 1 for s in value.shape[:-2]) or value.numel() > 1 << 24:
        return None
    square = value.reshape(value.shape[-2:])
    if square.dtype == torch.bool:
        visible = square
    elif square.is_floating_point() and bool(((square == 0) | (square <= FAR_NEGATIVE)).all()):
        visible = square == 0
    else:
        return None
    n = square.shape[-1]
    offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # j - i
    if not bool(visible.any()):
        return None
    c, lo = int(offsets[visible].max()), int(offsets[visible].min())
    if not torch.equal(visible, (offsets <= c) & (offsets >= lo)):
        return None
    lower = None if lo == -(n - 1) else lo  # every diagonal below: no lower edge within the buffer
    return Band(value.dim(), c, lo=lower) if square.dtype == torch.bool else AddBand(value.dim(), c, lo=lower)


# --------------------------------------------------------------------------- layout


def _unsqueeze(node, gm, memo) -> Abstract:
    # unsqueeze moves nothing right of the new axis: axes are counted from the right
    (x,) = _args(node, gm, memo, 1)
    if isinstance(x, Const):
        return x
    if x is None:
        return None
    new_rank = x.rank + 1
    dim = int(node.args[1]) % new_rank
    if isinstance(x, Index):
        axis_left = x.rank + x.axis
        return replace(x, rank=new_rank, axis=(axis_left + (dim <= axis_left)) - new_rank)
    return replace(x, rank=new_rank) if dim <= x.rank - 2 else None


def _sizes_kept(node: Node, axes: tuple[int, ...]) -> bool:
    src, out = fake(node.args[0]), fake(node)
    if src is None or out is None:
        return False
    return all(same_size(src.shape[a], out.shape[a]) for a in axes)


def _expand(node, gm, memo) -> Abstract:
    # expand repeats values along broadcast axes; the position axes must keep their size
    (x,) = _args(node, gm, memo, 1)
    if x is None or isinstance(x, Const):
        return x
    axes = (x.axis,) if isinstance(x, Index) else (-2, -1)
    rank = len(node.args[1])
    return replace(x, rank=rank) if _sizes_kept(node, axes) else None


def _slice(node, gm, memo) -> Abstract:
    # x[..., s:e] along a position axis shifts that position by s
    (x,) = _args(node, gm, memo, 1)
    if x is None or isinstance(x, Const):
        return x
    dim = int(node.args[1]) % x.rank - x.rank
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    if step != 1 or not isinstance(start, int) or start < 0:
        return None
    if isinstance(x, Index):
        return replace(x, offset=x.offset + start) if dim == x.axis else x
    shift = start if dim == -2 else -start if dim == -1 else 0  # query i = i' + s: j - i' <= c + s
    return replace(x, c=None if x.c is None else x.c + shift, lo=None if x.lo is None else x.lo + shift)


def _same_value_cast(node, gm, memo) -> Abstract:
    # x.to(same kind) keeps the value; a constant cast to any dtype is that constant cast
    (x,) = _args(node, gm, memo, 1)
    src, out = fake(node.args[0]), fake(node)
    if src is None or out is None:
        return None
    if isinstance(x, Const) and isinstance(x.value, (bool, int, float)):
        if out.dtype == torch.bool:
            return Const(bool(x.value))
        return Const(float(x.value) if out.is_floating_point() else int(x.value))
    if src.dtype == out.dtype or (not src.is_floating_point() and not out.is_floating_point()
                                  and src.dtype != torch.bool and out.dtype != torch.bool):
        return x
    return None


# --------------------------------------------------------------------------- arithmetic


def _add(node, gm, memo) -> Abstract:
    # Index(o) + k -> Index(o + k);  AddBand + AddBand -> their intersection;  AddBand + 0 -> AddBand
    x, y = _args(node, gm, memo, 2)
    if isinstance(x, AddBand) and isinstance(y, AddBand) and _kw(node).get("alpha", 1) == 1:
        return AddBand(*_meet(x, y))
    for band, other in ((x, y), (y, x)):
        if isinstance(band, AddBand) and isinstance(other, Const) and not isinstance(other.value, bool) \
                and other.value == 0:
            return band
    if isinstance(x, Index) and isinstance(y, Const) and isinstance(y.value, int) and _kw(node).get("alpha", 1) == 1:
        return replace(x, offset=x.offset + y.value)
    if isinstance(y, Index) and isinstance(x, Const) and isinstance(x.value, int):
        return replace(y, offset=y.offset + x.value)
    return None


def _sub(node, gm, memo) -> Abstract:
    # Index(o) - k -> Index(o - k)
    x, y = _args(node, gm, memo, 2)
    if isinstance(x, Index) and isinstance(y, Const) and isinstance(y.value, int) and _kw(node).get("alpha", 1) == 1:
        return replace(x, offset=x.offset - y.value)
    return None


def _rank_of(node: object) -> int | None:
    val = fake(node)
    return val.dim() if val is not None else None


def _index(node, gm, memo) -> Abstract:
    # x[i0, ..., in] with integer index tensors: a constant stays constant; an Index(o) read at
    # the positions of an index tensor that is itself Index(o2) along axis a gives Index(o + o2) along a
    x, indices = node.args[0], node.args[1]
    value, src, out = _eval(x, gm, memo), fake(x), fake(node)
    if value is None or src is None or out is None or len(indices) != src.dim():
        return None
    if any(not isinstance(i, Node) or fake(i) is None or fake(i).dtype in (torch.bool, torch.uint8) for i in indices):
        return None  # a None (whole axis) or a boolean index changes the result's layout
    if isinstance(value, Const):
        return value
    if not isinstance(value, Index):
        return None
    picker = indices[src.dim() + value.axis]
    where = _eval(picker, gm, memo)
    if not isinstance(where, Index) or where.offset < 0:  # negative positions would wrap around
        return None
    picked = fake(picker)
    if not same_size(picked.shape[where.axis], out.shape[where.axis]):
        return None  # a size-1 index axis broadcast to more positions repeats one value
    return Index(out.dim(), where.axis, value.offset + where.offset)


def _diff(node, gm, memo) -> Abstract:
    # diff(Index, prepend=[first - 1]) along its axis -> Const(1): every step of an arange is 1
    x = _eval(node.args[0], gm, memo)
    n = node.args[1] if len(node.args) > 1 else _kw(node).get("n", 1)
    dim = node.args[2] if len(node.args) > 2 else _kw(node).get("dim", -1)
    prepend = node.args[3] if len(node.args) > 3 else _kw(node).get("prepend")
    append = node.args[4] if len(node.args) > 4 else _kw(node).get("append")
    if not isinstance(x, Index) or n != 1 or append is not None or int(dim) % x.rank - x.rank != x.axis:
        return None
    if prepend is None:
        return Const(1)
    before, shape = _eval(prepend, gm, memo), _shape(prepend)
    if isinstance(before, Index) and before.axis == x.axis and shape is not None and same_size(shape[x.axis], 1):
        last = before.offset  # its one position along the axis is 0
    elif isinstance(before, Const) and isinstance(before.value, int) and not isinstance(before.value, bool):
        last = before.value
    else:
        return None
    return Const(1) if x.offset - last == 1 else None


def _cumsum(node, gm, memo) -> Abstract:
    # cumsum(0) -> 0;  cumsum(1) along an axis -> Index(1) along it (1, 2, 3, ...)
    (x,) = _args(node, gm, memo, 1)
    rank = _rank_of(node)
    if not isinstance(x, Const) or rank is None or rank == 0:
        return None
    if x.value is False or (not isinstance(x.value, bool) and x.value == 0):
        return Const(0)
    if x.value is True or x.value == 1:
        return Index(rank, int(node.args[1]) % rank - rank, 1)
    return None


def _equal(node, gm, memo) -> Abstract:
    # eq/ne of two constants is a constant bool
    x, y = _args(node, gm, memo, 2)
    if not (isinstance(x, Const) and isinstance(y, Const)) or not all(
            isinstance(v, (bool, int, float)) for v in (x.value, y.value)):
        return None
    same = x.value == y.value
    return Const(same if node.target in (aten.eq.Tensor, aten.eq.Scalar) else not same)


def _compare(node, gm, memo) -> Abstract:
    # (j + a) <= (i + b) -> Band(b - a);  (j + a) < (i + b) -> Band(b - a - 1);  i < j -> hidden Band(0);  idx >= 0 -> True
    x, y = _args(node, gm, memo, 2)
    t = node.target
    if t in (aten.ge.Tensor, aten.gt.Tensor, aten.ge.Scalar, aten.gt.Scalar):  # a >= b  <=>  b <= a
        x, y = y, x
    strict = t in (aten.lt.Tensor, aten.gt.Tensor, aten.lt.Scalar, aten.gt.Scalar)
    if isinstance(x, Const) and isinstance(y, Index) and isinstance(x.value, int):  # k <= idx, idx >= k
        return Const(True) if y.offset >= x.value + strict else None
    if not (isinstance(x, Index) and isinstance(y, Index) and {x.axis, y.axis} == {-1, -2}):
        return None
    rank = max(x.rank, y.rank)
    if x.axis == -1:  # j + a <= i + b  <=>  j - i <= b - a
        return Band(rank, y.offset - x.offset - strict)
    # i + a <= j + b  <=>  j - i >= a - b  <=>  hidden where j - i > a - b - 1
    return Band(rank, x.offset - y.offset - 1 + strict, hidden=True)


def _and(node, gm, memo) -> Abstract:
    # True & m -> m;  Band & Band -> the intersection of their visible sets (j <= i and j > i - w:
    # a sliding window)
    x, y = _args(node, gm, memo, 2)
    if isinstance(x, Const) and x.value is True:
        return y
    if isinstance(y, Const) and y.value is True:
        return x
    if isinstance(x, Band) and isinstance(y, Band):
        x, y = _visible(x), _visible(y)
        if x is not None and y is not None:
            rank, c, lo = _meet(x, y)
            return Band(rank, c, lo=lo)
    return None


def _not(node, gm, memo) -> Abstract:
    # ~Band(c) -> hidden Band(c);  ~True -> False
    (x,) = _args(node, gm, memo, 1)
    if isinstance(x, Band):
        return replace(x, hidden=not x.hidden)
    if isinstance(x, Const) and isinstance(x.value, bool):
        return Const(not x.value)
    return None


def _hides(value: Any, memo: dict) -> bool:
    """A fill that hides a key: far negative, or (pattern-only reading) below PATTERN_NEGATIVE."""
    if memo.get(_PATTERN_ONLY) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value <= PATTERN_NEGATIVE
    return _far_negative(value)


def _far_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and (value == -math.inf or value <= FAR_NEGATIVE)


def _where(node, gm, memo) -> Abstract:
    # where(Band(c), 0, -big) -> AddBand(c);  where(hidden Band(c), -big, 0) -> AddBand(c)
    cond, a, b = _args(node, gm, memo, 3)
    if isinstance(cond, Const) and isinstance(cond.value, bool):
        return a if cond.value else b
    if not (isinstance(cond, Band) and isinstance(a, Const) and isinstance(b, Const)):
        return None
    visible, hidden = (b, a) if cond.hidden else (a, b)
    if visible.value == 0 and _hides(hidden.value, memo):
        return AddBand(cond.rank, cond.c, cond.lo)
    return None


def _masked_fill(node, gm, memo) -> Abstract:
    # 0.masked_fill(hidden Band(c), -big) -> AddBand(c)
    x, cond, fill = _args(node, gm, memo, 3)
    if isinstance(x, Const) and x.value == 0 and isinstance(cond, Band) and cond.hidden and isinstance(fill, Const) \
            and _hides(fill.value, memo):
        return AddBand(cond.rank, cond.c, cond.lo)
    return None


def _triangle(node, gm, memo) -> Abstract:
    # tril(ones, d) -> Band(d);  triu(ones, d) -> hidden Band(d - 1);  triu(full(-big), d) -> AddBand(d - 1)
    (x,) = _args(node, gm, memo, 1)
    diagonal = node.args[1] if len(node.args) > 1 else _kw(node).get("diagonal", 0)
    val = fake(node)
    if not isinstance(x, Const) or val is None or val.dim() < 2 or not isinstance(diagonal, int):
        return None
    if node.target == aten.tril.default:
        return Band(val.dim(), diagonal) if x.value in (True, 1) and val.dtype == torch.bool else None
    if x.value in (True, 1) and val.dtype == torch.bool:
        return Band(val.dim(), diagonal - 1, hidden=True)
    return AddBand(val.dim(), diagonal - 1) if _hides(x.value, memo) else None


_RULES: dict[Any, Callable[..., Abstract]] = {
    aten.arange.default: _arange, aten.arange.start: _arange, aten.arange.start_step: _arange,
    aten.ones.default: _constant, aten.new_ones.default: _constant, aten.ones_like.default: _constant,
    aten.zeros.default: _constant, aten.new_zeros.default: _constant, aten.zeros_like.default: _constant,
    aten.full.default: _constant, aten.scalar_tensor.default: _constant,
    aten.unsqueeze.default: _unsqueeze, aten.expand.default: _expand, aten.slice.Tensor: _slice,
    aten.to.dtype: _same_value_cast, aten.to.dtype_layout: _same_value_cast, aten.to.device: _same_value_cast,
    aten._to_copy.default: _same_value_cast, aten.contiguous.default: _same_value_cast,
    aten.clone.default: _same_value_cast, aten.alias.default: _same_value_cast,
    aten.add.Tensor: _add, aten.sub.Tensor: _sub,
    aten.index.Tensor: _index, aten.diff.default: _diff, aten.cumsum.default: _cumsum,
    aten.eq.Tensor: _equal, aten.eq.Scalar: _equal, aten.ne.Tensor: _equal, aten.ne.Scalar: _equal,
    aten.le.Tensor: _compare, aten.lt.Tensor: _compare, aten.ge.Tensor: _compare, aten.gt.Tensor: _compare,
    aten.le.Scalar: _compare, aten.lt.Scalar: _compare, aten.ge.Scalar: _compare, aten.gt.Scalar: _compare,
    aten.__and__.Tensor: _and, aten.bitwise_and.Tensor: _and, aten.logical_and.default: _and,
    aten.logical_not.default: _not, aten.bitwise_not.default: _not,
    aten.where.self: _where, aten.where.ScalarOther: _where, aten.where.ScalarSelf: _where,
    aten.where.Scalar: _where,
    aten.masked_fill.Scalar: _masked_fill,
    aten.tril.default: _triangle, aten.triu.default: _triangle,
}


def mask_sources_placeholder(mask: Node) -> Node | None:
    """The graph input a mask's values are computed from, if any (shapes of inputs do not count)."""
    # a causal mask is built from the input's length (sym_size), not its values
    for current in ancestors(mask, through=lambda n: n.target != aten.sym_size.int):
        if current.op == "placeholder":
            return current
    return None


# ops through which a zero tensor stays all zeros (a plain padding/causal mask starts from one)
_ZERO_SOURCES = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
_SAME_VALUES = (aten.to.dtype, aten._to_copy.default, aten.expand.default, aten.view.default,
                aten.reshape.default, aten.unsqueeze.default, aten.clone.default, aten.slice.Tensor)


def _is_zeros(node: Node) -> bool:
    while node.target in _SAME_VALUES and isinstance(node.args[0], Node):
        node = node.args[0]
    if node.target in _ZERO_SOURCES:
        return True
    return node.target in (aten.full.default, aten.new_full.default) and node.args[-1] == 0


def split_position_bias(mask: object) -> tuple[Build, Node] | None:
    """A float mask `masked_fill(B, hidden, -big)` with B a position bias, as (keep, B): the
    boolean mask `~hidden` and the bias on its own, so `B + S` masked by `keep` is the same
    softmax. Falcon with ALiBi folds its bias into the causal mask this way; split, the mask
    can be proven causal and add_kv_cache recomputes the bias over the cache instead of
    dropping it with the mask it replaces. None for any other mask: a B of zeros (a plain mask)
    or computed from a graph input's values (padding)."""
    if not (isinstance(mask, Node) and mask.target == aten.masked_fill.Scalar):
        return None
    bias, hidden, fill = mask.args[:3]
    if not (isinstance(bias, Node) and isinstance(hidden, Node) and _far_negative(fill)):
        return None
    val, cond = fake(bias), fake(hidden)
    if val is None or cond is None or not val.is_floating_point() or cond.dtype != torch.bool:
        return None
    if _is_zeros(bias) or mask_sources_placeholder(bias) is not None:
        return None
    return Build(aten.logical_not.default, (hidden,)), bias


# --------------------------------------------------------------------------- key-only masks

# ops whose output at a position reads only its inputs at that (broadcast) position
_ELEMENTWISE = {
    aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default, aten.__or__.Tensor,
    aten.bitwise_or.Tensor, aten.logical_or.default, aten.logical_not.default, aten.bitwise_not.default,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar, aten.masked_fill.Scalar,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar,
}


def key_rows(mask: object, gm: GraphModule | None) -> Build | None:
    """`mask[..., :1, :]` for a (B|1, 1, Lq, Lk) mask proven equal in every query row, else None.

    transformers' masking_utils writes BERT's padding mask as (B, 1, Lq, Lk): the key padding
    (B, 1, 1, Lk) combined with an all-True query term and expanded over the queries. Its first
    row broadcasts back to the same mask, and a mask of that shape is what the ONNX lowering
    proves key-only (backends/onnx/lowerings/attention_prefill.py: key weights in V, no L×L
    mask, MultiHeadAttention's flash path). The proof: every value on the way from leaves with a
    query axis of size 1 (or a constant, `_eval`) went through element-wise ops and expand only."""
    shape = _shape(mask)
    if not isinstance(mask, Node) or shape is None or len(shape) != 4 or shape[1] != 1 or shape[2] == 1:
        return None
    memo: dict = {}
    return Build(aten.slice.Tensor, (mask, 2, 0, 1)) if _query_invariant(mask, gm, memo, set()) else None


def _query_invariant(node: object, gm: GraphModule | None, memo: dict, seen: set) -> bool:
    """True if `node`'s value is the same at every position of its query axis (-2)."""
    if not isinstance(node, Node):
        return True  # a Python scalar (fills, alpha) or a dtype/device argument
    if node in seen:
        return True  # already proven (a False anywhere makes the whole answer False at once)
    seen.add(node)
    val = fake(node)
    if val is None:
        return False
    if val.dim() < 2 or (isinstance(val.shape[-2], int) and val.shape[-2] == 1):
        return True  # no query axis of its own: broadcast along it
    if isinstance(_eval(node, gm, memo), Const):
        return True  # one value everywhere (e.g. the all-True `q_idx >= 0` term)
    if node.target == aten.expand.default:
        return _query_invariant(node.args[0], gm, memo, seen)
    if node.target in _ELEMENTWISE:
        return all(_query_invariant(a, gm, memo, seen) for a in node.args)
    return False
