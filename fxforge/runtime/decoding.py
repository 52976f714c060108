"""KV-cached decoding over a graph from the `add_kv_cache` pass, on any backend.

`CachedLM` wraps such a graph and a backend runner (eager, ONNX Runtime, Triton) behind one
call: new tokens + past key/values -> logits, Medusa head logits (when the graph has heads) and
the present key/values. `greedy_generate` is the plain loop: one prefill over the prompt, then
one forward per generated token. Medusa tree decoding (`fxforge.medusa.generate`) runs on the
same `CachedLM`.

    lm = CachedLM.prepare(cached_gm, backend="onnx")
    result = greedy_generate(lm, prompt_ids, max_new_tokens=32)
    result.tokens, result.tokens_per_second
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from fxforge.backends import get_backend
from fxforge.errors import InputError
from fxforge.runtime.cache_inputs import cached_inputs, empty_past, random_past_inputs
from fxforge.runtime.layouts import KVCacheLayout, MedusaLayout, kv_layout, medusa_layout
from fxforge.runtime.meta_keys import KV_META


@dataclass
class StepOutput:
    """What one cached forward returns."""

    logits: torch.Tensor                 # (B, L, V)
    head_logits: torch.Tensor | None     # (K, B, L, V) when the graph computes Medusa heads
    present: list[torch.Tensor]          # flat [k0, v0, k1, v1, ...], (B, Hkv, P + L, D)
    hidden: torch.Tensor | None = None   # (B, L, d) when the heads run separately (`heads_at`)
    accepted_node: int | None = None     # in-graph greedy verification: the deepest accepted node,
    next_token: int | None = None        # the base model's token after it; head_logits: (K, 1, 1, V) there


class CachedLM:
    """A KV-cached LM graph running on a backend.

    Args:
        graph_module: a graph produced by the `add_kv_cache` pass (optionally with Medusa heads).
        runner: the backend's callable taking the graph's flat inputs (see `prepare`).
    """

    def __init__(self, graph_module: GraphModule, runner: Callable[..., Sequence[Any]], backend: str = "eager",
                 heads_runner: Callable[..., Sequence[Any]] | None = None):
        if KV_META not in graph_module.meta:
            raise InputError("CachedLM needs a graph with a KV cache: run the `add_kv_cache` pass on it "
                             "first (e.g. passes=\"fuse_attention,add_kv_cache\").")
        self.graph_module = graph_module
        self.runner = runner
        self.backend = backend
        self.layout: KVCacheLayout = kv_layout(graph_module.meta)
        self.medusa: MedusaLayout | None = medusa_layout(graph_module.meta)
        self.dtype = self.layout.torch_dtype
        # Split decoding (`medusa.decoder`): the graph returns the hidden state instead of head
        # logits and `heads_runner` maps one position's hidden state to the K heads' logits.
        self.heads_runner = heads_runner
        # The pipeline report of the passes that made this decoding graph (`fxforge.medusa.decoder`).
        self.report: Any = None

    @classmethod
    def prepare(cls, graph_module: GraphModule, backend: str = "eager", **backend_options: Any) -> "CachedLM":
        """Lower `graph_module` to `backend` and wrap it.

        Backends that export (ONNX) need example inputs: this builds ones with a non-empty past
        and lengths that differ from each other, so every cache dimension stays dynamic.
        """
        example = example_cached_inputs(graph_module) if backend != "eager" else []
        runner = get_backend(backend)(graph_module, example, **backend_options)
        return cls(graph_module, runner, backend)

    @property
    def num_heads(self) -> int:
        """How many Medusa heads the graph has (0 without heads)."""
        return self.medusa.num_heads if self.medusa else 0

    def empty_past(self, batch: int = 1) -> list[torch.Tensor]:
        return empty_past(self.layout, batch, self.dtype)

    @property
    def verifies_in_graph(self) -> bool:
        """True when the graph accepts Medusa trees greedily itself (`runtime.greedy_verify`)."""
        return bool(self.medusa and self.medusa.verifies_in_graph)

    def forward(self, ids: torch.Tensor, past: Sequence[torch.Tensor], past_len: int,
                positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                tree_parents: torch.Tensor | None = None) -> StepOutput:
        """Run new tokens `ids` (B, L) after `past_len` cached positions.

        Positions default to past_len .. past_len + L - 1 and the mask to causal over the new
        tokens; Medusa passes tree positions (past_len + depth), its tree mask and, to a graph
        that verifies in-graph, the tree's parent indices.
        """
        flat = cached_inputs(self.layout, ids, past_len, past, positions, tree_mask, tree_parents)
        with torch.no_grad():
            out = list(self.runner(*flat))
        present = [out[i] for pair in self.layout.present for i in pair]
        logits = out[self.layout.logits_output]
        medusa = self.medusa
        if medusa is not None and medusa.verifies_in_graph:
            return StepOutput(logits=logits, head_logits=out[medusa.heads_output], present=present,
                              accepted_node=int(out[medusa.best_output][0]),
                              next_token=int(out[medusa.next_token_output][0]))
        if medusa is not None and medusa.heads_apart:
            return StepOutput(logits=logits, head_logits=None, present=present, hidden=out[medusa.hidden_output])
        heads = out[medusa.heads_output] if medusa is not None else None
        return StepOutput(logits=logits, head_logits=heads, present=present)

    def heads_at(self, out: StepOutput, position: int) -> torch.Tensor:
        """(K, V): every Medusa head's logits at `position` of batch row 0 of `out`."""
        if out.head_logits is not None:
            return out.head_logits[:, 0, position]
        if out.hidden is None or self.heads_runner is None:
            raise InputError("this decoder has no Medusa heads: add the `add_medusa_heads` pass.")
        position = position % out.hidden.shape[1]  # -1: the last position
        with torch.no_grad():
            return self.heads_runner(out.hidden[:1, position:position + 1].contiguous())[0][:, 0, 0]


