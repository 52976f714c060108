"""Pass `add_kv_cache`: a causal LM graph -> the same graph with a KV cache.

    inputs:  input_ids (B, L)            the new tokens only
             position_ids (B, L)         their positions (prefix length + offset, or tree depths)
             tree_mask (B, 1, L, P + L)  bool, True = may attend; all past keys visible and a
                                         causal (or tree) pattern over the new tokens
             past_key_i, past_value_i    (B, Hkv, P, D) for each attention layer i
    outputs: (...original outputs..., present_key_0, present_value_0, ...)   (B, Hkv, P + L, D)

With `attention_mask=True` the graph takes an HF-style padding mask instead of the tree mask:
`attention_mask (B, P + L)` int64, 0 = padding, placed right after input_ids (the order
optimum and onnxruntime-genai use). The graph turns it into the causal mask itself
(`kv_cache/padding.py`), so left-padded batches decode as HF generate does.

Each `fxforge::attention(q, k, v, mask, causal, ...)` becomes
`fxforge::attention(q, cat(past_k, k), cat(past_v, v), tree_mask, True, ...)`: the op's causal
triangle is bottom-right aligned, so new queries see the whole past, and the tree mask narrows
that to a token's ancestors for Medusa tree verification. Attention that was not fused keeps
its own matmuls and softmax: the cache is attached before the key transpose and GQA repetition
and the tree mask replaces the model's causal mask (`sites.EagerSite`). The rotary (or
learned) position computation, which the traced graph derives from `arange(L)`, is rewired to
read `position_ids` (`positions.py` adds counted positions and table lookups).
A layer whose mask is proven a causal sliding window (0 <= i - j < w) gets the tree mask narrowed
to its window (`window.py`), so it never sees keys further back than the model does.
Graphs that mix tokens outside attention (a convolution over the sequence, an SSM scan, linear
attention) or whose mask is computed from activations are refused with the construct named
(`token_mixing.py`): a cache of keys and values cannot serve them.
TensorRT-LLM's AutoDeploy inserts its cache the same way, as a graph transform.

The input/output layout is recorded in `gm.meta[KV_META]` as a typed
`fxforge.runtime.layouts.KVCacheLayout` for the runtimes and the decoder artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
from fxforge.ir.graph import erase_dead, nodes_by_op, refresh_meta
from fxforge.ir.ops import get_op
from fxforge.ir.trace import IN_SPEC, INPUT_NAMES
from fxforge.ir.verify import Comparison, Tolerance, compare_tensors, low_precision_tolerance, run_graph
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.kv_cache.bias import KV_BIAS_TAG, BiasExtender
from fxforge.passes.kv_cache.padding import MASK_TAG, padding_tree_mask
from fxforge.passes.kv_cache.window import WindowMasks
from fxforge.passes.kv_cache.positions import rewire_counted_positions, rewire_position_table
from fxforge.passes.kv_cache.sites import FusedSite, eager_sites
from fxforge.passes.kv_cache.token_mixing import (
    refuse_sequence_convolutions, refuse_sequence_mixing, refuse_token_mixing,
)
from fxforge.passes.pipeline import run_pass
from fxforge.passes.verification import outputs_of_before
from fxforge.runtime.cache_inputs import cached_inputs, empty_past, random_past_inputs
from fxforge.runtime.layouts import KVCacheLayout
from fxforge.runtime.meta_keys import KV_META

aten = torch.ops.aten
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
# How the traced graph turns arange(L) into a position row before using it: `arange + 0`
# (HF's cache_position = arange(past, past + L)) and `unsqueeze(0)`.
_ADD_OFFSET = {aten.add.Tensor}


@register_pass
@dataclass(frozen=True)
class AddKvCache(Pass):
    """Give a causal LM graph past key/value inputs, present key/value outputs and position ids."""

    name = "add_kv_cache"
    # True: take `attention_mask` (B, P + L), 0 = padding, instead of the bool tree mask
    # (the conventional decoder interface; Medusa tree decoding needs the tree mask).
    attention_mask: bool = False
    verify_accepts_earlier_graph = True  # `verify` reads only the outputs of the graph before

    def tolerance(self) -> Tolerance:
        # Cached and uncached runs sum the same products in a different order.
        return Tolerance(max_abs=1e-4, rtol=1e-4)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if KV_META in gm.meta:
            raise PassError("pass 'add_kv_cache': the graph already has a KV cache; run it once.",
                            pass_name=self.name)
        refuse_token_mixing(gm, self.name)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ids = self._input_ids(placeholders)
        refuse_sequence_convolutions(gm, ids, self.name)
        attention = get_op("attention").overload
        # Fused attention takes the tree mask as an argument; attention left unfused (not run
        # through fuse_attention, or unprovable there) is cached in place, with its own ops.
        # A graph may hold both; layers are numbered in graph order either way.
        fused = [FusedSite.of(n, self.name) for n in nodes_by_op(gm, attention)]
        eager = eager_sites(gm.graph, self.name)
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        sites = sorted(fused + eager, key=lambda site: order[site.anchor])
        kind = "mixed" if fused and eager else "fused" if fused else "eager"
        if not sites:
            raise PassError(
                "pass 'add_kv_cache' found no attention to cache: neither an fxforge::attention node nor "
                "a softmax(Q·Kᵀ + mask) @ V subgraph. Is this a transformer decoder?", pass_name=self.name)

        graph = gm.graph
        batch, seq = ids.meta["val"].shape
        mode, shape_env = _fake_mode_of(ids)
        past_len = _new_symint(shape_env, "past_len", 7)
        total_len = past_len + seq  # the tree mask covers the past and the new tokens
        last = placeholders[-1]

        def new_input(name: str, fake: Any) -> Node:
            nonlocal last
            with graph.inserting_after(last):
                node = graph.placeholder(name)
            node.meta["val"] = fake
            last = node
            return node

        with mode:
            if self.attention_mask:
                mask = new_input("attention_mask", torch.empty(batch, total_len, dtype=torch.long))
            positions = new_input("position_ids", torch.empty(batch, seq, dtype=torch.long))
            if not self.attention_mask:
                mask = new_input("tree_mask", torch.empty(batch, 1, seq, total_len, dtype=torch.bool))
        past, present, kv_shapes = [], [], []
        for i, site in enumerate(sites):  # every placeholder first: the mask is computed after them
            k_val, v_val = site.k.meta["val"], site.v.meta["val"]
            with mode:
                past_k = new_input(f"past_key_{i}", torch.empty(batch, k_val.shape[1], past_len,
                                                                  k_val.shape[3], dtype=k_val.dtype))
                past_v = new_input(f"past_value_{i}", torch.empty(batch, v_val.shape[1], past_len,
                                                                    v_val.shape[3], dtype=v_val.dtype))
            past.append((past_k, past_v))
        if self.attention_mask:
            with mode:
                tree_val = torch.empty(batch, 1, seq, total_len, dtype=torch.bool)
            tree_mask = padding_tree_mask(graph, last, ids, mask, tree_val)
        else:
            tree_mask = mask
        biases = BiasExtender(graph, tree_mask, self.name)  # one copy of a bias shared by layers
        # sliding-window layers see the tree mask narrowed to their window, built once per width
        windows = WindowMasks(graph, tree_mask, positions, tree_mask if self.attention_mask else last,
                              by_columns=self.attention_mask)
        for site, (past_k, past_v) in zip(sites, past):
            k_val, v_val = site.k.meta["val"], site.v.meta["val"]
            full = []
            for new, old in ((past_k, site.k), (past_v, site.v)):
                with graph.inserting_after(old):
                    node = graph.call_function(aten.cat.default, ([new, old], 2))
                node.meta["module_path"] = old.meta.get("module_path", "")
                full.append(node)
            site.rewire(graph, full[0], full[1], windows.mask(site.window), biases)
            present.append(tuple(full))
            kv_shapes.append((int(k_val.shape[1]), int(k_val.shape[3]), int(v_val.shape[3])))

        erase_dead(gm)  # the old causal-mask construction is now unused
        rewired = _rewire_positions(gm, ids, positions, self.name)
        refresh_meta(gm)  # shapes of the cached graph: its attention contracts over P + L keys
        refuse_sequence_mixing(gm, ids, past_len, self.name)

        output = graph.output_node()
        outputs = tuple(output.args[0])
        flat_present = [t for pair in present for t in pair]
        output.args = (outputs + tuple(flat_present),)
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
        index = {name: i for i, name in enumerate(names)}
        gm.meta[INPUT_NAMES] = names
        gm.meta[IN_SPEC] = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
        gm.meta[KV_META] = KVCacheLayout(
            input_ids=index[ids.name],
            position_ids=index[positions.name],
            mask=index[mask.name],
            mask_kind="padding" if self.attention_mask else "tree",
            past=tuple((index[k.name], index[v.name]) for k, v in past),
            present=tuple((len(outputs) + 2 * i, len(outputs) + 2 * i + 1) for i in range(len(present))),
            logits_output=0,
            kv_shapes=tuple(kv_shapes),
            dtype=str(sites[0].dtype).replace("torch.", ""),
            attention=kind,
            num_inputs=len(names),
            num_outputs=len(outputs) + len(flat_present),
        )
        original_ids = ctx.example_inputs[placeholders.index(ids)] if ctx.example_inputs else None
        # the original ids after a past one longer: lengths differ, so exports stay dynamic
        example = None if original_ids is None else random_past_inputs(gm.meta[KV_META], original_ids,
                                                                        original_ids.shape[1] + 1)
        return PassResult(gm, sites=len(sites), notes={"position_sites": rewired, "inputs": names,
                                                       "attention": kind},
                          example_inputs=example)

    @staticmethod
    def _input_ids(placeholders: list[Node]) -> Node:
        tensors = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
        ids = [p for p in tensors if p.meta["val"].dtype in (torch.long, torch.int32) and p.meta["val"].dim() == 2]
        if len(tensors) != 1 or len(ids) != 1:
            raise PassError(
                "pass 'add_kv_cache' needs a graph traced with token ids alone (one (batch, seq) integer "
                f"input); this one takes {[p.name for p in placeholders]}. Trace the model as "
                "model(input_ids): padding masks are not supported by the cached graph.",
                pass_name="add_kv_cache")
        return ids[0]

    def verify(self, before: GraphModule, after: GraphModule, ctx: PassContext) -> Comparison:
        """Uncached logits == prefill of the first part + a cached step over the rest.

        On graphs with 8-bit activations, verification runs this with activations unrounded
        (fxforge/ir/activation_rounding.py; token_mixing.py says why that is sound per token)."""
        ids = next(x for x in ctx.example_inputs if isinstance(x, torch.Tensor))
        ref = outputs_of_before(before, ctx.example_inputs)[0]  # kept from the previous pass's check
        split = max(1, ids.shape[1] // 2)
        meta = after.meta[KV_META]
        empty = empty_past(meta, ids.shape[0], ref.dtype)
        first = run_graph(after, cached_inputs(meta, ids[:, :split], 0, empty))
        present = [first[i] for pair in meta.present for i in pair]
        second = run_graph(after, cached_inputs(meta, ids[:, split:], split, present))
        got = torch.cat([first[0], second[0]], dim=1) if ids.shape[1] > split else first[0]
        # bf16/fp16: a cached step rounds its partial sums like any 16-bit reordering
        return Comparison(outputs=[compare_tensors(ref, got, low_precision_tolerance(self.tolerance(), ref.dtype))])


def with_kv_cache(graph_module: GraphModule) -> GraphModule:
    """`graph_module` itself if it has a KV cache, else a copy rewritten by `add_kv_cache`."""
    if KV_META in graph_module.meta:
        return graph_module
    ids = torch.zeros(1, 8, dtype=torch.long)  # verification input: prefill 4 + cached step of 4
    return run_pass(AddKvCache(), graph_module, PassContext(example_inputs=(ids,)))


# --------------------------------------------------------------------------- helpers


def _rewire_positions(gm: GraphModule, ids: Node, positions: Node, pass_name: str) -> int:
    """Replace each `unsqueeze(arange(L) [+ 0], 0)` position row by the position_ids input."""
    rewired = 0
    # aranges of a recomputed position bias count key positions over the cache: not position rows
    aranges = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ARANGES]
    for arange in [n for n in aranges if not _ours(n)]:
        row = arange
        while len(row.users) == 1 and next(iter(row.users)).target in _ADD_OFFSET:
            row = next(iter(row.users))
        unsqueezes = [u for u in row.users if u.target == aten.unsqueeze.default and u.args[1] == 0]
        unsqueezes += [u for u in row.users if _batch_row(u, arange, positions)]  # TrOCR: arange(L).expand(B, -1)
        if not unsqueezes:
            rewired += rewire_position_table(gm, arange, positions)  # embedding(table, arange(L))
            continue
        for u in unsqueezes:
            _unbake_row_batch(u)
            u.replace_all_uses_with(positions)
            rewired += 1
    rewired += _rewire_position_buffers(gm, positions)
    rewired += rewire_counted_positions(gm, ids, positions)  # cumsum(ones / not-padding mask)
    erase_dead(gm)
    seq = ids.meta["val"].shape[1]
    leftover = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _ARANGES
                and not _ours(n) and _counts_positions(n, seq)]
    if leftover:
        raise PassError(
            f"pass '{pass_name}': could not tell how positions feed the model (arange nodes {leftover} "
            "are still used after rewiring the `unsqueeze(arange(L), 0)` position rows). Trace the "
            "model with position_ids as an input, or extend _rewire_positions.", pass_name=pass_name)
    return rewired  # 0 for a model without positional information: position_ids is then unused


_ROW_LOOKUP = {aten.add.Tensor, aten.view.default, aten.reshape.default, aten.index_select.default,
               aten.embedding.default}


def _unbake_row_batch(row: Node, depth: int = 4) -> None:
    """The (1, L) position row becomes (B, L): a view of its looked-up rows that spells the
    batch as a literal 1 (XGLM: `table.index_select(0, pos.view(-1)).view(1, L, D)`) says -1."""
    frontier = list(row.users)
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if node.target not in _ROW_LOOKUP:
                continue
            if node.target in (aten.view.default, aten.reshape.default):
                shape = list(node.args[1])
                if len(shape) > 1 and shape[0] == 1 and -1 not in shape:
                    node.args = (node.args[0], [-1, *shape[1:]])
            nxt.extend(node.users)
        frontier = nxt


def _batch_row(node: Node, arange: Node, positions: Node) -> bool:
    """Whether `node` is `arange(0, L).expand(B, -1)`: the (B, L) position rows of the batch."""
    start = 0 if arange.target == aten.arange.default else arange.args[0]
    val, want = node.meta.get("val"), positions.meta["val"]
    return (node.target == aten.expand.default and start == 0 and isinstance(val, torch.Tensor)
            and val.dim() == 2 and same_length(val.shape[0], want.shape[0])
            and same_length(val.shape[1], want.shape[1]))


def _rewire_position_buffers(gm: GraphModule, positions: Node) -> int:
    """Replace `position_ids_buffer[:, :L]` (BERT-style embeddings keep arange(max_len) as a
    (1, N) buffer and slice the first L of it) by the position_ids input."""
    from fxforge.ir.graph import get_attr

    rewired = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.slice.Tensor:
            continue
        source, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else 0
        if not (isinstance(source, Node) and source.op == "get_attr" and dim in (1, -1) and start in (0, None)):
            continue
        buffer = get_attr(gm, source.target)
        if not (isinstance(buffer, torch.Tensor) and buffer.dim() == 2 and buffer.shape[0] == 1
                and not buffer.is_floating_point()):
            continue
        if not torch.equal(buffer[0], torch.arange(buffer.shape[1], dtype=buffer.dtype)):
            continue  # token-type ids and other buffers: the same for every position
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or same_length(val.shape[1], positions.meta["val"].shape[1]) is False:
            continue
        node.replace_all_uses_with(positions)
        rewired += 1
    for gather in [u for u in positions.users if u.target == aten.gather.default]:
        # buffer.expand(1, -1).gather(1, positions) (token-type ids looked up by position): the
        # traced batch of the position row was 1; it is now the batch of position_ids
        expand = gather.args[0]
        if isinstance(expand, Node) and expand.target == aten.expand.default and list(expand.args[1])[:1] == [1]:
            with gm.graph.inserting_before(expand):
                batch = gm.graph.call_function(aten.sym_size.int, (positions, 0))
            expand.args = (expand.args[0], [batch, *list(expand.args[1])[1:]])
    return rewired


def same_length(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) lengths are provably equal."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    import sympy

    return sympy.simplify(a.node.expr - b.node.expr) == 0


def _ours(node: Node) -> bool:
    """Nodes this pass built (bias copies over the cache, the padding mask): not position rows."""
    return bool(node.meta.get(KV_BIAS_TAG) or node.meta.get(MASK_TAG))


def _counts_positions(arange: Node, seq: Any) -> bool:
    """Whether an arange is as long as the sequence (up to a constant): a position count.

    A fixed length (ALiBi's head slopes, arange(1, H + 1)) counts no positions, nor does one over
    the batch or over every routed token (a MoE dispatch's arange(B·L·k) that inverts its sort):
    those index the tokens of the current call, which the cached graph still has."""
    val = arange.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 1:
        return True  # unknown: report it rather than guess
    length = val.shape[0]
    if isinstance(length, int):
        return False
    if isinstance(seq, int):
        return True
    import sympy

    offset = sympy.simplify(length.node.expr - seq.node.expr)
    return bool(offset.is_number)


def _fake_mode_of(node: Node) -> tuple[Any, Any]:
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([node.meta["val"]])
    if mode is None or mode.shape_env is None:
        raise PassError("pass 'add_kv_cache' needs a graph traced by fxforge.ir.trace (symbolic shape "
                        "metadata on the inputs).", pass_name="add_kv_cache")
    return mode, mode.shape_env


def _new_symint(shape_env: Any, name: str, hint: int) -> Any:
    """A fresh dynamic dimension (the past length is independent of every traced dim)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    source = ConstantSource(f"fxforge_{name}")
    symbol = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
    return shape_env.create_symintnode(symbol, hint=hint, source=source)


__all__ = ["AddKvCache", "with_kv_cache"]
