"""Pass `bitdelta`: store a fine-tuned model as its base model plus 1-bit deltas (BitDelta).

The graph being compiled is the fine-tuned model; `base` is the base model (an nn.Module of the
same architecture, its state_dict, or a .safetensors / torch.save file of one). Per linear:

    Δ = W_fine - W_base;   Δ̂ = α·sign(Δ),  α = mean|Δ|   (one scale per matrix)
    aten.linear(x, W_fine, b) -> fxforge.linear_bitdelta(x, W_base, signs, α, b)

The base weight keeps the original parameter name, the delta lives in `<layer>.delta_signs` and
`<layer>.delta_alpha`, so one base graph serves many deltas: `delta_state(gm)` extracts a
fine-tune's delta and `load_delta(gm, state)` swaps it in. With `distill_steps` > 0 the α's
are distilled (AdamW, lr 1e-4): MSE between the fine-tuned graph's and the compressed graph's
outputs on the calibration inputs (or the example inputs when none are given).

Semantics (verified exactly): the graph before with each rewritten weight replaced by
W_base + α·sign(Δ) (sign +1 where Δ > 0, else -1; α after distillation), from the unpacked signs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite, add_attr, get_attr, replace_with_call, set_attr
from fxforge.ir.ops import get_op
from fxforge.ir.ops.linear_bitdelta import bitdelta_weight, pack_signs
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.quantize.common import bias_node, check_option, weight_of
from fxforge.passes.selection import LayerSelection

DELTA_SUFFIXES = (".delta_signs", ".delta_alpha")


def base_state_dict(base: Any) -> Mapping[str, Tensor]:
    """The base model's tensors by parameter name, from a module, a mapping or a file."""
    if isinstance(base, nn.Module):
        return base.state_dict()
    if isinstance(base, Mapping):
        return base
    if isinstance(base, (str, Path)):
        path = Path(base)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    raise TypeError(f"bitdelta: base must be an nn.Module, a state dict or a file path, got {type(base).__name__}")


def _base_weight(pass_name: str, site: LinearSite, state: Mapping[str, Tensor], fine: Tensor) -> Tensor:
    base = state.get(site.weight_name)
    fix = ("Pass the base model this one was fine-tuned from (same architecture and parameter names), or "
           f"exclude=['{site.module_path}']. The model was not changed.")
    if base is None:
        raise PassError(f"pass '{pass_name}': the base model has no parameter '{site.weight_name}' for layer "
                        f"'{site.module_path}': it is not the same architecture. {fix}", pass_name=pass_name)
    if base.shape != fine.shape and base.dim() == 2 and base.T.shape == fine.shape:
        base = base.T  # GPT-2's Conv1D stores (in, out); the canonical graph holds (out, in)
    if base.shape != fine.shape:
        raise PassError(f"pass '{pass_name}': layer '{site.module_path}' is {tuple(fine.shape)} in the fine-tuned "
                        f"model but {tuple(base.shape)} in the base model: not the same architecture. {fix}",
                        pass_name=pass_name)
    return base.detach().to(fine.dtype)


class _DifferentiableBitDelta(Interpreter):
    """Runs the graph with linear_bitdelta as plain torch, so gradients reach the α's."""

    def __init__(self, gm: GraphModule, alphas: dict[str, Tensor]):
        super().__init__(gm)
        self.alphas = alphas
        self.op = get_op("linear_bitdelta").overload

    def call_function(self, target, args, kwargs):
        if target is self.op:
            x, base, signs, alpha, bias = args
            return torch.nn.functional.linear(x, bitdelta_weight(base, signs, alpha), bias)
        return super().call_function(target, args, kwargs)

    def fetch_attr(self, target: str):
        return self.alphas.get(target, super().fetch_attr(target))


