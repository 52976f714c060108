"""Typed records of how a rewritten graph is called: written by passes, read by runtimes.

`add_kv_cache` writes a `KVCacheLayout` into `gm.meta[KV_META]`; `runtime.decoding`,
`runtime.generation`, Medusa and the decoder artifact read it instead of poking at loose dict
keys. Records are frozen dataclasses of ints, strings and tuples, so saving one in an
artifact's manifest is `to_json()` and loading it back is `from_json()`, which checks the type
of every field (the manifest comes from a file: a bad field is a clear error, never a
KeyError deep inside decoding).

This module imports nothing from `fxforge.passes`, so passes and runtimes both import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from fxforge.runtime.meta_keys import KV_META  # noqa: E402  (one home for the key)

# The mask a cached graph takes:
#   "tree":    tree_mask (B, 1, L, P + L) bool, True = may attend (Medusa trees, fxforge's own loops)
#   "padding": attention_mask (B, P + L) int64, 0 = padding (HF generate, optimum, onnxruntime-genai)
MASK_KINDS = ("tree", "padding")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def decoder_input_names(num_layers: int) -> list[str]:
    """Conventional decoder input names (optimum's text-generation-with-past, onnxruntime-genai)."""
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def decoder_output_names(num_layers: int) -> list[str]:
    """Conventional decoder output names: logits, then present.{i}.key/value per layer."""
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


@dataclass(frozen=True)
class KVCacheLayout:
    """Where a KV-cached graph takes and returns each tensor (flat input/output indices).

    Cache tensors are (batch, kv_heads, past_len, head_dim); `kv_shapes[i]` is
    (kv heads, key head dim, value head dim) of layer i in graph order.
    """

    input_ids: int
    position_ids: int
    mask: int                                  # index of tree_mask or attention_mask
    mask_kind: str                             # one of MASK_KINDS
    past: tuple[tuple[int, int], ...]          # (key input, value input) per layer
    present: tuple[tuple[int, int], ...]       # (key output, value output) per layer
    logits_output: int
    kv_shapes: tuple[tuple[int, int, int], ...]
    dtype: str                                 # torch dtype name of the cache, e.g. "float32"
    attention: str                             # which sites were cached: "fused", "eager", "mixed"
    num_inputs: int
    num_outputs: int
    tree_parents: int | None = None            # in-graph Medusa verification (runtime.greedy_verify)

    def __post_init__(self) -> None:
        _check_layout(self)

    # ------------------------------------------------------------------ derived

    @property
    def num_layers(self) -> int:
        return len(self.past)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kv_heads(self) -> int:
        """KV heads of the first layer (every layer has the same count in the models we export)."""
        return self.kv_shapes[0][0]

    @property
    def head_dim(self) -> int:
        return self.kv_shapes[0][1]

    @property
    def padding_mask(self) -> bool:
        """True when the graph takes an HF-style attention_mask (padded batches decode)."""
        return self.mask_kind == "padding"

    def replace(self, **changes: Any) -> "KVCacheLayout":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ plain data

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (lists for tuples) for an artifact's manifest."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Any, where: str = "KVCacheLayout") -> "KVCacheLayout":
        """The record from `to_json()` data; ValueError naming the field for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if set(data) - names or required - set(data):
            raise ValueError(f"{where} has fields {sorted(data)}; expected {sorted(required)} "
                             f"(and optionally {sorted(names - required)})")
        for name in ("input_ids", "position_ids", "mask", "logits_output", "num_inputs", "num_outputs"):
            _int(data[name], f"{where}.{name}")
        if data.get("tree_parents") is not None:
            _int(data["tree_parents"], f"{where}.tree_parents")
        for name in ("mask_kind", "dtype", "attention"):
            if not isinstance(data[name], str):
                raise ValueError(f"{where}.{name} must be a string, got {type(data[name]).__name__}")
        pairs = {name: _int_rows(data[name], 2, f"{where}.{name}") for name in ("past", "present")}
        shapes = _int_rows(data["kv_shapes"], 3, f"{where}.kv_shapes")
        return cls(**{**data, **pairs, "kv_shapes": shapes})


def _check_layout(layout: KVCacheLayout) -> None:
    if layout.mask_kind not in MASK_KINDS:
        raise ValueError(f"KVCacheLayout.mask_kind is {layout.mask_kind!r}; use one of {MASK_KINDS}")
    if layout.dtype not in _DTYPES:
        raise ValueError(f"KVCacheLayout.dtype is {layout.dtype!r}; use one of {_DTYPES}")
    if not layout.past or len(layout.past) != len(layout.present) or len(layout.past) != len(layout.kv_shapes):
        raise ValueError("KVCacheLayout needs one past pair, one present pair and one kv shape per layer "
                         f"(got {len(layout.past)}, {len(layout.present)}, {len(layout.kv_shapes)})")
    inputs = [layout.input_ids, layout.position_ids, layout.mask, *(i for pair in layout.past for i in pair)]
    if layout.tree_parents is not None:
        inputs.append(layout.tree_parents)
    if len(set(inputs)) != len(inputs) or not all(0 <= i < layout.num_inputs for i in inputs):
        raise ValueError(f"KVCacheLayout input indices {inputs} must be distinct and below num_inputs "
                         f"({layout.num_inputs})")
    outputs = [layout.logits_output, *(i for pair in layout.present for i in pair)]
    if len(set(outputs)) != len(outputs) or not all(0 <= i < layout.num_outputs for i in outputs):
        raise ValueError(f"KVCacheLayout output indices {outputs} must be distinct and below num_outputs "
                         f"({layout.num_outputs})")
    if any(d <= 0 for shape in layout.kv_shapes for d in shape):
        raise ValueError(f"KVCacheLayout.kv_shapes must be positive, got {layout.kv_shapes}")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{where} must be an integer, got {value!r}")
    return value


def _int_rows(value: Any, width: int, where: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list of {width}-integer lists, got {type(value).__name__}")
    rows = []
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise ValueError(f"{where}[{i}] must be a list of {width} integers, got {row!r}")
        rows.append(tuple(_int(x, f"{where}[{i}]") for x in row))
    return tuple(rows)


def kv_layout(meta: dict[str, Any]) -> KVCacheLayout | None:
    """The KV layout in a graph's meta, or None when the graph has no cache."""
    layout = meta.get(KV_META)
    if layout is None or isinstance(layout, KVCacheLayout):
        return layout
    raise TypeError(f"gm.meta[{KV_META!r}] holds a {type(layout).__name__}, not a KVCacheLayout")


# Records the artifact saves by `to_json` and loads by `from_json` (graph meta key -> type).
LAYOUT_RECORDS: dict[str, type[KVCacheLayout]] = {KV_META: KVCacheLayout}

__all__ = ["KV_META", "KVCacheLayout", "LAYOUT_RECORDS", "MASK_KINDS", "decoder_input_names",
           "decoder_output_names", "kv_layout"]
