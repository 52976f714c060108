"""Autograd for fxforge ops whose reference is plain differentiable torch: recompute and differentiate.

`register_recompute_autograd(op, forward)` makes a custom op trainable by re-running its
pure-torch `forward` under autograd in the backward pass and returning the input gradients.
It costs one extra forward per backward, which is fine for adapters whose update is cheap to
recompute (DoRA's weight norm, MiSS/Bone's block updates); ops on hot paths write their
backward out instead (see lora_linear.py). This module defines no op itself.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def register_recompute_autograd(op: Any, forward: Callable[..., torch.Tensor]) -> None:
    """Register a backward for custom op `op` that differentiates `forward` (same signature)."""

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        is_tensor = [isinstance(v, torch.Tensor) for v in inputs]
        ctx.save_for_backward(*[v for v, t in zip(inputs, is_tensor) if t])
        ctx.others = [None if t else v for v, t in zip(inputs, is_tensor)]
        ctx.is_tensor = is_tensor

    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        saved = iter(ctx.saved_tensors)
        args, wanted = [], []
        for i, (is_t, other) in enumerate(zip(ctx.is_tensor, ctx.others)):
            if not is_t:
                args.append(other)
                continue
            value = next(saved).detach()
            if ctx.needs_input_grad[i]:
                value.requires_grad_(True)
                wanted.append(i)
            args.append(value)
        grads: list[Any] = [None] * len(args)
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            out = forward(*args)
            found = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g if g is not None else torch.zeros_like(args[i])
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
