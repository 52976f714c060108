"""KV-cached attention in an exported decoder -> com.microsoft::GroupQueryAttention.

The decoder artifact's graph (`add_kv_cache(attention_mask=True)` + `fuse_attention`) exports
each layer's attention as

    present.i.key   = Concat(past_key_values.i.key,   k_new, axis=2)      (B, Hkv, P + L, D)
    present.i.value = Concat(past_key_values.i.value, v_new, axis=2)
    y = Attention(q, present.i.key, present.i.value, mask_i)               (B, H, L, D)

where mask_i is the padding mask built from `attention_mask` (padding.py) AND the bottom-right
causal triangle, rebuilt per layer from the Concat's shape. This rewrite, on the ModelProto
(weights untouched, so external data stays where it is), makes that

    y', present.i.key, present.i.value = GroupQueryAttention(q', k_new', v_new',
        past_key_values.i.key, past_key_values.i.value, seqlens_k, total_sequence_length,
        attention_bias=padding_bias)

with q' = (B, L, H·D) etc., the cache in the op (BNSH, the artifact's layout) and the causal
triangle the op's own (`causal` is GQA's only mode; it is bottom-right aligned at the absolute
position P + s of query s, as fxforge::attention is).

Padding: GQA reads `seqlens_k[b] + 1` as row b's valid key count and places the new tokens at
seqlens_k[b] + 1 - L, i.e. it assumes *right* padding; the artifact's batches are *left*
padded (HF generate). So every row is declared full (seqlens_k = T - 1, T = total length) and
the padding goes in the additive `attention_bias` (B, 1, L, T): 0 where key j is a token
(attention_mask[b, j] != 0) or the query itself (j == P + i), the lowest float elsewhere (not
-inf, so no row can become NaN; exp underflows to exactly 0 next to any visible key): exactly
padding.py's mask, whose "or itself" clause keeps every row non-empty. seqlens_k,
total_sequence_length and the bias are computed once from `attention_mask`, shared by layers.

Rotary: where q and k are rotated by exactly Hugging Face's rotary embedding read at
`position_ids` (`decoder_rotary.match_rotary`), the op rotates them itself (do_rotary, with
cos/sin caches of `rotary_length` positions computed from the graph's inv_freq, and the
position_ids input so left-padded rows keep their positions). Otherwise, or without
`rotary_length`, the model's own rotary ops stay in front of the op.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxforge.backends.onnx.decoder_rotary import ModelGraph, match_rotary, rotary_caches

MS_DOMAIN = "com.microsoft"
_FLOAT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass(frozen=True)
class CachedAttention:
    """What the FX graph says about the attention of one cached layer (ONNX has no head counts)."""

    q_heads: int
    kv_heads: int
    head_dim: int


def fuse_group_query_attention(model: onnx.ModelProto, layers: dict[str, CachedAttention], *,
                               attention_mask: str = "attention_mask", input_ids: str = "input_ids",
                               position_ids: str = "position_ids", dtype: str = "float32",
                               rotary_length: int | None = None, base_dir: str | None = None,
                               shapes: dict[str, tuple] | None = None) -> int:
    """Rewrite, in place, each `Attention` over `Concat(past key input, new)` whose past key input
    is a key of `layers` (with its value partner) into GroupQueryAttention; returns how many.

    `layers` maps a past-key graph input name (`past_key_values.{i}.key`) to its layer's heads;
    only layers whose FX attention reads the padding mask alone (no bias, causal) belong in it,
    so the mask can be rebuilt from `attention_mask`. The rest keep today's lowering.
    `rotary_length`: positions the rotary caches cover (the model's context length); None
    leaves rotary outside the op. `base_dir`: the directory of the model's external data (the
    rotary frequencies may be stored there). `shapes`: symbolic shapes of the graph's values
    (`reshape_chains.value_shapes` of the exporter's value_info); the shapes of the values this
    rewrite makes are added to it, so `reshape_chains.collapse_reshapes` can then drop the head
    split/merge Reshapes around the op that cancel out.
    """
    shapes = {} if shapes is None else shapes
    if dtype not in _FLOAT_TYPES:
        return 0  # GQA's CPU kernel takes float32/float16 only: keep the standard Attention
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    matcher = ModelGraph(model, base_dir)
    graph_inputs = {i.name for i in graph.input}
    names = _Names(graph)
    shared: list[onnx.NodeProto] = []
    lengths: tuple[str, str, str] | None = None
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(old Attention) -> its replacement nodes
    dead: set[int] = set()
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match_cached(node, producer, graph_inputs, layers)
        if match is None:
            continue
        key_concat, value_concat, heads = match
        if lengths is None:
            lengths = _padding_inputs(shared, names, attention_mask, input_ids, _FLOAT_TYPES[dtype])
        rotary = None
        if rotary_length:
            rotary = _layer_rotary(matcher, node.input[0], key_concat.input[1], heads, position_ids,
                                   rotary_length, names, _FLOAT_TYPES[dtype])
        # the exporter turns the (B, H, L, D) result back to (B, L, H, D) right away: when that
        # Transpose is its only reader, GQA's (B, L, H·D) output feeds it reshaped, transposes skipped
        back = readers.get(node.output[0], [])
        to_sequence = back if back and node.output[0] not in outputs and all(_is_head_swap(t) for t in back) else []
        replaced[id(node)] = _gqa_nodes(node, key_concat, value_concat, heads, lengths, names, rotary,
                                        producer, [t.output[0] for t in to_sequence], shapes)
        dead |= {id(node), id(key_concat), id(value_concat)} | {id(t) for t in to_sequence}
    if not replaced:
        return 0
    nodes = list(shared)
    for node in graph.node:
        if id(node) in replaced:
            nodes += replaced[id(node)]
        elif id(node) not in dead:
            nodes.append(node)
    del graph.node[:]
    graph.initializer.extend(names.initializers)
    graph.node.extend(_topological(_live(nodes, {o.name for o in graph.output}), graph))
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]  # the old masks' constants
    for init in unused:
        graph.initializer.remove(init)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced)


def pack_qkv_inputs(model: onnx.ModelProto, shapes: dict[str, tuple]) -> int:
    """GroupQueryAttention nodes whose query, key and value are the three parts of one Split of a
    (B, L, (H + 2·Hkv)·D) value (a `fuse_projections` q/k/v projection) read that value whole,
    as the op's packed-QKV input (key and value left empty): the Split goes. Returns how many.

    Checked from `shapes` (symbolic shapes): the Split cuts the last axis of a rank-3 value into
    exactly the query (H·D), key and value (Hkv·D each) widths, in that order, which is the
    packed layout the op reads.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    packed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN or len(node.input) < 3:
            continue
        split = producer.get(node.input[0])
        if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") or \
                list(split.output) != list(node.input[:3]):
            continue
        source = shapes.get(split.input[0])
        parts = [shapes.get(name) for name in split.output]
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        if source is None or len(source) != 3 or any(p is None or len(p) != 3 for p in parts) or \
                _axis(split) not in (2, -1):
            continue
        q, k, v = (p[2] for p in parts)
        heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
        if not all(isinstance(w, int) for w in (q, k, v)) or not heads or not kv_heads or \
                q % heads or k != v or k * heads != q * kv_heads or source[2] != q + k + v:
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        packed += 1
    if packed:
        needed = {o.name for o in graph.output}
        keep = []
        for node in reversed(graph.node):  # the Splits nothing reads any more
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        del graph.node[:]
        graph.node.extend(reversed(keep))
    return packed


# --------------------------------------------------------------------------- matching


def _match_cached(node, producer, graph_inputs, layers):
    """(key Concat, value Concat, heads) when `node` attends over past + new keys of a known layer."""
    if len(node.input) < 3:
        return None
    concats = [producer.get(node.input[i]) for i in (1, 2)]
    if any(c is None or c.op_type != "Concat" or len(c.input) != 2 or _axis(c) not in (2, -2) for c in concats):
        return None
    key, value = concats
    if key.input[0] not in layers or not key.input[0].endswith(".key"):
        return None
    if value.input[0] != key.input[0][: -len("key")] + "value" or value.input[0] not in graph_inputs:
        return None
    return key, value, layers[key.input[0]]


def _axis(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


# --------------------------------------------------------------------------- building


class _Names:
    """Fresh value names and the small integer constants the rewrite needs (as initializers)."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {v for n in graph.node for v in (*n.input, *n.output)}
        self.taken |= {i.name for i in (*graph.input, *graph.output, *graph.initializer)}
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        name, i = f"gqa_{base}", 0
        while name in self.taken:
            i += 1
            name = f"gqa_{base}_{i}"
        self.taken.add(name)
        return name

    def ints(self, values: list[int], scalar: bool = False, dtype: type = np.int64) -> str:
        key = (np.dtype(dtype).name, tuple(values), scalar)
        if key not in self._constants:
            array = np.array(values[0] if scalar else values, dtype=dtype)
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def rotary(self, inv_freq: str, values: np.ndarray, length: int, elem_type: int) -> tuple[str, str]:
        """(cos_cache, sin_cache) initializers for these frequencies, shared by layers."""
        key = ("rotary", inv_freq, length, elem_type)
        if key not in self._constants:
            dtype = np.float16 if elem_type == TensorProto.FLOAT16 else np.float32
            names = []
            for cache, base in zip(rotary_caches(values, length), ("cos_cache", "sin_cache")):
                names.append(self.fresh(base))
                self.initializers.append(numpy_helper.from_array(cache.astype(dtype), names[-1]))
            self._constants[key] = tuple(names)
        return self._constants[key]

    def floats(self, value: float | str, elem_type: int) -> str:
        """A scalar of the activations' float type; "lowest": its most negative finite value."""
        key = ("f", value, elem_type)
        if key not in self._constants:
            dtype = np.float16 if elem_type == TensorProto.FLOAT16 else np.float32
            value = np.finfo(dtype).min if value == "lowest" else value
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
            self._constants[key] = name
        return self._constants[key]


def _padding_inputs(nodes, names: _Names, attention_mask: str, input_ids: str, elem_type: int):
    """(seqlens_k, total_sequence_length, attention_bias), built once from attention_mask."""
    def add(op, inputs, base, **attrs):
        out = names.fresh(base)
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    total = add("Shape", [attention_mask], "total", start=1, end=2)        # (1,) int64: T
    batch = add("Shape", [attention_mask], "batch", start=0, end=1)        # (1,) int64: B
    new = add("Shape", [input_ids], "new", start=1, end=2)                 # (1,) int64: L
    # the op's lengths are int32; computed in int32 from the start, they need no Cast each
    total32 = add("Cast", [total], "total32", to=TensorProto.INT32)
    new32 = add("Cast", [new], "new32", to=TensorProto.INT32)
    total_i32 = add("Squeeze", [total32], "total_sequence_length")         # scalar int32
    seqlens = add("Expand", [add("Sub", [total32, names.ints([1], dtype=np.int32)], "last"), batch],
                  "seqlens_k")                                             # (B,) T - 1: every row full
    past = add("Squeeze", [add("Sub", [total32, new32], "past1")], "past")  # P = T - L
    one = names.ints([1], scalar=True, dtype=np.int32)
    keys = add("Range", [names.ints([0], scalar=True, dtype=np.int32), total_i32, one], "keys")
    queries = add("Range", [past, total_i32, one], "queries")
    itself = add("Equal", [add("Unsqueeze", [keys, names.ints([0])], "key_row"),
                           add("Unsqueeze", [queries, names.ints([1])], "query_col")], "itself")  # (L, T)
    token = add("Cast", [attention_mask], "is_token", to=TensorProto.BOOL)  # nonzero: a token
    token = add("Unsqueeze", [token, names.ints([1, 2])], "token4d")                # (B, 1, 1, T)
    visible = add("Or", [token, itself], "visible")                                   # (B, 1, L, T)
    bias = add("Where", [visible, names.floats(0.0, elem_type), names.floats("lowest", elem_type)],
               "attention_bias")
    # every row's L new tokens are valid: the CPU kernel needs this to take a batch of
    # multi-token chunks over a past (a left-padded prompt continued, check_decoder_onnx's step)
    query_seqlens = add("Expand", [new32, batch], "query_seqlens")
    return seqlens, total_i32, bias, query_seqlens


def _layer_rotary(matcher, query, key, heads, position_ids, length, names, elem_type):
    """(un-rotated q, un-rotated k, {GQA rotary inputs and attributes}) when both are HF rotary
    with the same frequencies, else None."""
    if heads.head_dim % 16:
        return None  # ORT's kernel rotates only head sizes that are multiples of 16
    q_rot = match_rotary(matcher, query, heads.head_dim, position_ids)
    k_rot = match_rotary(matcher, key, heads.head_dim, position_ids)
    if q_rot is None or k_rot is None or not np.array_equal(q_rot.inv_freq_values, k_rot.inv_freq_values):
        return None
    cos, sin = names.rotary(q_rot.inv_freq, q_rot.inv_freq_values, length, elem_type)
    return q_rot.x, k_rot.x, {"cos": cos, "sin": sin, "position_ids": position_ids}


def _is_head_swap(node) -> bool:
    return node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and \
        [list(a.ints) for a in node.attribute if a.name == "perm"] == [[0, 2, 1, 3]]


def _gqa_nodes(attention, key_concat, value_concat, heads: CachedAttention, lengths, names: _Names,
               rotary, producer, sequence_major_outputs: list[str], shapes: dict[str, tuple]):
    """Nodes replacing one Attention and its two cache Concats (same output names).

    `sequence_major_outputs`: outputs of the (B, H, L, D) -> (B, L, H, D) Transposes that were
    the Attention's only readers; they are produced here straight from GQA's output instead.
    `shapes`: known symbolic shapes, extended with those of the (B, L, N·D) values made here.
    """
    seqlens, total, bias, query_seqlens = lengths
    nodes: list[onnx.NodeProto] = []

    def add(op, inputs, outputs, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=names.fresh(op), domain=domain, **attrs))
        return outputs[0]

    def sequence_major(x: str, base: str) -> str:  # (B, N, L, D) -> (B, L, N·D)
        made = producer.get(x)
        if made is not None and _is_head_swap(made):  # x = the exporter's (B, L, N, D) -> (B, N, L, D): undo it
            t = made.input[0]
        else:
            t = add("Transpose", [x], [names.fresh(base + "_t")], perm=[0, 2, 1, 3])
        flat = add("Reshape", [t, names.ints([0, 0, -1])], [names.fresh(base + "_bsd")])
        known = shapes.get(t)
        if known is not None and len(known) == 4 and all(isinstance(d, int) for d in known[2:]):
            shapes[flat] = (known[0], known[1], known[2] * known[3])
        return flat

    q_in, k_in = (attention.input[0], key_concat.input[1]) if rotary is None else rotary[:2]
    query = sequence_major(q_in, "query")
    key = sequence_major(k_in, "key")
    value = sequence_major(value_concat.input[1], "value")
    scale = next((a.f for a in attention.attribute if a.name == "scale"), None)
    attrs = dict(num_heads=heads.q_heads, kv_num_heads=heads.kv_heads)
    if scale is not None:
        attrs["scale"] = scale
    rotary_inputs = ["", "", ""]
    if rotary is not None:
        attrs.update(do_rotary=1, rotary_interleaved=0)
        rotary_inputs = [rotary[2]["cos"], rotary[2]["sin"], rotary[2]["position_ids"]]
    out = names.fresh("gqa_out")
    add("GroupQueryAttention",
        [query, key, value, key_concat.input[0], value_concat.input[0], seqlens, total, *rotary_inputs, bias,
         "", "", "", "", "", query_seqlens],
        [out, key_concat.output[0], value_concat.output[0]], domain=MS_DOMAIN, **attrs)
    if query in shapes:  # GQA's output is (B, L, H·D) like its query
        shapes[out] = shapes[query]
    split = names.ints([0, 0, heads.q_heads, heads.head_dim])
    if sequence_major_outputs:
        for name in sequence_major_outputs:
            add("Reshape", [out, split], [name])
    else:
        heads_split = add("Reshape", [out, split], [names.fresh("gqa_heads")])
        add("Transpose", [heads_split], [attention.output[0]], perm=[0, 2, 1, 3])
    return nodes


# --------------------------------------------------------------------------- graph hygiene


def _live(nodes, outputs: set[str]):
    """Nodes that (transitively) feed a graph output; the old per-layer masks fall away."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def _topological(nodes, graph):
    """`nodes` in an order where each reads only values already produced (stable Kahn's
    algorithm: the exporter's order is kept wherever it is already valid)."""
    import heapq

    available = {i.name for i in (*graph.input, *graph.initializer)} | {""}
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        for name in set(node.input):
            if name in available:
                continue
            if name not in producer:
                raise ValueError(f"GroupQueryAttention rewrite: value {name!r} has no producer")
            waiting[k] += 1
            readers.setdefault(producer[name], []).append(k)
    ready = [k for k, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        k = heapq.heappop(ready)
        ordered.append(nodes[k])
        for r in readers.get(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(ordered) != len(nodes):
        raise ValueError("GroupQueryAttention rewrite made the graph cyclic")
    return ordered


__all__ = ["CachedAttention", "fuse_group_query_attention", "pack_qkv_inputs"]
