"""Where `add_kv_cache` attaches the cache: fused `fxforge::attention` nodes or eager attention.

A site knows its current (un-repeated) key and value nodes, (B, Hkv, L, D), and how to make the
attention read the full keys/values `cat(past, new)` and a tree mask instead. Two kinds:

- `FusedSite`: an `fxforge::attention` node; the tree mask goes in its mask argument and its
  causal triangle is bottom-right aligned, so new queries see the whole past.
- `EagerSite`: attention left as the model wrote it (the graph was not fused, or a subgraph
  `fuse_attention` could not prove, e.g. a tanh soft-cap), anchored at a softmax that weights
  values:  softmax(modifiers(Q @ Kᵀ) + mask) @ V. The keys are cached before the transpose and
  the GQA head repetition (whose expand/reshape sizes are rewritten to the cached length), and
  the model's causal mask is replaced by the tree mask in the form it was used (additive,
  `where` condition, or `masked_fill` condition). The model's own matmuls and softmax stay.

Either kind records `window`: the width w of a mask the analyser proves to be a causal sliding
window (0 <= i - j < w), which the tree mask must keep (`window.WindowMasks`); None otherwise.
A mask the analyser cannot read is still replaced (see `_window`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from fxforge.ir.ancestors import ancestors
from fxforge.errors import PassError
from fxforge.passes.attention.rules import (
    SOFTMAX_TARGETS, MaskMatch, fake, mask_candidates, peel_repeat_kv, peel_scales,
    probabilities, sink_columns, skip_identities, skip_score_identities,
)
from fxforge.passes.attention.masks import explain_mask, mask_sources_placeholder
from fxforge.passes.attention.match_helpers import MATMULS, Skip, value_matmul
from fxforge.passes.kv_cache.bias import BiasExtender, input_dependence

aten = torch.ops.aten
# Element-wise score modifiers a cache does not care about (Gemma-style soft-capping).
_SCORE_PASS_THROUGH = (aten.tanh.default,)


_ATTENTION_ARGS = ("q", "k", "v", "attn_mask", "is_causal", "scale", "num_kv_groups", "bias")


def _attention_args(node: Node) -> tuple:
    """The op's 8 arguments (bias None when the call leaves it out)."""
    values = list(node.args) + [node.kwargs.get(n) for n in _ATTENTION_ARGS[len(node.args):]]
    return tuple(values)


def _require_causal_only(mask: Node, attention: Node, pass_name: str) -> None:
    source = mask_sources_placeholder(mask)
    if source is not None:
        raise PassError(
            f"pass '{pass_name}': the mask of attention '{attention.name}' is computed from "
            f"{input_dependence(mask, source)}. The cached graph builds its own causal/tree mask.",
            pass_name=pass_name, node=attention.name)


def _require_some_key_hidden(masks: list, scores: Node, where: str, pass_name: str, softmax: Node) -> None:
    """Refuse a mask that provably hides no key (BERT's all-ones mask, traced without a padding
    mask): that attention is bidirectional, and caching it would let a token see only the past.
    The same verdict as the fused path, where `fuse_attention` drops such a mask and leaves
    `is_causal=False`, which `FusedSite.of` refuses. A mask the analyser cannot read is kept
    (as the fused path keeps it), so decoders with unusual causal masks still cache."""
    scores_val = fake(scores)
    verdicts = [explain_mask(m, softmax.graph.owning_module, scores_val.shape[-2], scores_val.shape[-1])
                for m in masks]
    verdict = verdicts[0]
    if all(v.kind == "all" for v in verdicts):
        raise PassError(f"pass '{pass_name}': {where} is not causal ({verdict.reason}: every token sees every "
                        "other, as in an encoder); a KV cache applies to causal decoders only.",
                        pass_name=pass_name, node=softmax.name)


