"""One sweep cell = one family through one step; each returns what happened or raises why not.

A step function takes the family's `Traced` state and returns a short detail string on
success; on failure it raises `CellFailure` (or whatever the pass raised) whose first line is the
cell's reason. `run_cell` turns that into a (status, text) pair for the table and the test.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from arch_sweep.zoo import Built, accepts_use_cache, input_ids

SHAPES = [(2, 9), (1, 13)]  # (batch, seq): the trace shape and a second one
TOL = 1e-4
PRUNE_RATIO = 0.3
CORE_STEPS = ("trace", "onnx", "fuse_attention")
SLOW_STEPS = ("add_kv_cache", "quantize", "add_adapters", "prune", "sparsify")
STEPS = CORE_STEPS + SLOW_STEPS


class CellFailure(AssertionError):
    """The step ran but its result is wrong (the message says how)."""


class NotApplicable(Exception):
    """The step does not apply to this family (e.g. KV cache on an encoder)."""


@dataclass
class Traced:
    """A family's model, its canonical graph and what earlier steps left for later ones."""

    built: Built
    ids: torch.Tensor
    gm: GraphModule | None = None
    fused: GraphModule | None = None
    cache: dict = field(default_factory=dict)


def reference(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own uncached logits."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits if accepts_use_cache(model) else model(ids).logits


def _max_error(graph_out: torch.Tensor, want: torch.Tensor) -> float:
    if graph_out.shape != want.shape:
        raise CellFailure(f"output shape {tuple(graph_out.shape)} != model's {tuple(want.shape)}")
    return (graph_out.float() - want.float()).abs().max().item()


def _check_two_shapes(run, model, what: str, seed: int = 2) -> str:
    errors = []
    for batch, seq in SHAPES:
        x = input_ids(batch, seq, seed=seed)
        err = _max_error(run(x), reference(model, x))
        if not err <= TOL:
            raise CellFailure(f"{what} differs from eager by {err:.1e} at {batch}x{seq} (> {TOL:g})")
        errors.append(err)
    return f"max err {max(errors):.0e}"


def step_trace(t: Traced) -> str:
    """trace + canonicalize; the canonical graph == eager at two shapes."""
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace

    gm = trace(t.built.model, (t.ids,))
    canonicalize(gm)
    t.gm = gm
    return _check_two_shapes(lambda x: gm(x)[0], t.built.model, "canonical graph")


def _need_gm(t: Traced) -> GraphModule:
    if t.gm is None:
        raise CellFailure("no canonical graph (trace failed)")
    return t.gm


def step_onnx(t: Traced) -> str:
    """The canonical graph exported to ONNX and run in ONNX Runtime == eager at two shapes."""
    from fxforge.backends.onnx.backend import OnnxRunner, export_onnx

    gm = _need_gm(t)
    with tempfile.TemporaryDirectory(prefix="fxforge-sweep-") as tmp:
        runner = OnnxRunner(export_onnx(gm, (t.ids,), Path(tmp) / "model.onnx"), threads=1)
        return _check_two_shapes(lambda x: runner(x)[0], t.built.model, "ONNX")


_PASS_THROUGH = ("clone", "dropout", "_to_copy", "to", "type_as", "contiguous", "native_dropout",
                 "getitem", "alias", "detach", "masked_fill", "where", "view", "reshape",
                 "_unsafe_view", "expand", "slice")  # slice: the sink columns dropped (GPT-OSS)
_PRODUCTS = ("matmul", "bmm", "einsum", "baddbmm")


def _op_name(node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _feeds_a_product(node, depth: int = 6) -> bool:
    """Whether a softmax's probabilities reach a matmul (P·V) through layout/dtype/dropout ops:
    an attention softmax, as opposed to a MoE router's or a head's."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                name = _op_name(user)
                # P·V: the probabilities are the left operand (baddbmm's batch1); as the right
                # operand they weight something else (ConvBERT's dynamic conv kernel)
                if name in _PRODUCTS and (name == "einsum" or _left_operand(user) is n):
                    return True
                if name in _PASS_THROUGH:
                    nxt.append(user)
        frontier = nxt
    return False


def _left_operand(product):
    return product.args[1] if _op_name(product) == "baddbmm" else product.args[0]


def _softmax_count(gm: GraphModule) -> int:
    """Attention softmaxes left in the graph (those whose output reaches a P·V product)."""
    aten = torch.ops.aten
    return sum(n.target in (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
               and _feeds_a_product(n) for n in gm.graph.nodes)


def _run(pass_obj, gm: GraphModule, t: Traced, calibrated: bool = False):
    """run_pass (verified) and the pass's report record."""
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import PipelineReport, run_pass

    calibration = None
    if calibrated:
        calibration = [(t.ids,), (input_ids(*_calibration_shape(gm), seed=3),)]
    ctx = PassContext(example_inputs=(t.ids,), calibration=calibration, progress=lambda it, **_: it)
    report = PipelineReport()
    out = run_pass(pass_obj, gm, ctx, report=report)
    return out, report.records[-1]


def _calibration_shape(gm: GraphModule) -> tuple[int, int]:
    """(3, 7) where the graph takes any batch and length; the traced size in a dim the trace
    made static (a state-space scan over a fixed length, llama4_text's batch): a graph compiled
    for one size takes only that size, and the pass says so if given another."""
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    traced = ph.meta["val"].shape
    static = [isinstance(size, int) or size.node.expr.is_number for size in traced]
    return tuple(int(size) if fixed else want for size, fixed, want in zip(traced, static, (3, 7)))


def _reasons(skipped) -> str:
    return "; ".join(sorted({why for _where, why in skipped}))[:300]


def step_fuse_attention(t: Traced) -> str:
    """fuse_attention fuses every attention layer (one per softmax); a layer left unfused passes
    only with one of the pass's accepted reasons (a construct the op cannot take), any other
    reason (or none) fails the cell."""
    from fxforge.ir.ops import get_op
    from fxforge.passes.attention.fuse_attention import ACCEPTED_SKIP_REASONS, FuseAttention

    gm = _need_gm(t)
    softmaxes = _softmax_count(gm)
    if softmaxes == 0:
        raise NotApplicable("no attention softmax found (none reaches a P·V matmul through layout, "
                            "dtype or dropout ops): a recurrent/state-space mixer, or attention "
                            "reaching P·V some other way (e.g. through a slice)")
    fused, record = _run(FuseAttention(), gm, t)
    attention = get_op("attention").overload
    n_fused = sum(n.target == attention for n in fused.graph.nodes)
    left = _softmax_count(fused)
    accepted = [why for _where, why in record.skipped if why.startswith(ACCEPTED_SKIP_REASONS)]
    if left > len(accepted):
        why = _reasons(record.skipped) or "no reason given"
        raise CellFailure(f"{n_fused} of {n_fused + left} attention layers fused; unfused: {why}")
    t.fused = fused
    if left:  # each unfused layer has a construct the op cannot take (the pass docstring lists them)
        constructs = "; ".join(sorted({why.split(" (")[0] for why in accepted}))
        return f"{n_fused}/{n_fused + left} fused, {left} left eager for an accepted reason: {constructs}"
    return f"{n_fused}/{n_fused} fused"


def step_add_kv_cache(t: Traced) -> str:
    """add_kv_cache (after fuse_attention where it fused); token-by-token == uncached."""
    from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
    from fxforge.runtime.cache_inputs import cached_inputs, empty_past
    from fxforge.runtime.meta_keys import KV_META

    if t.built.family.kind != "decoder":
        raise NotApplicable("encoder: no KV cache")
    base = t.fused if t.fused is not None else _need_gm(t)
    cached, record = _run(AddKvCache(), base, t)
    meta = cached.meta.get(KV_META)
    if meta is None or not meta.past:  # a KVCacheLayout (fxforge/runtime/layouts.py)
        raise CellFailure(f"no cache added ({record.sites} sites; {_reasons(record.skipped) or 'no reason given'})")
    ids = t.ids
    past, steps = empty_past(meta, ids.shape[0], torch.float32), []
    for i in range(ids.shape[1]):
        out = cached(*cached_inputs(meta, ids[:, i:i + 1], i, past))
        steps.append(out[0])
        past = [out[j] for pair in meta.present for j in pair]
    err = _max_error(torch.cat(steps, 1), reference(t.built.model, ids))
    if not err <= TOL:
        raise CellFailure(f"token-by-token decoding differs from uncached by {err:.1e}")
    return f"{len(meta.past)} layers cached, max err {err:.0e}"


def _sites_step(pass_obj, t: Traced, calibrated: bool = False) -> str:
    gm = _need_gm(t)
    _out, record = _run(pass_obj, gm, t, calibrated)
    if record.sites == 0:
        raise CellFailure(f"0 sites rewritten ({_reasons(record.skipped) or 'no reason given'})")
    return f"{record.sites} sites"


def step_quantize(t: Traced) -> str:
    from fxforge.passes.registry import get_pass_class
    # group_size 32: the tiny hidden size (32) is not a multiple of the default 128
    return _sites_step(get_pass_class("quantize")(bits=4, group_size=32), t)


def step_add_adapters(t: Traced) -> str:
    from fxforge.passes.registry import get_pass_class
    return _sites_step(get_pass_class("add_adapters")(), t)


def step_sparsify(t: Traced) -> str:
    from fxforge.passes.registry import get_pass_class
    return _sites_step(get_pass_class("sparsify")(), t, calibrated=True)


def _block_linear_params(gm: GraphModule) -> int:
    """Parameters of the weights of the linears inside the numbered blocks (`layers.3.mlp.up`),
    each counted once (ALBERT runs one layer's weights in every block): what `prune`'s heads and
    channels are made of. Embedding projections and the LM head are outside the blocks; a model
    without numbered blocks counts every linear but the last (the LM head)."""
    aten = torch.ops.aten
    params = dict(gm.named_parameters())
    weights = [n.args[1] for n in gm.graph.nodes if n.target == aten.linear.default]
    names = list(dict.fromkeys(w.target for w in weights if getattr(w, "op", None) == "get_attr"))
    in_blocks = [n for n in names if any(part.isdigit() for part in n.split("."))]
    return sum(params[n].numel() for n in (in_blocks or names[:-1]) if n in params)


def step_prune(t: Traced) -> str:
    """prune(flap, 0.3) removes ≥ 80% of 30% of the block linears' parameters."""
    from fxforge.passes.registry import get_pass_class

    gm = _need_gm(t)
    pruned, record = _run(get_pass_class("prune")(method="flap", ratio=PRUNE_RATIO), gm, t, calibrated=True)
    target = _block_linear_params(gm)
    # the same count on both sides: parameters outside the blocks (embeddings, weights the
    # rewritten module no longer registers) would otherwise count as removed
    removed = target - _block_linear_params(pruned)
    share = removed / max(target, 1)
    if share < 0.8 * PRUNE_RATIO:
        why = _reasons(record.skipped) or "no reason given"
        raise CellFailure(f"removed {share:.0%} of block-linear parameters (< 80% of {PRUNE_RATIO:.0%}); "
                          f"skipped: {why}{_outside_blocks(record.notes.get('widths', {}))}")
    return f"removed {share:.0%} of block linears"


def _outside_blocks(widths: dict) -> str:
    """The structures outside the blocks the pass shrank: the ratio is over all candidate groups,
    so one there (OPT's word-embedding projection, 768 wide in the tiny config) spends the budget
    the block linears were counted against."""
    outside = [f"{label} {change}" for label, change in widths.items()
               if not any(part.isdigit() for part in label.split(" ")[0].split("."))]
    return f"; the ratio also went to groups outside the blocks: {', '.join(outside)}" if outside else ""


STEP_FUNCTIONS = {
    "trace": step_trace, "onnx": step_onnx, "fuse_attention": step_fuse_attention,
    "add_kv_cache": step_add_kv_cache, "quantize": step_quantize, "add_adapters": step_add_adapters,
    "prune": step_prune, "sparsify": step_sparsify,
}


def _text_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def first_line(e: BaseException) -> str:
    """The cell's reason: the exception's first line; for the ONNX exporter's ConversionError
    (whose first line is boilerplate) the innermost cause's, with the graph node's target it was
    translating."""
    root, node = e, ""
    while type(e).__name__ == "ConversionError" and root.__cause__ is not None:
        found = re.search(r"target=([\w.:]+)", str(root))
        node = found.group(1) if found and not node else node
        root = root.__cause__
    text = f"{type(root).__name__}: {_text_line(root)}"
    if node and node not in text:
        text += f" [node {node}]"
    return text[:240]


def run_cell(t: Traced, step: str) -> tuple[str, str]:
    """("pass", detail) | ("fail", reason) | ("n/a", reason) for one step of one family."""
    try:
        return "pass", STEP_FUNCTIONS[step](t)
    except NotApplicable as e:
        return "n/a", str(e)
    except Exception as e:  # noqa: BLE001 - the cell's reason, recorded in the table
        return "fail", first_line(e)


def new_traced(built: Built) -> Traced:
    return Traced(built, input_ids(*SHAPES[0], seed=1))

