"""Medusa for compiled models: train the heads (Medusa-1), then decode with tree attention.

    compiled = fxforge.compile(lm, (ids,), passes="fuse_attention,add_medusa_heads(num_heads=4)")
    report = fxforge.medusa.train_heads(compiled, texts, tokenizer=tok, self_distill=True)
    print(report)                                 # per-head top-1 / top-5 on held-out data
    out = fxforge.medusa.generate(compiled, prompt_ids, 64)        # == plain greedy's tokens
    out.tokens, out.mean_accepted, out.tokens_per_second

Training: the backbone is frozen; the loss is Σ_k λ^k·CE_k with λ = 0.8, head k at position t
predicting token t+1+k. Self-distillation (the default without data, or `self_distill=True`)
trains on the base model's own greedy continuations of prompts — windows of the data, or short
prefixes sampled from the model — so the heads learn to predict what the model will generate,
which is what acceptance rewards. Real prompts transfer best to real prompts (bench/medusa.py).

Decoding: `generate` adds a KV cache to the graph (`add_kv_cache`; fused attention takes the
tree mask as its mask argument, unfused attention gets it in place of the causal mask), lowers
it to the backend, then each step builds the candidate tree from the heads' top-k, verifies it
in one forward with the tree mask and accepts greedily (exactly plain greedy's output) or
typically. Greedy decoders verify inside the graph (`runtime.greedy_verify`): the same call
returns the accepted node, the next token and the heads' logits there. Typical decoders get
the logits of every node back and run the heads apart, on the node they accept.

Speed on a CPU (bench/medusa.py): a step costs the tree forward plus what surrounds it, and
verifying N tokens is not free there (the linears turn compute-bound), so small trees (6-8
nodes) and in-graph verification (which took ONNX from 1.2x to 1.55x plain greedy) are what
make the accepted tokens pay.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fxforge.backends import get_backend
from fxforge.errors import InputError
from fxforge.passes.add_medusa_heads import head_parameter_names
from fxforge.passes.context import PassContext, default_progress
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache, with_kv_cache
from fxforge.passes.medusa_greedy_verify import MedusaGreedyVerify
from fxforge.passes.split_medusa_heads import SplitMedusaHeads
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.runtime.cache_inputs import cached_inputs, empty_past
from fxforge.runtime.decoding import CachedLM, GenerationResult, as_prompt, example_cached_inputs, greedy_generate
from fxforge.runtime.layouts import MedusaLayout, medusa_layout
from fxforge.runtime.medusa_split import heads_graph, split_backbone_and_heads
from fxforge.runtime.medusa_tree import (
    Acceptance, MedusaTree, compact_kv, default_tree, greedy_accept, tree_from_accuracies, typical_accept,
)
from fxforge.runtime.meta_keys import KV_META

LOSS_DECAY = 0.8
# Decoders built per CompiledModel (and per backend/options), kept with the model's lifetime
# without an attribute on it: keyed weakly, dropped when the model is.
_DECODERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- training


@dataclass
class HeadTrainingReport:
    """What `train_heads` did and how good the heads are on held-out data."""

    steps: int
    seconds: float
    source: str                       # "data" or "self-distillation"
    losses: list[float]               # training loss per step
    top1: list[float]                 # held-out top-1 accuracy per head
    top5: list[float]                 # held-out top-5 accuracy per head
    rank_accuracy: list[list[float]]  # held-out P(rank r guess is right), per head, ranks 0..9
    heldout_positions: int

    def __str__(self) -> str:
        lines = [f"Medusa heads: {self.steps} steps in {self.seconds:.1f}s on {self.source}; "
                 f"loss {self.losses[0]:.3f} -> {self.losses[-1]:.3f}" if self.losses else "no steps",
                 f"{'head':>6}{'top-1':>9}{'top-5':>9}   (held-out, {self.heldout_positions} positions)"]
        for k, (a1, a5) in enumerate(zip(self.top1, self.top5)):
            lines.append(f"{k + 1:>6}{a1:>9.3f}{a5:>9.3f}")
        return "\n".join(lines)


def train_heads(compiled: Any, data: Sequence[str] | Sequence[torch.Tensor] | None = None, *,
                tokenizer: Any = None, heldout: Sequence[str] | Sequence[torch.Tensor] | None = None,
                steps: int = 200, lr: float = 1e-3, batch_size: int = 8, seq_len: int = 64,
                decay: float = LOSS_DECAY, self_distill: bool | None = None,
                self_distill_sequences: int = 64, prompt_len: int = 4,
                seed: int = 0, progress: bool = True) -> HeadTrainingReport:
    """Train the Medusa heads of `compiled` (Medusa-1: backbone frozen) and measure them.

    Args:
        compiled: a CompiledModel whose pipeline ran `add_medusa_heads`.
        data: texts (with `tokenizer`: a `tokenizers.Tokenizer` or any callable text -> ids),
            token tensors ((L,) or (B, L)), or None for self-distillation.
        heldout: data in the same form for the accuracy report; default: the last 10% of rows.
        steps, lr, batch_size, seq_len: the AdamW loop. decay: λ in Σ_k λ^k·CE_k.
        self_distill: train on the base model's own greedy continuations (what decoding will
            have to guess) rather than on `data`'s text. Default: only when there is no data.
            With data, its windows are the prompts (as Medusa's self-distillation continues
            real prompts); without, prompts are sampled from the model.
        self_distill_sequences, prompt_len: self-distillation generates this many sequences of
            seq_len tokens: a prompt of prompt_len tokens, then the greedy continuation. The loss
            and the accuracies count only targets in the continuation.

    Returns a HeadTrainingReport (per-head held-out top-1/top-5 accuracy, losses).
    """
    gm = compiled.graph_module
    layout = _medusa_layout(gm)
    if steps < 0 or batch_size < 1 or seq_len < layout.num_heads + 2:
        raise InputError(f"train_heads: need steps >= 0, batch_size >= 1 and seq_len >= num_heads + 2 "
                         f"(= {layout.num_heads + 2}); got steps={steps}, batch_size={batch_size}, "
                         f"seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    self_distill = data is None if self_distill is None else self_distill
    if self_distill and not 0 < prompt_len < seq_len - 1:
        raise InputError(f"train_heads: prompt_len must be in [1, seq_len - 2] for self-distillation; got "
                         f"prompt_len={prompt_len}, seq_len={seq_len}")
    target_start = prompt_len if self_distill else 0
    if self_distill:
        prompts = None if data is None else _prompt_windows(token_rows(data, tokenizer, prompt_len),
                                                            self_distill_sequences, generator)
        rows = self_distill_rows(gm, self_distill_sequences, seq_len, prompt_len, generator, progress,
                                 prompts=prompts)
        source = "self-distillation" + ("" if data is None else " from data prompts")
    else:
        rows = token_rows(data, tokenizer, seq_len)
        source = "data"
    if heldout is not None:
        held = token_rows(heldout, tokenizer, seq_len)
        target_start_held = 0
        train = rows
    else:
        cut = max(1, rows.shape[0] // 10)
        if rows.shape[0] < 2:
            raise InputError("train_heads needs at least 2 sequences of seq_len tokens (one is held out); "
                             "give more data or a smaller seq_len.")
        train, held = rows[:-cut], rows[-cut:]
        target_start_held = target_start

    names = head_parameter_names(gm)
    params = [p for n, p in gm.named_parameters() if n in names]
    for p in gm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # The backbone is frozen, so its hidden states are computed once; steps run the heads only.
    split = split_backbone_and_heads(gm)
    if split is not None:
        backbone, heads_gm = split
        hidden = torch.cat([_backbone_hidden(gm, backbone, chunk) for chunk in train.split(16)])

        def forward_heads(pick: torch.Tensor) -> torch.Tensor:
            return heads_gm(hidden[pick])[0]
    else:
        def forward_heads(pick: torch.Tensor) -> torch.Tensor:
            return _head_logits(gm, train[pick])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    losses: list[float] = []
    start = time.perf_counter()
    bar = default_progress(range(steps), desc="medusa heads", **({} if progress else {"disable": True}))
    for _ in bar:
        pick = torch.randint(0, train.shape[0], (min(batch_size, train.shape[0]),), generator=generator)
        with torch.enable_grad():
            loss = medusa_loss(forward_heads(pick), train[pick], decay, target_start)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    top1, top5, ranks, positions = head_accuracy(gm, held, target_start=target_start_held)
    _invalidate(compiled)
    return HeadTrainingReport(steps=steps, seconds=seconds, source=source, losses=losses, top1=top1, top5=top5,
                              rank_accuracy=ranks, heldout_positions=positions)


def _target_span(length: int, shift: int, target_start: int) -> tuple[int, int]:
    """Positions t whose target t + shift is in [target_start, length): (first t, last t + 1)."""
    return max(0, target_start - shift), length - shift


def medusa_loss(head_logits: torch.Tensor, ids: torch.Tensor, decay: float = LOSS_DECAY,
                target_start: int = 0) -> torch.Tensor:
    """Σ_k decay^k · CE(head k at t, token t+1+k), heads k = 1..K. head_logits: (K, B, L, V).

    target_start: count only targets at positions >= it (self-distillation: the continuation).
    """
    total = head_logits.new_zeros(())
    length = ids.shape[1]
    for k in range(head_logits.shape[0]):
        shift = k + 2  # head k+1 predicts token t + 1 + (k + 1)
        first, end = _target_span(length, shift, target_start)
        if end <= first:
            break
        logits = head_logits[k, :, first:end]
        total = total + decay ** (k + 1) * F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, first + shift:].reshape(-1))
    return total


@torch.no_grad()
def head_accuracy(gm: Any, rows: torch.Tensor, ranks: int = 10,
                  target_start: int = 0) -> tuple[list[float], list[float], list[list[float]], int]:
    """Held-out (top-1, top-5, per-rank accuracy, positions) of each head against the data."""
    heads = _head_logits(gm, rows)
    top1, top5, per_rank = [], [], []
    length = rows.shape[1]
    positions = 0
    for k in range(heads.shape[0]):
        shift = k + 2
        first, end = _target_span(length, shift, target_start)
        logits = heads[k, :, first:end]
        target = rows[:, first + shift:]
        order = logits.topk(max(ranks, 5), dim=-1).indices
        hit = order == target[..., None]
        top1.append(float(hit[..., 0].float().mean()))
        top5.append(float(hit[..., :5].any(-1).float().mean()))
        per_rank.append([float(hit[..., r].float().mean()) for r in range(ranks)])
        positions = positions or target.numel()
    return top1, top5, per_rank, positions


def token_rows(data: Sequence[str] | Sequence[torch.Tensor], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Texts or token tensors -> (N, seq_len) LongTensor of consecutive windows."""
    streams: list[torch.Tensor] = []
    for item in data:
        if isinstance(item, str):
            if tokenizer is None:
                raise InputError("train_heads got texts but no tokenizer: pass tokenizer=<tokenizers.Tokenizer "
                                 "or callable text -> ids>, or pass token id tensors instead.")
            ids = tokenizer.encode(item).ids if hasattr(tokenizer, "encode") else tokenizer(item)
            streams.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
        elif isinstance(item, torch.Tensor) and not item.dtype.is_floating_point:
            rows = item.reshape(-1, item.shape[-1]) if item.dim() > 1 else item[None]
            streams.extend(r.long() for r in rows)
        else:
            raise InputError(f"train_heads data items must be str or integer token tensors, got {type(item).__name__}")
    windows = [s[i: i + seq_len] for s in streams for i in range(0, s.numel() - seq_len + 1, seq_len)]
    if not windows:
        raise InputError(f"train_heads: no sequence has {seq_len} tokens; lower seq_len or give longer data.")
    return torch.stack(windows)