def _window(masks: list, lq: object, lk: object, graph: Graph, pass_name: str = "add_kv_cache") -> int | None:
    """The narrowest sliding window the analyser proves among `masks` (None: none is one).

    A mask the analyser proves nothing about is still replaced by the causal/tree mask (refusing
    it would also refuse Falcon-ALiBi and MPT masks the analyser cannot read yet); what else it
    hides (a window spelled in ops it has no rule for) is then lost. An unproven mask built with
    chunking arithmetic (Llama 4's chunks) is refused by name."""
    # pattern only: the tree mask replaces the mask, so its fill value (-1e9, -1e4) does not matter
    verdicts = [explain_mask(m, graph.owning_module, lq, lk, pattern_only=True) for m in masks]
    for mask, verdict in zip(masks, verdicts):
        if verdict.kind is None and isinstance(mask, Node):
            _refuse_chunked(mask, pass_name)
    windows = [v.window for v in verdicts if v.kind == "sliding_window"]
    return min(windows) if windows else None


# Position arithmetic that cuts the sequence into chunks (Llama 4's chunked attention:
# floor(i / c) == floor(j / c)); the tree mask that replaces an unproven mask cannot keep it.
_CHUNKING_OPS = (aten.floor_divide.default, aten.remainder.Scalar, aten.remainder.Tensor,
                 aten.fmod.Scalar, aten.fmod.Tensor)


def _refuse_chunked(mask: Node, pass_name: str) -> None:
    """Refuse an unproven mask built with chunking arithmetic: replacing it would silently drop
    the chunk boundaries (cached decoding goes wrong past the first chunk)."""
    for node in ancestors(mask):
        floor_div = node.target == aten.div.Tensor_mode and node.kwargs.get("rounding_mode") in ("floor", "trunc")
        if node.target in _CHUNKING_OPS or floor_div:
            raise PassError(
                f"pass '{pass_name}': the attention mask '{mask.name}' ({mask.meta.get('module_path', '')}) "
                f"is built with '{node.name}' ({node.target}), chunked attention (tokens see only their own "
                "chunk of the sequence, as Llama 4's local layers): the cache's causal/tree mask would drop "
                "the chunk boundaries, so add_kv_cache does not support it yet.",
                pass_name=pass_name, node=mask.name)


def _unrepeat(x: Node) -> tuple[Node, int, list[tuple[Node, int]]]:
    """(un-repeated K or V, groups, [(node, index of its length in the size list)]) for GQA
    repetition `reshape(expand(unsqueeze(x, 2), [B, Hkv, g, L, D]), [B, H, L, D])`.

    The size lists hold the traced length L: once x is the cached K/V they must say P + L.
    """
    source, groups = peel_repeat_kv(x)
    if groups == 1 or not isinstance(source, Node):
        return x, 1, []
    reshape = skip_identities(x)
    if reshape.target == aten.repeat_interleave.self_int:
        return source, groups, []
    expand = skip_identities(reshape.args[0])
    return source, groups, [(expand, 3), (reshape, 2)]


# --------------------------------------------------------------------------- fused


@dataclass
class FusedSite:
    """One `fxforge::attention` node."""

    node: Node
    k: Node
    v: Node
    groups: int
    pass_name: str = "add_kv_cache"
    window: int | None = None  # a proven sliding window the tree mask must keep


    @classmethod
    def of(cls, node: Node, pass_name: str) -> "FusedSite":
        q, k, v, mask, causal, _scale, groups, _bias = _attention_args(node)
        window = None
        if isinstance(mask, Node):
            _require_causal_only(mask, node, pass_name)
            window = _window([mask], fake(q).shape[-2], fake(k).shape[-2], node.graph, pass_name)
        elif not causal:
            raise PassError(
                f"pass '{pass_name}': attention '{node.name}' ({node.meta.get('module_path', '')}) is not "
                "causal; a KV cache applies to causal decoders only.", pass_name=pass_name, node=node.name)
        # Cache Hkv heads, not their GQA copies: the op repeats them itself.
        k_source, k_groups = peel_repeat_kv(k)
        v_source, v_groups = peel_repeat_kv(v)
        if k_groups == v_groups > 1 and isinstance(k_source, Node) and isinstance(v_source, Node):
            k, v, groups = k_source, v_source, groups * k_groups
        return cls(node, k, v, groups, pass_name, window)

    @property
    def anchor(self) -> Node:
        """The node that places this attention in the graph (for layer order)."""
        return self.node

    @property
    def dtype(self) -> torch.dtype:
        return self.node.args[0].meta["val"].dtype

    def rewire(self, graph: Graph, full_k: Node, full_v: Node, tree_mask: Node,
               biases: BiasExtender | None = None) -> None:
        q, _k, _v, _mask, _causal, scale, _groups, bias = _attention_args(self.node)
        args = (q, full_k, full_v, tree_mask, True, scale, self.groups)
        if isinstance(bias, Node):
            biases = biases or BiasExtender(graph, tree_mask, self.pass_name)
            args += (biases.extend(bias, self.node),)
        self.node.args = args
        self.node.kwargs = {}


