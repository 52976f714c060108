"""Ship adapters on their own: `save_adapters` / `load_adapters` (safetensors + metadata).

    save_adapters(compiled, "adapter.safetensors")     # only adapter tensors, a few MB at most
    load_adapters(other_compiled, "adapter.safetensors")

The file holds each adapted layer's tensors under "<module path>.<role>" and, in the
safetensors metadata, the method, rank, alpha, scale and shapes of every layer. Loading checks
all of it against the graph first (same layers adapted, same method and rank, same shapes) and
changes nothing when anything disagrees. Residual methods (PiSSA, OLoRA, LoRA-GA, SORSA, LoLDU)
also store their residual base weight, without which their adapters mean something else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxforge.errors import FxforgeError
from fxforge.ir.graph import get_attr, set_attr
from fxforge.passes.adapters.common import adapter_records, freeze_all_but_adapters, get_method

FORMAT = "fxforge-adapters/1"
BASE_WEIGHT_ROLE = "base_weight"


class AdapterLoadError(FxforgeError, ValueError):
    """An adapter file does not fit the graph it is loaded into (nothing was changed)."""


def _graph_module(compiled: Any) -> torch.fx.GraphModule:
    return getattr(compiled, "graph_module", compiled)


def save_adapters(compiled: Any, path: str | Path) -> Path:
    """Write the adapter tensors of `compiled` (a CompiledModel or GraphModule) to `path`."""
    gm = _graph_module(compiled)
    records = adapter_records(gm)
    if not records:
        raise FxforgeError("save_adapters: the model has no adapters; compile it with passes='add_adapters(...)' "
                           "(adapters that were merged are part of the base weights now)")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for module_path, record in sorted(records.items()):
        roles = dict(record["tensors"])
        if get_method(record["method"]).changes_base_weight:
            roles[BASE_WEIGHT_ROLE] = record["weight"]
        for role, name in roles.items():
            tensors[f"{module_path}.{role}"] = get_attr(gm, name).detach().contiguous().cpu()
        layers[module_path] = {
            "method": record["method"], "rank": record["rank"], "alpha": record["alpha"],
            "scale": record["scale"], "options": record["options"],
            "shapes": {role: list(get_attr(gm, name).shape) for role, name in roles.items()},
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = sorted({layer["method"] for layer in layers.values()})
    metadata = {"format": FORMAT, "methods": ",".join(methods), "layers": json.dumps(layers)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_adapters(compiled: Any, path: str | Path) -> list[str]:
    """Load adapter tensors saved by `save_adapters` into `compiled`; return the layers loaded.

    Raises AdapterLoadError, naming the layer and the difference, when the file's layers,
    methods, ranks or shapes differ from the graph's adapters; the graph is then unchanged.
    """
    gm = _graph_module(compiled)
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"load_adapters: no file at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise AdapterLoadError(f"load_adapters: {path} is not an fxforge adapter file (format "
                                   f"{metadata.get('format')!r}, expected {FORMAT!r}); save it with save_adapters()")
        layers = json.loads(metadata["layers"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    records = adapter_records(gm)
    _check(records, layers, gm, path)
    for module_path, layer in layers.items():
        record = records[module_path]
        names = dict(record["tensors"])
        if BASE_WEIGHT_ROLE in layer["shapes"]:
            names[BASE_WEIGHT_ROLE] = record["weight"]
        for role, name in names.items():
            current = get_attr(gm, name)
            set_attr(gm, name, tensors[f"{module_path}.{role}"].to(current.dtype), trainable=current.requires_grad)
    freeze_all_but_adapters(gm)
    if hasattr(gm, "recompile"):
        gm.recompile()
    return sorted(layers)


def _check(records: dict[str, Any], layers: dict[str, Any], gm: torch.fx.GraphModule, path: Path) -> None:
    """Every mismatch between file and graph, in one error."""
    problems = []
    missing = sorted(set(layers) - set(records))
    extra = sorted(set(records) - set(layers))
    if missing:
        problems.append(f"layers in the file but without an adapter in the graph: {', '.join(missing)}")
    if extra:
        problems.append(f"adapted layers of the graph missing from the file: {', '.join(extra)}")
    for module_path in sorted(set(layers) & set(records)):
        layer, record = layers[module_path], records[module_path]
        for key in ("method", "rank"):
            if layer[key] != record[key]:
                problems.append(f"{module_path}: {key} is {layer[key]!r} in the file but {record[key]!r} in the graph")
        names = dict(record["tensors"])
        if BASE_WEIGHT_ROLE in layer["shapes"]:
            names[BASE_WEIGHT_ROLE] = record["weight"]
        for role, shape in layer["shapes"].items():
            if role not in names:
                problems.append(f"{module_path}: the graph's adapter has no tensor '{role}'")
                continue
            have = list(get_attr(gm, names[role]).shape)
            if have != shape:
                problems.append(f"{module_path}.{role}: shape {tuple(shape)} in the file but {tuple(have)} in the graph")
    if problems:
        raise AdapterLoadError(
            f"load_adapters: {path} does not fit this model (nothing was loaded):\n  - " + "\n  - ".join(problems)
            + "\nCompile the model with the same add_adapters(method=..., rank=..., targets=...) the file was saved from.")