def _prompt_windows(windows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct windows of `windows` (all of them if there are fewer), in random order."""
    return windows[torch.randperm(windows.shape[0], generator=generator)[:count]]


@torch.no_grad()
def self_distill_rows(gm: Any, count: int, seq_len: int, prompt_len: int, generator: torch.Generator,
                      progress: bool = True, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Sequences of seq_len tokens: a prompt of prompt_len tokens, then the model's greedy continuation.

    prompts: (N, prompt_len) real prompts; None: `count` prompts sampled from the model itself.
    """
    cached = with_kv_cache(gm)
    lm = CachedLM(cached, cached)
    if prompts is None:
        vocab = _medusa_layout(gm).vocab_size
        ids = torch.randint(0, vocab, (count, 1), generator=generator)
    else:
        ids = prompts
    count = ids.shape[0]
    out = lm.forward(ids, lm.empty_past(count), 0)
    past, length = out.present, ids.shape[1]
    bar = default_progress(range(seq_len - length), desc="self-distill", **({} if progress else {"disable": True}))
    for _ in bar:
        logits = out.logits[:, -1].float()
        if length < prompt_len:  # sampled prefix: diverse starting points
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        else:  # greedy continuation: what the heads will have to predict at decode time
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        out = lm.forward(nxt, past, length)
        past, length = out.present, length + 1
    return ids


def _backbone_hidden(gm: Any, backbone: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if KV_META in gm.meta:
            layout = gm.meta[KV_META]
            return backbone(*cached_inputs(layout, ids, 0, empty_past(layout, ids.shape[0], torch.float32)))[0]
        return backbone(ids)[0]


def _head_logits(gm: Any, ids: torch.Tensor) -> torch.Tensor:
    heads = _medusa_layout(gm)
    if KV_META in gm.meta:
        layout = gm.meta[KV_META]
        flat = cached_inputs(layout, ids, 0, empty_past(layout, ids.shape[0], torch.float32))
    else:
        flat = [ids]
    return gm(*flat)[heads.heads_output]


def _medusa_layout(gm: Any) -> MedusaLayout:
    layout = medusa_layout(gm.meta)
    if layout is None:
        raise InputError("this model has no Medusa heads: compile it with passes=\"...,add_medusa_heads\" first.")
    return layout


# --------------------------------------------------------------------------- decoding


def decoder(compiled: Any, backend: str | None = None, *, split_heads: bool = True,
            greedy_in_graph: bool = False, **backend_options: Any) -> CachedLM:
    """The KV-cached Medusa decoder of `compiled` on `backend` (built once, then reused).

    split_heads: run the heads apart, on the one position a step needs them at (the last
    accepted node), instead of on every tree node inside the graph: a step then costs the
    backbone over the tree plus K heads on one vector. Same tokens either way.
    greedy_in_graph: the graph itself accepts the tree greedily and runs the heads at the
    accepted node (`runtime.greedy_verify`): one call per step and no logits walked in Python.
    Greedy decoding only; `generate(mode="greedy")` uses it by default.

    The decoding graph comes from passes run like any pipeline's (`add_kv_cache` if the graph
    has no cache yet, then `split_medusa_heads` or `medusa_greedy_verify`), each verified;
    their records are in the decoder's `report`.
    """
    backend = backend or compiled.backend
    cache = _DECODERS.setdefault(compiled, {})
    key = (backend, split_heads, greedy_in_graph, tuple(sorted(backend_options.items())))
    if key not in cache:
        cached, ctx, report = _cached(compiled.graph_module)
        heads = heads_graph(cached) if split_heads and not greedy_in_graph else None
        if greedy_in_graph:
            lm = CachedLM.prepare(_greedy_verifying(cached, ctx, report, "decode"), backend, **backend_options)
        elif heads is not None:
            main = run_pass(SplitMedusaHeads(), cached, ctx, report=report)
            lm = _heads_apart(main, heads, backend, backend_options)
        else:  # heads on every node, inside the graph (or not separable)
            lm = CachedLM.prepare(cached, backend, **backend_options)
        lm.report = report
        cache[key] = lm
    return cache[key]


def _cached(gm: Any) -> tuple[Any, PassContext, PipelineReport]:
    """(`gm` with a KV cache, the context its decoding passes verify in, their report)."""
    report = PipelineReport()
    if KV_META in gm.meta:
        return gm, PassContext(example_inputs=tuple(example_cached_inputs(gm, batch=1))), report
    ctx = PassContext(example_inputs=(torch.zeros(1, 8, dtype=torch.long),))  # prefill 4 + cached step of 4
    return run_pass(AddKvCache(), gm, ctx, report=report), ctx, report


def _heads_apart(main: Any, heads: Any, backend: str, backend_options: dict) -> CachedLM:
    """A decoder running `main` (hidden state out) and, on the positions asked, `heads`."""
    hidden_size = _medusa_layout(main).hidden_size
    example = [torch.zeros(1, 1, hidden_size, dtype=torch.float32)]
    heads_runner = get_backend(backend)(heads, example, **backend_options)
    lm = CachedLM.prepare(main, backend, **backend_options)
    return CachedLM(main, lm.runner, backend, heads_runner=heads_runner)


def split_heads_for_decoding(graph: Any) -> tuple[Any, Any] | None:
    """(cached graph returning the hidden state in place of head logits, heads graph) or None.

    The first is pass `split_medusa_heads` (verified) on `graph`, given a KV cache first if it has
    none; None when the heads cannot be told apart from the backbone.
    """
    cached, ctx, _ = _cached(graph)
    heads = heads_graph(cached)
    if heads is None:
        return None
    return run_pass(SplitMedusaHeads(), cached, ctx), heads


def export_onnx(compiled: Any, path: str | Path, *, greedy_in_graph: bool = False) -> Path:
    """Write the KV-cached model with its heads as ONNX.

    Inputs: input_ids, position_ids, tree_mask, past_key_i/past_value_i; outputs: logits, head
    logits (K, B, L, V), present_key_i/present_value_i. Batch, new and past lengths are dynamic.
    greedy_in_graph: the graph `decoder(..., greedy_in_graph=True)` runs instead: one more input,
    tree_parents (N,); head logits (K, 1, 1, V) at the accepted node; two more outputs, the
    accepted node and the next token (`runtime.greedy_verify`).
    """
    from fxforge.atomic import atomic_file
    from fxforge.backends.onnx.backend import export_onnx as export_graph

    gm, ctx, report = _cached(compiled.graph_module)
    if greedy_in_graph:
        gm = _greedy_verifying(gm, ctx, report, "export")
    with atomic_file(Path(path)) as staging:  # all or nothing, like CompiledModel.export_onnx
        export_graph(gm, example_cached_inputs(gm), staging)
    return Path(path)


def _greedy_verifying(cached: Any, ctx: PassContext, report: PipelineReport, action: str) -> Any:
    """`cached` with greedy verification and the heads inside: pass `medusa_greedy_verify`."""
    if heads_graph(cached) is None:
        raise InputError(f"greedy_in_graph needs the Medusa heads apart from the backbone, but a later pass "
                         f"rewrote them; {action} with greedy_in_graph=False.")
    return run_pass(MedusaGreedyVerify(), cached, ctx, report=report)


def _invalidate(compiled: Any) -> None:
    # Decoders hold copies of the head weights (and ONNX files): rebuild after training.
    _DECODERS.pop(compiled, None)
    if getattr(compiled, "backend", "eager") != "eager":
        compiled.reprepare()


@dataclass
class MedusaResult(GenerationResult):
    """Generated tokens plus Medusa's acceptance statistics."""

    proposed_per_step: list[int] = field(default_factory=list)  # tree depth offered per step

    @property
    def acceptance_rate(self) -> float:
        """Accepted head guesses / the depth of guesses each step could have accepted."""
        proposed = sum(self.proposed_per_step)
        return sum(a - 1 for a in self.accepted_per_step) / proposed if proposed else 0.0


def generate(compiled: Any, prompt_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
             tree: MedusaTree | Sequence[Sequence[int]] | None = None, mode: str = "greedy",
             temperature: float = 0.0, *, backend: str | None = None, eos_token_id: int | None = None,
             epsilon: float = 0.09, delta: float = 0.3, seed: int = 0,
             lm: CachedLM | None = None) -> MedusaResult:
    """Medusa decoding: one forward verifies a tree of head guesses; emits 1+ tokens per step.

    mode="greedy" (temperature ignored) yields exactly plain greedy decoding's tokens;
    mode="typical" samples at `temperature` > 0 and accepts guesses by typical acceptance.
    tree: a MedusaTree, a list of paths, or None for `default_tree(num_heads)`.
    """
    if mode not in ("greedy", "typical"):
        raise InputError(f"mode must be 'greedy' or 'typical', got {mode!r}")
    if mode == "typical" and temperature <= 0:
        raise InputError("mode='typical' needs temperature > 0 (e.g. 0.7); use mode='greedy' for temperature 0.")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lm = lm or decoder(compiled, backend, greedy_in_graph=mode == "greedy")
    if not lm.num_heads:
        raise InputError("generate needs a model with Medusa heads: add the `add_medusa_heads` pass.")
    if lm.verifies_in_graph and mode != "greedy":
        raise InputError("this decoder accepts greedily inside its graph; for mode='typical' pass "
                         "lm=fxforge.medusa.decoder(compiled, backend) (greedy_in_graph=False).")
    if tree is None:
        tree = default_tree(lm.num_heads)
    elif not isinstance(tree, MedusaTree):
        tree = MedusaTree.from_paths(tree, lm.num_heads)
    if tree.depth > lm.num_heads:
        raise InputError(f"the tree is {tree.depth} deep but the model has {lm.num_heads} Medusa heads.")
    generator = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> int:
        if mode == "greedy":
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits.double() / temperature, -1).float(), 1,
                                     generator=generator))

    prompt = as_prompt(prompt_ids)
    start = time.perf_counter()
    out = lm.forward(prompt, lm.empty_past(1), 0)
    past, past_len = out.present, prompt.shape[1]
    if lm.verifies_in_graph:  # with no parents given, the graph accepts the whole prompt
        root, heads = out.next_token, out.head_logits[:, 0, 0]
    else:
        root, heads = pick(out.logits[0, -1]), lm.heads_at(out, -1)
    tokens: list[int] = []
    accepted, proposed, forwards = [], [], 1
    while len(tokens) < max_new_tokens:
        tree_tokens = tree.candidates(root, heads)
        positions, mask = tree.inputs(past_len)
        if lm.verifies_in_graph:
            out = lm.forward(tree_tokens[None], past, past_len, positions, mask, tree.parent_index())
            result = Acceptance(path=tree.path_to(out.accepted_node), next_token=out.next_token)
            heads = out.head_logits[:, 0, 0]
        else:
            out = lm.forward(tree_tokens[None], past, past_len, positions, mask)
            logits = out.logits[0]
            if mode == "greedy":
                result = greedy_accept(tree, tree_tokens, logits)
            else:
                result = typical_accept(tree, tree_tokens, logits, temperature, epsilon, delta, generator)
            heads = lm.heads_at(out, result.path[-1])
        forwards += 1
        node_tokens = tree_tokens.tolist()
        emitted = [node_tokens[i] for i in result.path]
        past = compact_kv(out.present, past_len, result.path)
        past_len += len(result.path)
        root = result.next_token
        accepted.append(len(emitted))
        proposed.append(tree.depth)
        tokens.extend(emitted)
        if eos_token_id is not None and eos_token_id in emitted:
            tokens = tokens[: tokens.index(eos_token_id) + 1]
            break
    tokens = tokens[:max_new_tokens]
    return MedusaResult(tokens=tokens, forwards=forwards, seconds=time.perf_counter() - start,
                        accepted_per_step=accepted, proposed_per_step=proposed,
                        extra={"tree_nodes": tree.num_nodes, "mode": mode, "temperature": temperature})


def tree_from_report(report: HeadTrainingReport, num_nodes: int) -> MedusaTree:
    """The best `num_nodes` tree for heads with the per-rank accuracies `train_heads` measured."""
    return tree_from_accuracies(report.rank_accuracy, num_nodes)


__all__ = ["HeadTrainingReport", "MedusaResult", "decoder", "export_onnx", "generate", "greedy_generate",
           "head_accuracy", "medusa_loss", "self_distill_rows", "split_backbone_and_heads", "split_heads_for_decoding",
           "token_rows", "train_heads", "tree_from_report"]