# --------------------------------------------------------------------------- eager


@dataclass
class EagerSite:
    """One unfused attention: its softmax, score matmul, mask use and K/V sources."""

    softmax: Node
    scores: Node                      # Q @ Kᵀ
    masks: list[MaskMatch]            # each is replaced by the tree mask (GPT-Neo applies two)
    k: Node
    v: Node
    k_sizes: list[tuple[Node, int]]
    v_sizes: list[tuple[Node, int]]
    window: int | None = None  # a proven sliding window the tree mask must keep

    @property
    def anchor(self) -> Node:
        """The node that places this attention in the graph (for layer order)."""
        return self.softmax

    @property
    def dtype(self) -> torch.dtype:
        return fake(self.scores).dtype

    def rewire(self, graph: Graph, full_k: Node, full_v: Node, tree_mask: Node,
               biases: BiasExtender | None = None) -> None:
        for old, full, sizes in ((self.k, full_k, self.k_sizes), (self.v, full_v, self.v_sizes)):
            old.replace_all_uses_with(full, delete_user_cb=lambda user, full=full: user is not full)
            if sizes:
                with graph.inserting_after(full):
                    length = graph.call_function(aten.sym_size.int, (full, 2))
                for node, index in sizes:
                    shape = list(node.args[1])
                    shape[index] = length
                    node.args = (node.args[0], shape, *node.args[2:])
        for mask in self.masks:
            self._replace_mask(graph, tree_mask, mask)

    def _replace_mask(self, graph: Graph, tree_mask: Node, mask: MaskMatch) -> None:
        node = mask.node
        with graph.inserting_before(node):
            if node.target == aten.add.Tensor:
                # additive: 0 where visible, the dtype's lowest value elsewhere (as HF builds it)
                zeros = graph.call_function(aten.zeros_like.default, (tree_mask,), {"dtype": self.dtype})
                hidden = graph.call_function(aten.logical_not.default, (tree_mask,))
                additive = graph.call_function(aten.masked_fill.Scalar,
                                               (zeros, hidden, torch.finfo(self.dtype).min))
                node.args = tuple(additive if a is mask.mask else a for a in node.args)
            elif node.target in (aten.where.self, aten.where.ScalarOther):
                node.args = (tree_mask, *node.args[1:])
            else:  # masked_fill(scores, hidden, value)
                hidden = graph.call_function(aten.logical_not.default, (tree_mask,))
                node.args = (node.args[0], hidden, *node.args[2:])


def _walk_to_scores(node: object) -> tuple[Node, list[MaskMatch]] | None:
    """(Q @ Kᵀ, masks on the way) walking up from a softmax input, None if it is not one.

    Looked through as well: S + 0, a floor at the lowest value, the row maximum subtracted, and
    appended attention-sink columns (none depends on the key length, so they stay as they are)."""
    node, _, _ = peel_scales(skip_score_identities(node))
    node = skip_score_identities(node)
    if isinstance(node, Node) and node.target in MATMULS:
        return node, []
    if isinstance(node, Node) and node.target in _SCORE_PASS_THROUGH:
        return _walk_to_scores(node.args[0])
    sink = sink_columns(node)
    if sink is not None:
        return _walk_to_scores(sink[0])
    if not isinstance(node, Node):
        return None
    for candidate in mask_candidates(node):
        found = _walk_to_scores(candidate.scores)
        if found is not None:
            return found[0], found[1] + [candidate]
    return None


