"""LoRA-GA (Wang et al., 2024): align the first LoRA step with the full fine-tuning gradient.

The gradient G = ∂L/∂W of each target weight is averaged over `ga_batches` calibration batches
(the loss comes from `PassContext.extras["loss_fn"](outputs, flat_inputs)`, or next-token
cross-entropy when the graph takes `input_ids` and returns logits). With G = U·S·Vᵀ:

    A = V[:, :r]ᵀ,  B = U[:, r:2r] · out^(1/4)/√γ   (stable scale, γ = ga_gamma),  W_res = W - s·B·A

so the initial output is unchanged and s·(ΔB·A + B·ΔA) approximates a step along -G. The
rank may be at most half the smaller weight dimension (2r singular vectors are used).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite, get_attr
from fxforge.ir.trace import INPUT_NAMES
from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit
from fxforge.passes.methods import register_method


def default_loss(gm: GraphModule) -> Callable[[list, list], torch.Tensor] | None:
    """Next-token cross-entropy when the graph takes input_ids and returns (batch, seq, vocab) logits."""
    names = list(gm.meta.get(INPUT_NAMES) or [])
    if "input_ids" not in names:
        return None
    index = names.index("input_ids")

    def causal_lm_loss(outputs: list, inputs: list) -> torch.Tensor:
        logits, ids = outputs[0], inputs[index]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    return causal_lm_loss


@register_method("add_adapters")
@dataclass(frozen=True)
class LoraGa(AdapterMethod):
    """ga_batches: calibration batches the gradient is averaged over; ga_gamma: the stable
    scale's γ (B = U[:, r:2r]·out^(1/4)/√γ)."""

    name = "lora_ga"
    needs_calibration = True
    changes_base_weight = True
    ga_batches: int = 4
    ga_gamma: float = 16.0

    def __post_init__(self) -> None:
        check_ga_batches(self.ga_batches)
        if not self.ga_gamma > 0:
            raise ValueError(f"ga_gamma must be > 0, got {self.ga_gamma}")

    def max_rank(self, in_features: int, out_features: int) -> int:
        return min(in_features, out_features) // 2

    def prepare(self, gm: GraphModule, sites: list[LinearSite], ctx: Any, rank: int) -> dict[str, Any]:
        return averaged_gradients(gm, sites, ctx, self.ga_batches, self.name)

    def init(self, layer: LayerContext) -> LayerInit:
        r, scale = layer.rank, self.scale(layer.rank, layer.alpha)
        weight = layer.weight.float()
        u, _, vh = torch.linalg.svd(layer.data, full_matrices=False)
        stable = weight.shape[0] ** 0.25 / self.ga_gamma ** 0.5
        a = vh[:r].contiguous()
        b = (u[:, r:2 * r] * stable).contiguous()
        dtype = layer.weight.dtype
        return LayerInit(trainable={"lora_A": a.to(dtype), "lora_B": b.to(dtype)}, rank=r, scale=scale,
                         base_weight=(weight - scale * (b @ a)).to(dtype))


def check_ga_batches(value: int) -> None:
    """ValueError unless `value` (gradient batches of LoRA-GA / LoRA-SB) is >= 1."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"ga_batches must be >= 1, got {value!r}")


def averaged_gradients(gm: GraphModule, sites: list[LinearSite], ctx: Any, limit: int,
                       method: str) -> dict[str, Tensor]:
    """{module path: mean ∂loss/∂W over (at most `limit`) calibration batches} (LoRA-GA, LoRA-SB).

    `method` names the adapter method in errors (missing/empty/bad calibration, no loss).
    """
    ctx.require_calibration("add_adapters", method=method)
    loss_fn = ctx.extras.get("loss_fn") or default_loss(gm)
    if loss_fn is None:
        raise PassError(f"add_adapters(method='{method}') needs a loss to take gradients of: pass "
                        "fxforge.compile(..., extras={'loss_fn': fn}) (or PassContext(extras=...)) with fn(outputs, flat_inputs) -> scalar "
                        "(the default, next-token cross-entropy, needs an input named input_ids)",
                        pass_name="add_adapters")
    weights = {s.module_path: get_attr(gm, s.weight_name) for s in sites}
    flags = {name: p.requires_grad for name, p in gm.named_parameters()}
    grads = {path: torch.zeros_like(w, dtype=torch.float32) for path, w in weights.items()}
    batches = 0
    try:
        for p in gm.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        data = ctx.calibration_batches(gm, limit, pass_name="add_adapters", method=method)
        for flat in ctx.progress(data, desc=f"{method}: gradients", total=limit):
            with torch.enable_grad():
                outputs = gm(*flat)
                loss = loss_fn(list(outputs), list(flat))
                found = torch.autograd.grad(loss, list(weights.values()))
            for path, g in zip(weights, found):
                grads[path] += g.float()
            batches += 1
    finally:
        for name, p in gm.named_parameters():
            p.requires_grad_(flags.get(name, False))
    return {path: g / batches for path, g in grads.items()}
