"""Saving and loading compiled models as a directory artifact.

    out/
      manifest.json          fxforge/torch versions, pipeline, backend, input/output specs,
                             which tensors are parameters, and a sha256 of every file
      weights.safetensors    every parameter and buffer of the graph
      inputs.safetensors     the flat example inputs (used to rebuild shape metadata on load)
      graph.json             the graph: nodes, targets, arguments (fxforge/ir/serialize.py)

Loading checks every file against the manifest before reading it, then re-traces the graph on
the saved example inputs so the loaded IR has the same metadata a fresh compile would. Nothing
is pickled, so loading an artifact runs no code from it.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file, save_file

import fxforge
from fxforge.errors import ArtifactError
from fxforge.ir.graph import get_attr, params_and_buffers, set_attr
from fxforge.ir.serialize import graph_from_json, graph_to_json
from fxforge.ir.trace import IN_SPEC, INPUT_NAMES, OUT_SPEC, trace

if TYPE_CHECKING:
    from fxforge.api import CompiledModel

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
INPUTS = "inputs.safetensors"
GRAPH = "graph.json"
META_TENSORS = "meta_tensors.safetensors"  # tensors inside pass metadata (merged adapters, masks)
FORMAT_VERSION = 1


def save_artifact(compiled: "CompiledModel", directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    gm = compiled.graph_module
    tensors = params_and_buffers(gm)
    unique, aliases = _dedupe(tensors)
    save_file({k: v.detach().contiguous() for k, v in unique.items()}, str(directory / WEIGHTS))
    inputs = {f"input_{i}": x.contiguous() for i, x in enumerate(compiled.example_inputs)}
    save_file(inputs, str(directory / INPUTS))
    (directory / GRAPH).write_text(json.dumps(graph_to_json(gm.graph)))
    meta_tensors: dict[str, torch.Tensor] = {}
    graph_meta = _pass_meta(gm, meta_tensors)
    if meta_tensors:
        save_file(meta_tensors, str(directory / META_TENSORS))
    params = dict(gm.named_parameters(remove_duplicate=False))
    manifest = {
        "format": FORMAT_VERSION,
        "fxforge": fxforge.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pipeline": compiled.pipeline_spec,
        "backend": compiled.backend,
        "in_spec": pytree.treespec_dumps(gm.meta[IN_SPEC]) if gm.meta.get(IN_SPEC) else None,
        "out_spec": pytree.treespec_dumps(gm.meta[OUT_SPEC]) if gm.meta.get(OUT_SPEC) else None,
        "input_names": gm.meta.get(INPUT_NAMES),
        "graph_meta": graph_meta,
        "tensors": {name: {"parameter": name in params,
                           "requires_grad": bool(params[name].requires_grad) if name in params else False,
                           "alias_of": aliases.get(name)}
                    for name in tensors},
        "report": compiled.report.pipeline.to_dict(),
        "files": {name: _sha256(directory / name)
                  for name in (WEIGHTS, INPUTS, GRAPH, *([META_TENSORS] if meta_tensors else []))},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return directory


def load_artifact(directory: str | Path, backend: str | None = None, **backend_options: Any) -> "CompiledModel":
    from fxforge.api import CompiledModel

    directory = Path(directory)
    manifest = _read_manifest(directory)
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact {directory} is incomplete: {name} is missing. Re-save it with CompiledModel.save().")
        if _sha256(path) != digest:
            raise ArtifactError(f"artifact {directory} is corrupted: {name} does not match its checksum "
                                f"in {MANIFEST}. Re-save it with CompiledModel.save().")
    try:
        graph = graph_from_json(json.loads((directory / GRAPH).read_text()))
        weights = load_file(str(directory / WEIGHTS))
        inputs_file = load_file(str(directory / INPUTS))
        meta_tensors = load_file(str(directory / META_TENSORS)) if META_TENSORS in manifest["files"] else {}
    except Exception as exc:
        raise ArtifactError(f"artifact {directory} could not be read: {type(exc).__name__}: {exc}") from exc
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    for name, info in manifest["tensors"].items():
        value = weights[info["alias_of"] or name]
        set_attr(gm, name, value, buffer=not info["parameter"], trainable=info["requires_grad"])
    gm = torch.fx.GraphModule(gm, graph, class_name="FxforgeGraph")
    example_inputs = tuple(inputs_file[f"input_{i}"] for i in range(len(inputs_file)))
    gm = trace(gm, example_inputs)  # rebuilds node.meta["val"] with the same dynamic dims
    _restore_requires_grad(gm, manifest)
    if manifest.get("in_spec"):
        gm.meta[IN_SPEC] = pytree.treespec_loads(manifest["in_spec"])
    if manifest.get("out_spec"):
        gm.meta[OUT_SPEC] = pytree.treespec_loads(manifest["out_spec"])
    gm.meta[INPUT_NAMES] = manifest.get("input_names")
    gm.meta.update(_decode_meta(manifest.get("graph_meta") or {}, meta_tensors))
    return CompiledModel(gm, backend or manifest["backend"], example_inputs=example_inputs,
                         pipeline_spec=manifest["pipeline"], backend_options=backend_options)


def _pass_meta(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The `gm.meta` entries passes leave for later passes and runtimes (keys starting
    "fxforge_": KV-cache and Medusa layouts, adapter records, sparsity masks), as JSON with
    their tensors moved into `tensors`. Anything else in them is an error naming the key: a
    model must not silently lose it on load."""
    saved = {}
    for key, value in gm.meta.items():
        if not str(key).startswith("fxforge_") or key in (IN_SPEC, OUT_SPEC, INPUT_NAMES):
            continue  # the I/O specs are saved in their own manifest fields
        try:
            saved[key] = _encode_meta(value, tensors, key)
        except TypeError as exc:
            raise ArtifactError(f"cannot save graph metadata '{key}': {exc}. Passes must keep "
                                "gm.meta['fxforge_*'] entries to JSON values and tensors.") from exc
    return saved


def _encode_meta(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path} has non-string keys")
        return {k: _encode_meta(v, tensors, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # tuples come back as lists
        return [_encode_meta(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path} holds a {type(value).__name__}, which is neither JSON nor a tensor")


def _decode_meta(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _decode_meta(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_meta(v, tensors) for v in value]
    return value


def _read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ArtifactError(f"no artifact at {directory}: the directory does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an fxforge artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupted: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION or "files" not in manifest or "tensors" not in manifest:
        raise ArtifactError(f"{path} is not a format-{FORMAT_VERSION} fxforge manifest")
    return manifest


def _restore_requires_grad(gm: torch.fx.GraphModule, manifest: dict[str, Any]) -> None:
    for name, info in manifest["tensors"].items():
        if info["parameter"]:
            try:
                get_attr(gm, name).requires_grad_(info["requires_grad"])
            except AttributeError:
                pass  # an unused tensor the re-trace dropped


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep each tensor once, record the others as aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and t.numel() > 0:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