def _mask_operand(match: MaskMatch) -> Node:
    """The mask as the graph feeds it to the masking node (before any rewriting into op form)."""
    node = match.node
    if node.target == aten.add.Tensor:
        return match.mask
    return node.args[0] if node.target in (aten.where.self, aten.where.ScalarOther) else node.args[1]


def _key_transpose(scores: Node) -> Node | None:
    kt, _, _ = peel_scales(scores.args[1])
    if isinstance(kt, Node) and kt.target == aten.transpose.int and \
            sorted(int(d) % 4 for d in kt.args[1:3]) == [2, 3]:
        return kt
    return None


def eager_sites(graph: Graph, pass_name: str) -> list[EagerSite]:
    """Every softmax-weighted value matmul in `graph`, read as a cacheable attention.

    Raises PassError naming the softmax when an attention cannot be cached: its keys are not
    `K.transpose(-2, -1)`, it has no mask (not causal), several masks, or a padding mask.
    """
    sites = []
    for softmax in [n for n in graph.nodes if n.op == "call_function" and n.target in SOFTMAX_TARGETS]:
        try:
            # past a bf16/fp16 model's cast back from fp32, and past the slice dropping sink columns
            pv = value_matmul(probabilities(softmax), through_sinks=True)
        except Skip as e:
            raise PassError(f"pass '{pass_name}': cannot cache attention at softmax '{softmax.name}': {e}",
                            pass_name=pass_name, node=softmax.name) from e
        scores_val = fake(softmax.args[0])
        where = f"attention at softmax '{softmax.name}' ({softmax.meta.get('module_path', '')})"
        if pv is not None and scores_val is not None and scores_val.dim() == 3:
            raise PassError(f"pass '{pass_name}': {where} runs on head-merged (B·H, Lq, Lk) scores; the eager "
                            "cache needs (B, H, L, D) keys: run `fuse_attention` first, whose op caches this "
                            "layout.", pass_name=pass_name, node=softmax.name)
        if pv is None or scores_val is None or scores_val.dim() != 4:
            continue  # a softmax that weights no values (a router, a classifier), or not over 4-D scores
        found = _walk_to_scores(softmax.args[0])
        if found is None:
            raise PassError(f"pass '{pass_name}': {where}: could not find the Q·Kᵀ matmul above the softmax "
                            "through scales, soft-caps and masks.", pass_name=pass_name, node=softmax.name)
        scores, masks = found
        if not masks:
            raise PassError(f"pass '{pass_name}': {where} has no mask, so it is not causal; a KV cache "
                            "applies to causal decoders only.", pass_name=pass_name, node=softmax.name)
        for mask in masks:  # several (GPT-Neo's buffer where-mask, then the causal mask): each becomes the tree mask
            _require_causal_only(_mask_operand(mask), softmax, pass_name)
        _require_some_key_hidden([m.mask for m in masks], scores, where, pass_name, softmax)
        kt = _key_transpose(scores)
        if kt is None:
            raise PassError(f"pass '{pass_name}': {where}: the keys reach Q·Kᵀ as "
                            f"'{scores.args[1].name}', not as K.transpose(-2, -1); run `fuse_attention` "
                            "first, whose op caches any key layout.", pass_name=pass_name, node=softmax.name)
        k, k_groups, k_sizes = _unrepeat(kt.args[0])
        v, v_groups, v_sizes = _unrepeat(pv.args[1])
        if k_groups != v_groups:
            k, k_sizes, v, v_sizes = kt.args[0], [], pv.args[1], []  # cache the repeated heads
        qk = fake(scores)  # the masks' scores: before any sink columns the softmax input appends
        window = _window([m.mask for m in masks], qk.shape[-2], qk.shape[-1], graph, pass_name)
        sites.append(EagerSite(softmax=softmax, scores=scores, masks=masks, k=k, v=v,
                               k_sizes=k_sizes, v_sizes=v_sizes, window=window))
    return sites


__all__ = ["EagerSite", "FusedSite", "eager_sites"]