def distill_alphas(fine: GraphModule, compressed: GraphModule, batches: list[list[Any]], steps: int,
                   lr: float) -> list[float]:
    """Train only the α's: MSE between fine-tuned and compressed outputs. Returns the loss curve."""
    names = [n for n, _ in compressed.named_buffers() if n.endswith(".delta_alpha")]
    alphas = {n: get_attr(compressed, n).detach().clone().requires_grad_(True) for n in names}
    optimizer = torch.optim.AdamW(list(alphas.values()), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        targets = [_first(fine(*b)) for b in batches]
    losses = []
    runner = _DifferentiableBitDelta(compressed, alphas)
    with torch.enable_grad():
        for step in range(steps):
            index = step % len(batches)
            out = _first(runner.run(*batches[index]))
            loss = torch.nn.functional.mse_loss(out, targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    for name, value in alphas.items():
        set_attr(compressed, name, value.detach(), buffer=True)
    return losses


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def delta_state(gm: GraphModule) -> dict[str, Tensor]:
    """The per-fine-tune tensors of a bitdelta graph (sign bits and α's), by name."""
    return {n: t for n, t in gm.named_buffers() if n.endswith(DELTA_SUFFIXES)}


def load_delta(gm: GraphModule, state: Mapping[str, Tensor]) -> None:
    """Swap another fine-tune's delta (from `delta_state`) into a graph on the same base."""
    mine = delta_state(gm)
    if set(mine) != set(state):
        raise ValueError(f"load_delta: the delta has tensors {sorted(set(state) ^ set(mine))[:4]} that this graph "
                         f"does not (or lacks them); both must be bitdelta graphs of the same architecture")
    for name, value in state.items():
        set_attr(gm, name, value.clone(), buffer=True)


@register_pass
@dataclass(frozen=True)
class BitDelta(Pass):
    """Fine-tuned linears -> base weight + α·sign(Δ); see the module docstring."""

    name = "bitdelta"
    consumes = frozenset({"linear"})  # passes/compatibility.py
    produces = "linear_bitdelta"
    base: Any = field(default=None, compare=False)
    distill_steps: int = 0
    lr: float = 1e-4
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        check_option(self.base is not None, "bitdelta: base is required: the base model (nn.Module, state dict or "
                                            "file) the compiled model was fine-tuned from")
        check_option(self.distill_steps >= 0 and self.lr > 0, "bitdelta: distill_steps must be >= 0 and lr > 0")

    def spec(self) -> str:
        """Like Pass.spec, with the base model shown by type only (its weights are not an option string)."""
        opts = [f"base=<{type(self.base).__name__}>"] + [
            f"{k}={v!r}" for k, v in self.options().items()
            if k != "base" and v != self.__dataclass_fields__[k].default]
        return f"{self.name}({','.join(opts)})"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        state = base_state_dict(self.base)
        selection = LayerSelection.of(self).sites(gm, self.name)
        sites = selection.sites
        bases = {}
        for site in sites:  # every layer checked before any change
            fine = weight_of(gm, site)
            bases[site.node.name] = _base_weight(self.name, site, state, fine)
            if site.in_features % 8:
                raise PassError(f"pass '{self.name}': layer '{site.module_path}' has {site.in_features} inputs, not a "
                                f"multiple of 8 (sign bits pack 8 a byte); exclude=['{site.module_path}']. The model "
                                f"was not changed.", pass_name=self.name)
        fine_graph = copy.deepcopy(gm) if self.distill_steps else None
        op = get_op("linear_bitdelta").overload
        claims: dict[str, tuple[Tensor, Tensor, str]] = {}  # weight -> (base, ±1 int8, α attribute)
        for site in sites:
            fine, base = weight_of(gm, site), bases[site.node.name]
            delta = fine.float() - base.float()
            alpha = delta.abs().mean().reshape(1)
            base_node = site.node.args[1]
            set_attr(gm, site.weight_name, base, trainable=False)
            signs = add_attr(gm, f"{site.module_path}.delta_signs", pack_signs(delta), buffer=True, before=site.node)
            alpha_node = add_attr(gm, f"{site.module_path}.delta_alpha", alpha.to(fine.dtype), buffer=True,
                                  before=site.node)
            replace_with_call(gm, site.node, op, (site.input, base_node, signs, alpha_node, bias_node(site)))
            claims[site.weight_name] = (base, torch.where(delta > 0, 1, -1).to(torch.int8), alpha_node.target)
        notes: dict[str, Any] = {}
        if self.distill_steps and sites:
            # calibration is optional here (the example inputs do), but given data must be good data
            batches = (list(ctx.calibration_batches(gm, pass_name=self.name)) if ctx.calibration is not None
                       else [list(ctx.example_inputs)])
            losses = distill_alphas(fine_graph, gm, batches, self.distill_steps, self.lr)
            notes["distill_loss"] = (losses[0], losses[-1])
        semantics = Semantics()
        for weight_name, (base, sign, alpha_name) in claims.items():  # α read after distillation
            alpha = get_attr(gm, alpha_name).to(torch.float32).reshape(())
            semantics.replace_weight(weight_name, base.to(torch.float32) + alpha * sign.to(torch.float32))
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, notes=notes, semantics=semantics)
