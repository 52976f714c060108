"""Pass `add_medusa_heads`: extra decoding heads that guess tokens t+2 .. t+1+K (Medusa-1).

    h = input of the LM head                                  (the final hidden state)
    head_k(h) = W_k · ResBlock_k^n(h),  ResBlock(x) = x + SiLU(W1·x + b1)
    outputs: (...original outputs..., stack([head_1(h), ..., head_K(h)]))   # (K, B, L, V)

W1 and b1 start at zero and W_k is a copy of the LM head, so a fresh head reproduces the base
logits exactly (the check `verify` makes). With `share_lm_head=True` every W_k *is* the frozen LM
head (as EAGLE reuses it): the heads train their ResBlocks only and run as one projection of the
K stacked ResBlock outputs, so decoding reads one vocab matrix per step instead of K. On code-lm
(bench/medusa.py, 1500 steps) shared heads with 2 ResBlocks reach top-1 0.76/0.68/0.63/0.58 against
0.78/0.69/0.64/0.59 for own projections, train in 3/4 of the time, and decode at about the same
speed (1.59x vs 1.55x plain greedy on ONNX, 1.61x vs 1.58x eager).
Head parameters are trainable; every other parameter is frozen (Medusa-1 trains the heads only:
`fxforge.medusa.train_heads`). Where the heads' output sits and how many there are is recorded
in `gm.meta[MEDUSA_META]` as a typed `runtime.layouts.MedusaLayout` for the runtime (and the
decoding passes `split_medusa_heads` and `medusa_greedy_verify`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
from fxforge.ir.graph import add_attr, attr_node, get_attr, is_lm_head, linear_sites
from fxforge.ir.verify import Comparison, compare_outputs, compare_tensors, run_graph
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.runtime.layouts import MedusaLayout, medusa_layout
from fxforge.runtime.meta_keys import MEDUSA_META

aten = torch.ops.aten
HEADS_PREFIX = "medusa_heads"

# Ops that only reshape or cast logits on their way to the output (a slice keeping the last
# positions, a float cast): the LM head still counts as producing a graph output through them.
_PASS_THROUGH = {aten.slice.Tensor, aten.view.default, aten.reshape.default, aten.to.dtype,
                 aten._to_copy.default, aten.contiguous.default, aten.clone.default}


@dataclass
class LmHead:
    """The LM head found in a graph: its linear node and which graph output it feeds."""

    node: Node
    weight_name: str
    bias_name: str | None
    hidden_size: int
    vocab_size: int
    output_index: int


def find_lm_head(gm: GraphModule, pass_name: str = "add_medusa_heads") -> LmHead:
    """The LM head: a linear named *lm_head* or tied to the embedding, whose result is an output.

    Raises PassError saying what was looked for when no such linear exists.
    """
    outputs = list(gm.graph.output_node().args[0])
    found = []
    for site in linear_sites(gm, include_lm_head=True):
        if not is_lm_head(gm, site):
            continue
        index = _output_index(site.node, outputs)
        if index is not None:
            found.append((site, index))
    if not found:
        linears = [s.module_path for s in linear_sites(gm, include_lm_head=True)]
        raise PassError(
            f"pass '{pass_name}' found no LM head. It looks for an aten.linear whose module path "
            f"ends in 'lm_head' or whose weight is tied to the token embedding, and whose result "
            f"is a graph output (possibly through a slice/view/cast). Linear layers in this graph: "
            f"{linears or 'none'}. Medusa heads need a causal language model (e.g. LlamaForCausalLM) "
            f"whose LM head is still a float linear: quantize includes the LM head by default, so add "
            f"the heads before quantizing, or quantize with include_lm_head=False.",
            pass_name=pass_name,
        )
    site, index = found[-1]  # the last one in graph order is the one producing the logits
    return LmHead(node=site.node, weight_name=site.weight_name, bias_name=site.bias_name,
                  hidden_size=site.in_features, vocab_size=site.out_features, output_index=index)


def _output_index(node: Node, outputs: list[Any]) -> int | None:
    current = node
    while True:
        if current in outputs:
            return outputs.index(current)
        users = [u for u in current.users if u.op == "call_function" and u.target in _PASS_THROUGH]
        if len(current.users) != 1 or len(users) != 1:
            return None
        current = users[0]


@register_pass
@dataclass(frozen=True)
class AddMedusaHeads(Pass):
    """Add `num_heads` Medusa heads (each `num_layers` ResBlocks + its own or the shared LM-head projection)."""

    name = "add_medusa_heads"
    num_heads: int = 4
    num_layers: int = 1
    share_lm_head: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"add_medusa_heads: num_heads must be an integer >= 1, got {self.num_heads!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"add_medusa_heads: num_layers must be an integer >= 0 (ResBlocks per head), "
                             f"got {self.num_layers!r}")
        if not isinstance(self.share_lm_head, bool):
            raise ValueError(f"add_medusa_heads: share_lm_head must be True or False, got {self.share_lm_head!r}")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if MEDUSA_META in gm.meta:
            raise PassError("pass 'add_medusa_heads': the graph already has Medusa heads; run it once.",
                            pass_name=self.name)
        head = find_lm_head(gm, self.name)
        for p in gm.parameters():  # Medusa-1: the backbone stays frozen
            p.requires_grad_(False)
        lm_weight = get_attr(gm, head.weight_name)
        lm_bias = get_attr(gm, head.bias_name) if head.bias_name else None
        hidden = head.node.args[0]
        graph = gm.graph
        output = graph.output_node()
        head_inputs = []
        with graph.inserting_before(output):
            for k in range(self.num_heads):
                x = hidden
                for j in range(self.num_layers):
                    prefix = f"{HEADS_PREFIX}.{k}.{j}.linear"
                    zeros = lm_weight.new_zeros(head.hidden_size, head.hidden_size)
                    w = add_attr(gm, f"{prefix}.weight", zeros, buffer=False, trainable=True, before=output)
                    b = add_attr(gm, f"{prefix}.bias", lm_weight.new_zeros(head.hidden_size),
                                 buffer=False, trainable=True, before=output)
                    lin = _call(graph, aten.linear.default, (x, w, b), f"{HEADS_PREFIX}.{k}.{j}")
                    act = _call(graph, aten.silu.default, (lin,), f"{HEADS_PREFIX}.{k}.{j}")
                    x = _call(graph, aten.add.Tensor, (x, act), f"{HEADS_PREFIX}.{k}.{j}")
                head_inputs.append(x)
            if self.share_lm_head:
                stacked = self._shared_projection(gm, head, head_inputs)
            else:
                head_logits = [self._own_projection(gm, k, x, lm_weight, lm_bias)
                               for k, x in enumerate(head_inputs)]
                stacked = _call(graph, aten.stack.default, (head_logits, 0), HEADS_PREFIX)
        outputs = tuple(output.args[0])
        output.args = (outputs + (stacked,),)
        gm.meta[MEDUSA_META] = MedusaLayout(
            num_heads=self.num_heads, num_layers=self.num_layers, share_lm_head=self.share_lm_head,
            logits_output=head.output_index, heads_output=len(outputs),
            hidden_size=head.hidden_size, vocab_size=head.vocab_size,
            lm_head=head.weight_name, prefix=HEADS_PREFIX, hidden_node=hidden.name)
        return PassResult(gm, sites=self.num_heads, notes={
            "lm_head": head.weight_name, "heads_output": len(outputs),
            "trainable_parameters": sum(p.numel() for p in gm.parameters() if p.requires_grad)})

    def _own_projection(self, gm: GraphModule, k: int, x: Node, lm_weight: torch.Tensor,
                        lm_bias: torch.Tensor | None) -> Node:
        """Head k's vocab projection: a trainable copy of the LM head."""
        output = gm.graph.output_node()
        proj = f"{HEADS_PREFIX}.{k}.{self.num_layers}"
        w = add_attr(gm, f"{proj}.weight", lm_weight.detach().clone(), buffer=False, trainable=True, before=output)
        b = None if lm_bias is None else add_attr(gm, f"{proj}.bias", lm_bias.detach().clone(), buffer=False,
                                                  trainable=True, before=output)
        return _call(gm.graph, aten.linear.default, (x, w, b), proj)

    def _shared_projection(self, gm: GraphModule, head: LmHead, head_inputs: list[Node]) -> Node:
        """All heads through the LM head itself: stack the K inputs, one linear -> (K, ..., V)."""
        graph = gm.graph
        stacked = _call(graph, aten.stack.default, (head_inputs, 0), HEADS_PREFIX)
        w = attr_node(gm, head.weight_name)
        b = attr_node(gm, head.bias_name) if head.bias_name else None
        return _call(graph, aten.linear.default, (stacked, w, b), HEADS_PREFIX)

    def verify(self, before: GraphModule, after: GraphModule, ctx: PassContext) -> Comparison:
        """Original outputs unchanged, and fresh heads reproduce the base logits exactly."""
        ref = run_graph(before, ctx.example_inputs)
        got = run_graph(after, ctx.example_inputs)
        comparison = compare_outputs(ref, got, self.tolerance())
        if not comparison.ok:
            return comparison
        layout = medusa_layout(after.meta)
        logits, heads = got[layout.logits_output], got[layout.heads_output]
        if tuple(heads.shape) != (self.num_heads, *logits.shape):
            comparison.structural = (f"Medusa head logits have shape {tuple(heads.shape)}, expected "
                                     f"{(self.num_heads, *logits.shape)}")
            return comparison
        if _heads_untrained(after):
            for k in range(self.num_heads):
                check = compare_tensors(logits, heads[k], self.tolerance(), index=len(ref) + k)
                comparison.outputs.append(check)
        return comparison


def _heads_untrained(gm: GraphModule) -> bool:
    """True while every ResBlock weight is still zero (then each head equals the LM head)."""
    layout = medusa_layout(gm.meta)
    lm = get_attr(gm, layout.lm_head)
    for name, p in gm.named_parameters():
        if not name.startswith(layout.prefix + "."):
            continue
        if name.endswith(".linear.weight") or name.endswith(".linear.bias"):
            if bool(p.any()):
                return False
        elif name.endswith(".weight") and not torch.equal(p, lm):
            return False
    return True


def _call(graph: torch.fx.Graph, target: Any, args: tuple, module_path: str) -> Node:
    node = graph.call_function(target, args)
    node.meta["module_path"] = module_path
    return node


def head_parameter_names(gm: GraphModule) -> list[str]:
    """Names of the Medusa heads' parameters in `gm` (empty when it has no heads)."""
    layout = medusa_layout(gm.meta)
    if layout is None:
        return []
    return [n for n, _ in gm.named_parameters() if n.startswith(layout.prefix + ".")]


__all__ = ["AddMedusaHeads", "HEADS_PREFIX", "LmHead", "find_lm_head", "head_parameter_names"]
