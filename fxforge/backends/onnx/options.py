"""Options of the ONNX translation, one frozen record per export.

`compile(..., backend="onnx", backend_options={"accuracy_level": 0})` reaches the backend's
`prepare(gm, inputs, **options)`, which builds an `OnnxOptions` and hands it to
`translation_table(options)`. A lowering that reads an option declares a keyword-only
`options: OnnxOptions` parameter; the table binds it (`bind_options`), so nothing is read from a
module global and two exports with different options can run side by side.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fxforge.errors import BackendError

__all__ = ["OnnxOptions", "ACCURACY_LEVELS", "CAUSAL_OPERATORS", "BIDIRECTIONAL_OPERATORS", "bind_options"]

# MatMulNBits' accuracy_level: 0 unset (the activation type: float, exact), 1 fp32, 2 fp16,
# 3 bf16, 4 int8 (activations quantized per block: fastest on CPU, ~0.5% relative error)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# operators for unmasked causal self-attention (see lowerings/attention.py)
CAUSAL_OPERATORS = ("Attention", "GroupQueryAttention")
# operators for non-causal attention with one key head per query head (lowerings/attention_prefill.py)
BIDIRECTIONAL_OPERATORS = ("Attention", "MultiHeadAttention")


@dataclass(frozen=True)
class OnnxOptions:
    """How fxforge ops become ONNX operators.

    accuracy_level: `com.microsoft::MatMulNBits`' minimum compute precision for weight-quantized
        linears (`linear_wq`): 4 (default) quantizes activations to int8 per block, about 4x
        faster than 0 for int4 at batch 1, at ~0.5% relative error; 0 computes in float.
    causal_attention: the operator for unmasked causal self-attention: "GroupQueryAttention"
        (default, com.microsoft: ORT's CPU kernel skips the hidden triangle; 0.4-0.5x the time
        of ONNX `Attention` or the unfused graph at 512 and 2048 tokens, bench/attention.py)
        or "Attention" (ONNX opset 23). Cases GroupQueryAttention cannot express still use
        Attention, so it changes speed, never results (beyond float reordering).
    bidirectional_attention: the operator for non-causal attention (encoders: BERT, ViT):
        "MultiHeadAttention" (default, com.microsoft; float32 with one key head per query head,
        other cases stay on Attention: at 2048 tokens 0.81x the unfused time without a mask
        (MLAS flash attention) and ~0.9x with a padding mask, where ONNX Attention is ~1.0x;
        at 512 tokens with a mask the two are within noise; bench/attention.py) or "Attention"
        (ONNX opset 23).
    """

    accuracy_level: int = 4
    causal_attention: str = "GroupQueryAttention"
    bidirectional_attention: str = "MultiHeadAttention"

    def __post_init__(self) -> None:
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in ACCURACY_LEVELS:
            raise BackendError(f"onnx backend option accuracy_level={self.accuracy_level!r} must be one of "
                               f"{', '.join(map(str, ACCURACY_LEVELS))} (0: float compute, exact; 4: int8 "
                               f"activations, fastest)")
        if self.causal_attention not in CAUSAL_OPERATORS:
            raise BackendError(f"onnx backend option causal_attention={self.causal_attention!r} must be one of "
                               f"{', '.join(CAUSAL_OPERATORS)}")
        if self.bidirectional_attention not in BIDIRECTIONAL_OPERATORS:
            raise BackendError(f"onnx backend option bidirectional_attention={self.bidirectional_attention!r} must be "
                               f"one of {', '.join(BIDIRECTIONAL_OPERATORS)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_backend_options(cls, options: Mapping[str, Any] | None) -> "OnnxOptions":
        """The translation options among a backend-options dict (which may also hold ORT's
        `threads`, `path`, ...)."""
        options = options or {}
        return cls(**{name: options[name] for name in cls.names() if name in options})


def bind_options(lowering: Callable, options: OnnxOptions) -> Callable:
    """`lowering` itself, or, when it declares a keyword-only `options` parameter, a function
    with the same signature minus `options` that passes this record.

    The exporter reads a lowering's signature and annotations to tell ONNX inputs from
    attributes, so the bound function must show exactly the op's parameters.
    """
    signature = inspect.signature(lowering)
    if "options" not in signature.parameters:
        return lowering

    @functools.wraps(lowering)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return lowering(*args, **kwargs, options=options)

    bound.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "options"])
    bound.__annotations__ = {k: v for k, v in lowering.__annotations__.items() if k != "options"}
    return bound
