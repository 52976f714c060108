"""Recognize a Hugging Face rotary embedding in an exported decoder, for GroupQueryAttention's do_rotary.

The decoder graph applies rotary position embedding to q and k as the model wrote it
(`LlamaRotaryEmbedding` + `apply_rotary_pos_emb`), exported as

    f = Mul(Cast(Unsqueeze(position_ids, -1)), inv_freq)        (B, L, D/2)   inv_freq an initializer
    cos = Unsqueeze(Cos(Concat(f, f, axis=-1)), 1)               (B, 1, L, D)  (sin likewise)
    x_rot = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2), axis=-1), sin))

which is GroupQueryAttention's non-interleaved rotary with cos_cache[p] = cos(p · inv_freq),
read at `position_ids` (the op takes them, so left-padded rows keep HF's positions). `match_rotary`
returns the un-rotated x and the inv_freq values when a value is exactly that, else None: any
other spelling (partial rotary, a scaled cos/sin, interleaved pairs) keeps the model's own ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

_BIG = 2**62  # a Slice end this large means "to the end"


@dataclass(frozen=True)
class Rotary:
    """A matched rotary embedding: the input it rotates and its frequencies."""

    x: str                   # the un-rotated (B, N, L, D) value
    inv_freq: str            # initializer name (D/2,)
    inv_freq_values: np.ndarray


class ModelGraph:
    """Producers and constant values of a ModelProto, for matching."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None):
        graph = model.graph
        self.base_dir = base_dir  # where external data lives; None: external tensors are not read
        self.producer = {out: node for node in graph.node for out in node.output}
        self.initializers = {i.name: i for i in graph.initializer}

    def node(self, value: str, op_type: str):
        node = self.producer.get(value)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def constant(self, value: str) -> np.ndarray | None:
        """The value of an initializer or Constant node; external data only for small tensors
        (frequencies, not weights) and only with a base_dir."""
        init = self.initializers.get(value)
        if init is not None:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                if self.base_dir is None or int(np.prod(init.dims)) > 4096:
                    return None
                return numpy_helper.to_array(init, base_dir=self.base_dir)
            return numpy_helper.to_array(init)
        node = self.node(value, "Constant")
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def ints(self, value: str) -> list[int] | None:
        array = self.constant(value) if value else None
        return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]


def match_rotary(model_graph: ModelGraph, value: str, head_dim: int, position_ids: str) -> Rotary | None:
    """The rotary embedding producing `value`, if it is exactly the spelling above."""
    g = model_graph
    add = g.node(value, "Add")
    if add is None:
        return None
    for plain_mul, rotated_mul in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        found = _match_halves(g, plain_mul, rotated_mul, head_dim, position_ids)
        if found is not None:
            return found
    return None


def _match_halves(g: ModelGraph, plain_mul: str, rotated_mul: str, head_dim: int, position_ids: str):
    plain, rotated = g.node(plain_mul, "Mul"), g.node(rotated_mul, "Mul")
    if plain is None or rotated is None:
        return None
    for x, cos in ((plain.input[0], plain.input[1]), (plain.input[1], plain.input[0])):
        for turned, sin in ((rotated.input[0], rotated.input[1]), (rotated.input[1], rotated.input[0])):
            if not _is_rotate_half(g, turned, x, head_dim):
                continue
            cos_freq = _trig_frequencies(g, cos, "Cos", position_ids, head_dim)
            sin_freq = _trig_frequencies(g, sin, "Sin", position_ids, head_dim)
            if cos_freq is not None and cos_freq == sin_freq:
                return Rotary(x=x, inv_freq=cos_freq, inv_freq_values=g.constant(cos_freq).astype(np.float32))
    return None


def _is_rotate_half(g: ModelGraph, value: str, x: str, head_dim: int) -> bool:
    """value == Concat(Neg(x[..., D/2:]), x[..., :D/2], axis=-1) over the last axis of a 4-D x."""
    concat = g.node(value, "Concat")
    if concat is None or len(concat.input) != 2 or _attr(concat, "axis") not in (-1, 3):
        return False
    neg = g.node(concat.input[0], "Neg")
    if neg is None:
        return False
    half = head_dim // 2
    return _is_slice(g, neg.input[0], x, half, None) and _is_slice(g, concat.input[1], x, 0, half)


def _is_slice(g: ModelGraph, value: str, x: str, start: int, end: int | None) -> bool:
    node = g.node(value, "Slice")
    if node is None or node.input[0] != x or len(node.input) < 4:
        return False
    starts, ends, axes = g.ints(node.input[1]), g.ints(node.input[2]), g.ints(node.input[3])
    steps = g.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if starts != [start] or axes not in ([3], [-1]) or steps != [1] or ends is None or len(ends) != 1:
        return False
    return ends[0] >= _BIG if end is None else ends[0] == end


def _trig_frequencies(g: ModelGraph, value: str, trig: str, position_ids: str, head_dim: int) -> str | None:
    """inv_freq's initializer name if value == Unsqueeze(trig(Concat(f, f)), 1) with f as above."""
    unsqueeze = g.node(value, "Unsqueeze")
    if unsqueeze is None or g.ints(unsqueeze.input[1]) != [1]:
        return None
    wave = g.node(unsqueeze.input[0], trig)
    concat = None if wave is None else g.node(wave.input[0], "Concat")
    if concat is None or len(concat.input) != 2 or concat.input[0] != concat.input[1] or \
            _attr(concat, "axis") not in (-1, 2):
        return None
    mul = g.node(concat.input[0], "Mul")
    if mul is None:
        return None
    for positions, freq in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        values = g.constant(freq)
        if values is None or values.shape != (head_dim // 2,) or not _positions_of(g, positions, position_ids):
            continue
        return freq
    return None


def _positions_of(g: ModelGraph, value: str, position_ids: str) -> bool:
    """value == Cast(Unsqueeze(position_ids, -1), float): (B, L, 1) positions as floats."""
    cast = g.node(value, "Cast")
    unsqueeze = None if cast is None else g.node(cast.input[0], "Unsqueeze")
    return unsqueeze is not None and unsqueeze.input[0] == position_ids and g.ints(unsqueeze.input[1]) in ([-1], [2]) \
        and _attr(cast, "to") == onnx.TensorProto.FLOAT


def rotary_caches(inv_freq: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) caches (length, D/2): row p holds cos/sin(p · inv_freq), computed in float32 as
    the graph computes its position · inv_freq product."""
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _attr(node, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


__all__ = ["ModelGraph", "Rotary", "match_rotary", "rotary_caches"]
