"""Shared by tests/passes/test_verification.py and tests/bad_inputs/test_verification.py: a
random-weight Llama with TinyLlama's shape ratios (GQA, SwiGLU, RMSNorm, RoPE) small enough for
CI, and deliberately broken passes that verification must reject.

What keeps the quantization loss large, as on the real TinyLlama with random weights: random
(untrained) weights, 4-bit codes, group 128. Widths are multiples of 128 so the default group
size applies; hidden 256 instead of 2048 keeps a forward pass in milliseconds.

The second verification shape of these models' graphs is batch 3 x sequence 12 (from the example
batch 2 x 16, see fxforge/ir/shapes.py): the batch-5 bug below is built to trigger exactly there.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch.fx import GraphModule

from fxforge.ir.graph import get_attr, set_attr
from fxforge.passes.base import PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.prune.prune import Prune
from fxforge.passes.prune.sparsify import MASKS_META, Sparsify
from fxforge.passes.quantize import Quantize

SECOND_BATCH = 3  # fxforge.ir.shapes: example batch 2 -> 2 + 1


def build_tinyllama_shaped(hidden: int = 256, layers: int = 2, seed: int = 0):
    """(model, input kwargs): LlamaForCausalLM, random weights, 4 heads / 1 kv head (TinyLlama's
    GQA ratio is 8:1), SwiGLU 768 (~2.75x hidden as in TinyLlama), vocab 512, batch 2 x 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fxforge.models._tokens import random_token_inputs

    config = LlamaConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=1, intermediate_size=3 * hidden, max_position_embeddings=128,
                         use_cache=False, attn_implementation="eager", pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, random_token_inputs(512, 2, 16, seed)


@functools.lru_cache(maxsize=None)
def _traced(hidden: int):
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace

    model, kwargs = build_tinyllama_shaped(hidden)
    gm = trace(model, (), kwargs)
    canonicalize(gm)
    return model, kwargs, gm


def traced_tinyllama(hidden: int = 256):
    """(model, kwargs, canonical graph copy, PassContext) traced once per session."""
    import copy

    model, kwargs, gm = _traced(hidden)
    return model, kwargs, copy.deepcopy(gm), PassContext(example_inputs=tuple(kwargs.values()))


def calibration_for(kwargs: dict, batches: int = 4) -> list[dict]:
    """Calibration batches shaped like the example inputs (other random tokens)."""
    from fxforge.models._tokens import random_token_inputs

    ids = kwargs["input_ids"]
    return [random_token_inputs(512, ids.shape[0], ids.shape[1], seed=100 + i) for i in range(batches)]


def outputs_equal(gm: GraphModule, other: GraphModule, inputs) -> bool:
    from fxforge.ir.verify import run_graph

    return all(torch.equal(a, b) for a, b in zip(run_graph(gm, inputs), run_graph(other, inputs)))


# --------------------------------------------------------------------------- broken passes


@dataclasses.dataclass(frozen=True)
class OffByOneGroupQuantize(Quantize):
    """quantize whose rewrite hands every layer its scales shifted by one group (group g reads
    the scales of group g + 1): the layout bug an exact-vs-semantics check must catch."""

    name = "quantize_off_by_one_group"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = super().run(gm, ctx)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target == torch.ops.fxforge.linear_wq.default:
                scales = node.args[2].target
                set_attr(gm, scales, torch.roll(get_attr(gm, scales), shifts=-1, dims=1), buffer=True)
        return result


@torch.library.custom_op("fxforge_test::wrong_at_batch_3", mutates_args=())
def wrong_at_batch_3(x: torch.Tensor) -> torch.Tensor:
    """Identity, except at batch 3 (the verifier's second shape) where it scales by 1.5."""
    return x * 1.5 if x.shape[0] == SECOND_BATCH else x.clone()


@wrong_at_batch_3.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@dataclasses.dataclass(frozen=True)
class WrongAtBatch3Quantize(Quantize):
    """quantize that also routes the first quantized layer's output through an op that is exact
    at the example batch (2) and wrong at batch 3 only."""

    name = "quantize_wrong_at_batch_3"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = super().run(gm, ctx)
        first = next(n for n in gm.graph.nodes if n.op == "call_function"
                     and n.target == torch.ops.fxforge.linear_wq.default)
        with gm.graph.inserting_after(first):
            bug = gm.graph.call_function(torch.ops.fxforge_test.wrong_at_batch_3.default, (first,))
        first.replace_all_uses_with(bug, delete_user_cb=lambda user: user is not bug)
        return result


@dataclasses.dataclass(frozen=True)
class InvertedMaskSparsify(Sparsify):
    """sparsify that zeroes the weights its mask keeps (and keeps those it prunes): 100% wrong."""

    name = "sparsify_inverted_mask"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        originals = {n: get_attr(gm, n).detach().clone() for n, _ in gm.named_parameters()}
        result = super().run(gm, ctx)
        for name, mask in gm.meta[MASKS_META].items():
            set_attr(gm, name, originals[name] * (~mask).to(originals[name].dtype))
        return result


@dataclasses.dataclass(frozen=True)
class MisalignedPrune(Prune):
    """prune whose surgery keeps the MLP's down-projection columns misaligned by one with the
    hidden units it kept (an off-by-one index in the slicing)."""

    name = "prune_misaligned"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = super().run(gm, ctx)
        for name, _ in list(gm.named_parameters()):
            if name.endswith("mlp.down_proj.weight"):
                set_attr(gm, name, torch.roll(get_attr(gm, name).detach(), shifts=1, dims=1))
        return result
