"""Typed records of how a rewritten graph is called: written by passes, read by runtimes.

`add_kv_cache` writes a `KVCacheLayout` into `gm.meta[KV_META]`; `runtime.decoding`,
`runtime.generation`, Medusa and the decoder artifact read it instead of poking at loose dict
keys. `add_medusa_heads` (and the Medusa decoding passes) write a `MedusaLayout` into
`gm.meta[MEDUSA_META]` likewise. Records are frozen dataclasses of ints, strings and tuples, so saving one in an
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

from fxforge.runtime.meta_keys import KV_META, MEDUSA_META  # noqa: E402  (one home for the keys)

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
        _check_fields(cls, data, where)
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


@dataclass(frozen=True)
class MedusaLayout:
    """Where a graph with Medusa heads (`add_medusa_heads`) returns them, and how they are built.

    Written by `add_medusa_heads`; the decoding passes (`split_medusa_heads`,
    `medusa_greedy_verify`) write the changed record into the graph they return. The heads output
    holds, by stage:
        plain:      (K, B, L, V) head logits at every position;
        split:      `hidden_output` is set (the same index): the hidden state (B, L, d), the heads
                    run apart on the positions a step needs;
        verifying:  `best_output`/`next_token_output` are set: head logits (K, 1, 1, V) at the
                    tree node the graph accepted, plus that node and the next token, (1,) each.
    """

    num_heads: int
    num_layers: int                    # ResBlocks per head
    share_lm_head: bool
    logits_output: int
    heads_output: int
    hidden_size: int
    vocab_size: int
    lm_head: str                       # the LM head's weight (attribute path)
    prefix: str                        # attribute prefix of the heads' parameters
    hidden_node: str                   # the node whose value the heads read (the LM head's input)
    hidden_output: int | None = None
    best_output: int | None = None
    next_token_output: int | None = None

    def __post_init__(self) -> None:
        _check_medusa(self)

    @property
    def heads_apart(self) -> bool:
        """True when the graph returns the hidden state and the heads run separately."""
        return self.hidden_output is not None

    @property
    def verifies_in_graph(self) -> bool:
        """True when the graph accepts a tree greedily itself (`runtime.greedy_verify`)."""
        return self.best_output is not None

    def replace(self, **changes: Any) -> "MedusaLayout":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for an artifact's manifest."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Any, where: str = "MedusaLayout") -> "MedusaLayout":
        """The record from `to_json()` data; ValueError naming the field for anything malformed."""
        _check_fields(cls, data, where)
        for name, kind in _MEDUSA_TYPES.items():
            value = data.get(name)
            if value is None and name in _MEDUSA_OPTIONAL:
                continue
            if type(value) is not kind:
                raise ValueError(f"{where}.{name} must be {kind.__name__}, got {value!r}")
        return cls(**data)


_MEDUSA_TYPES = {"num_heads": int, "num_layers": int, "share_lm_head": bool, "logits_output": int,
                 "heads_output": int, "hidden_size": int, "vocab_size": int, "lm_head": str, "prefix": str,
                 "hidden_node": str, "hidden_output": int, "best_output": int, "next_token_output": int}
_MEDUSA_OPTIONAL = ("hidden_output", "best_output", "next_token_output")


def _check_fields(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    if set(data) - names or required - set(data):
        raise ValueError(f"{where} has fields {sorted(data)}; expected {sorted(required)} "
                         f"(and optionally {sorted(names - required)})")


def _check_medusa(layout: MedusaLayout) -> None:
    if layout.num_heads < 1 or layout.num_layers < 0 or layout.hidden_size < 1 or layout.vocab_size < 1:
        raise ValueError(f"MedusaLayout needs num_heads >= 1, num_layers >= 0 and positive sizes, got "
                         f"{layout.num_heads}, {layout.num_layers}, {layout.hidden_size}, {layout.vocab_size}")
    if (layout.best_output is None) != (layout.next_token_output is None):
        raise ValueError("MedusaLayout.best_output and next_token_output are set together (in-graph verification)")
    if layout.hidden_output is not None and layout.best_output is not None:
        raise ValueError("MedusaLayout: a graph either returns the hidden state for heads run apart "
                         "(hidden_output) or verifies in-graph (best_output), not both")
    if layout.hidden_output is not None and layout.hidden_output != layout.heads_output:
        raise ValueError(f"MedusaLayout.hidden_output ({layout.hidden_output}) replaces the heads output "
                         f"({layout.heads_output}): they are the same index")
    outputs = [layout.logits_output, layout.heads_output,
               *(i for i in (layout.best_output, layout.next_token_output) if i is not None)]
    if len(set(outputs)) != len(outputs) or min(outputs) < 0:
        raise ValueError(f"MedusaLayout output indices {outputs} must be distinct and non-negative")


def medusa_layout(meta: dict[str, Any]) -> MedusaLayout | None:
    """The Medusa layout in a graph's meta, or None when the graph has no heads."""
    layout = meta.get(MEDUSA_META)
    if layout is None or isinstance(layout, MedusaLayout):
        return layout
    raise TypeError(f"gm.meta[{MEDUSA_META!r}] holds a {type(layout).__name__}, not a MedusaLayout")


# Records the artifact saves by `to_json` and loads by `from_json` (graph meta key -> type).
LAYOUT_RECORDS: dict[str, type[KVCacheLayout] | type[MedusaLayout]] = {
    KV_META: KVCacheLayout, MEDUSA_META: MedusaLayout}

__all__ = ["KV_META", "KVCacheLayout", "LAYOUT_RECORDS", "MASK_KINDS", "MEDUSA_META", "MedusaLayout",
           "decoder_input_names", "decoder_output_names", "kv_layout", "medusa_layout"]
