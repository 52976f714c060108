"""PiSSA, OLoRA and LoRA-GA adapters as plain PEFT LoRA, relative to the original weights.

These methods rewrite the base weight at init (W_res = W - s·B₀·A₀) and train A, B on top, so
the adapted layer computes W_res + s·B·A. A PEFT directory is loaded onto the *original*
model, whose W no file of ours holds; PEFT's own answer (`save_pretrained(...,
path_initial_model_for_weight_conversion=...)`) writes the whole change as a LoRA of rank 2r:

    W_res + s·B·A - W  =  s·(B·A - B₀·A₀)  =  s·[B, -B₀]·[A; A₀]

A₀, B₀ are not kept (training moved on from them), so the same update is recovered from the
weights: ΔW = (W_res + s·B·A) - W, factored by an SVD at rank ≤ 2r with PEFT's scaling 1
(lora_alpha = r), in float64. That takes
the user's original model (`base_model=`), and checks it is the one compiled: if ΔW is not of
rank ≤ 2r up to the dtype's rounding, the weights are not the ones the adapters were made from.
"""
from __future__ import annotations

from typing import Any

import torch

from fxforge.ir.graph import get_attr
from fxforge.passes.adapters.common import adapter_tensors, get_method

RESIDUAL_LORA = ("pissa", "olora", "lora_ga")  # PEFT has these inits; their tensors are LoRA's A, B


class ResidualConversionError(ValueError):
    """`base_model` is missing, lacks a layer, or is not the model the adapters were compiled from."""


def residual_as_lora(gm: torch.fx.GraphModule, path: str, record: dict[str, Any], base_model: Any,
                     conv1d: bool) -> tuple[dict[str, torch.Tensor], int]:
    """({"lora_A": (k, in), "lora_B": (out, k)}, k) with B·A = the layer's whole change from
    `base_model`'s weight (PEFT scaling 1, so alpha = r = k)."""
    try:
        original = base_model.get_submodule(path).weight.detach()
    except AttributeError:
        raise ResidualConversionError(f"{path}: base_model has no layer with a weight at this path; pass the "
                                      f"model you compiled") from None
    if conv1d:
        original = original.t()  # transformers Conv1D stores (in, out)
    residual = get_attr(gm, record["weight"]).detach()
    if tuple(original.shape) != tuple(residual.shape):
        raise ResidualConversionError(f"{path}: base_model's weight is {tuple(original.shape)}, the compiled "
                                      f"layer's {tuple(residual.shape)}; pass the model you compiled")
    method = get_method(record["method"])
    adapted = method.merged_weight(residual.double(), {k: v.detach().double() for k, v in
                                                       adapter_tensors(gm, record).items()}, record["scale"])
    delta = adapted - original.double()
    rank = min(2 * record["rank"], *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    # what an SVD at rank 2r cannot reach is the part that no PiSSA-style init of this weight makes
    error = torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(original.double()).clamp_min(1e-30)
    bound = max(1e-5, 4 * torch.finfo(residual.dtype).eps)
    if error > bound:
        raise ResidualConversionError(
            f"{path}: the adapted weight differs from base_model's by a change of rank > {rank} (relative "
            f"residual {float(error):.1e} > {bound:.0e}); base_model is not the model these adapters were "
            f"compiled from")
    dtype = residual.dtype
    return {"lora_A": a.to(dtype).contiguous(), "lora_B": b.to(dtype).contiguous()}, rank