def example_cached_inputs(graph_module: GraphModule, batch: int | None = None, past_len: int = 3,
                          new_len: int = 4) -> list[Any]:
    """Example flat inputs for exporting a cached graph (past 3, 4 new tokens).

    `batch` defaults to the graph's own: 2 where the batch is dynamic (a size other than 1, so
    the export keeps it dynamic), the traced size where the graph fixed it.
    """
    layout = kv_layout(graph_module.meta)
    if batch is None:
        batch = static_batch(graph_module, layout) or 2
    ids = torch.zeros(batch, new_len, dtype=torch.long)
    return list(random_past_inputs(layout, ids, past_len))


def static_batch(graph_module: GraphModule, layout: KVCacheLayout) -> int | None:
    """The batch size a cached graph was fixed to when traced, or None where it is dynamic."""
    ids = [n for n in graph_module.graph.nodes if n.op == "placeholder"][layout.input_ids]
    size = ids.meta["val"].shape[0] if "val" in ids.meta else None
    return size if isinstance(size, int) else None


@dataclass
class GenerationResult:
    """Generated tokens and how long it took."""

    tokens: list[int]
    forwards: int                          # model calls, prefill included
    seconds: float                         # wall clock, prefill included
    accepted_per_step: list[int] = field(default_factory=list)  # tokens emitted per decode step
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per decoding forward (1.0 for plain greedy)."""
        steps = self.accepted_per_step
        return sum(steps) / len(steps) if steps else 0.0


def as_prompt(prompt_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A prompt as a (1, T) LongTensor; refuses batches and empty prompts."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise InputError(f"prompt_ids must be one non-empty sequence of token ids (shape (T,) or (1, T)), "
                         f"got shape {tuple(ids.shape)}")
    return ids[None, :]


def greedy_generate(lm: CachedLM, prompt_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
                    eos_token_id: int | None = None) -> GenerationResult:
    """Plain KV-cached greedy decoding: prefill, then one forward per new token."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = as_prompt(prompt_ids)
    start = time.perf_counter()
    out = lm.forward(prompt, lm.empty_past(1), 0)
    past, past_len, forwards = out.present, prompt.shape[1], 1
    token = int(out.logits[0, -1].argmax())
    tokens = [token]
    while len(tokens) < max_new_tokens and token != eos_token_id:
        out = lm.forward(torch.tensor([[token]]), past, past_len)
        past, past_len, forwards = out.present, past_len + 1, forwards + 1
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    seconds = time.perf_counter() - start
    return GenerationResult(tokens=tokens, forwards=forwards, seconds=seconds,
                            accepted_per_step=[1] * len(tokens))


__all__ = ["CachedLM", "GenerationResult", "StepOutput", "as_prompt", "example_cached_inputs",
           "greedy_generate"]
