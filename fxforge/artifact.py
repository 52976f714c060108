"""Saving and loading compiled models as a directory artifact.

    out/
      manifest.json          fxforge/torch versions, pipeline, backend, input/output specs,
                             which tensors are parameters, and a sha256 of every other file
                             (and, with model.onnx, the ONNX translation options it was made with)
      weights.safetensors    every parameter and buffer of the graph
      inputs.safetensors     the flat example inputs (used to rebuild shape metadata on load)
      graph.json             the graph: nodes, targets, arguments (fxforge/ir/serialize.py)
      meta_tensors.safetensors   (if any) tensors inside pass metadata (merged adapters, masks)
      model.onnx[.data]      (if saved with onnx=True) the graph exported for ONNX Runtime
      tokenizer.json, ...    (if given as companions) files a runtime reads next to the model,
                             e.g. the tokenizer of the Hugging Face directory it came from

Threat model: what load trusts, what it refuses
-----------------------------------------------
An artifact may come from someone else. Loading it must never run code from it; the worst a
hostile artifact can do is describe a wrong (or uselessly large) model.

* Nothing is pickled: tensors are safetensors, everything else is JSON.
* The graph becomes Python source when FX builds a GraphModule, so every string that source is
  made from is checked first (`fxforge.ir.allowlist`): call targets must be aten/prims/fxforge
  ops found in `torch.ops` (minus file- and console-touching ones) or a handful of pure
  functions (`operator.getitem`, symbolic-shape arithmetic); node names are plain identifiers
  that are not keywords, builtins or dunders; attribute paths and keyword names are dotted
  identifiers. Anything else is an ArtifactError naming the node, raised before any source
  exists.
* Input/output structures are decoded without torch's `treespec_loads` (which imports modules
  named in the file); only containers already registered in the process are built.
* Every manifest field is checked by type; every file in the directory must be listed in the
  manifest with its sha256, and every listed file must be there.

The hashes detect corruption and accidental edits, not a malicious author: the hash lives in
the manifest, which the author also writes. Safety comes from the allowlists, the identifier
checks and safetensors. Out of scope: denial of service (a graph that allocates huge tensors or
runs long), and the numbers a hostile model computes.

Writes are all-or-nothing (`fxforge.atomic`): everything is validated in memory, written into a
temporary sibling directory, flushed, then swapped with the previous artifact in one rename.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file, save_file

from fxforge.artifact_manifest import FORMAT_VERSION, Manifest, load_treespec, parse_manifest
from fxforge.artifact_shapes import can_rebuild, input_shapes, rebuild_meta
from fxforge.atomic import BACKUP, atomic_directory, stale_siblings
from fxforge.errors import ArtifactError
from fxforge.ir.allowlist import check_attr_path, check_dotted_name
from fxforge.ir.graph import get_attr, params_and_buffers, set_attr
from fxforge.ir.serialize import graph_from_json, graph_to_json
from fxforge.ir.trace import IN_SPEC, INPUT_NAMES, OUT_SPEC, trace
from fxforge.models.hf import TOKENIZER_FILES
from fxforge.runtime.layouts import LAYOUT_RECORDS
from fxforge.version import __version__

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
INPUTS = "inputs.safetensors"
GRAPH = "graph.json"
META_TENSORS = "meta_tensors.safetensors"  # tensors inside pass metadata (merged adapters, masks)
ONNX = "model.onnx"
ONNX_DATA = "model.onnx.data"  # ONNX external data, written for models above 2 GB
REQUIRED_FILES = frozenset({WEIGHTS, INPUTS, GRAPH})
# Files saved next to the model for the runtimes that serve it (a tokenizer, a generation config),
# so the artifact directory is self-contained. Hashed and listed like the rest; fxforge.load
# never reads them. Only these names: an artifact holds no file of unknown purpose.
COMPANION_FILES = frozenset({*TOKENIZER_FILES, "generation_config.json", "genai_config.json"})
LISTED_FILES = REQUIRED_FILES | {META_TENSORS, ONNX, ONNX_DATA} | COMPANION_FILES
_SPEC_KEYS = (IN_SPEC, OUT_SPEC, INPUT_NAMES)  # saved in their own manifest fields

__all__ = ["FORMAT_VERSION", "ArtifactContents", "save_artifact", "load_artifact"]


@dataclass(frozen=True)
class ArtifactContents:
    """What an artifact holds: a plain record, so this module needs nothing from `fxforge.api`
    (which wraps it: `CompiledModel.save` builds one, `fxforge.load` turns one into a model).

    report: the pipeline report as JSON rows (informative; saved, not read back).
    """

    graph_module: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    pipeline_spec: str
    backend: str
    report: list[dict[str, Any]]
    onnx: "SavedOnnx | None" = None  # set by load_artifact when the artifact holds model.onnx


@dataclass(frozen=True)
class SavedOnnx:
    """The artifact's model.onnx (checked against its manifest hash) and the `OnnxOptions` it was
    translated with: `fxforge.load` opens it in ONNX Runtime instead of exporting again."""

    path: Path
    options: Any


# ------------------------------------------------------------------------------------ saving


@dataclass
class _Plan:
    """Everything a save writes, built and validated in memory before the first byte."""

    weights: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    meta_tensors: dict[str, torch.Tensor]
    graph_json: str
    manifest: dict[str, Any]


def save_artifact(compiled: ArtifactContents, directory: str | Path, *, onnx: bool = False,
                  onnx_options: Any = None, companions: Mapping[str, Path | bytes] | None = None,
                  exported: Any = None) -> Path:
    """Write `compiled` to `directory`, replacing a previous artifact there all at once.

    `onnx=True` also exports `model.onnx` into the artifact (listed and hashed like the rest),
    translated with `onnx_options` (an `OnnxOptions`; None: the defaults). `exported`: that graph
    already exported with those options (an `ExportedOnnx`, what the onnx backend made), written
    as it is instead of exporting again.
    `companions` maps COMPANION_FILES names to a file to copy or the bytes to write (the
    tokenizer files of the model's directory, a runtime config).
    Raises ArtifactError, with nothing written, when the model cannot be saved (metadata that
    is not JSON, a call target outside the allowlist, a companion of another name or missing)
    or `directory` is not an artifact's place.
    """
    directory = Path(directory)
    _check_target(directory)
    companions = _check_companions(companions)
    plan = _plan(compiled)
    if onnx:
        from fxforge.backends.onnx.options import OnnxOptions

        onnx_options = onnx_options or OnnxOptions()
        plan.manifest["onnx_options"] = dataclasses.asdict(onnx_options)
        from fxforge.backends.onnx.backend import check_lowerable

        check_lowerable(compiled.graph_module)  # refuse before writing, not halfway through
    with atomic_directory(directory) as staging:
        save_file(plan.weights, str(staging / WEIGHTS))
        save_file(plan.inputs, str(staging / INPUTS))
        if plan.meta_tensors:
            save_file(plan.meta_tensors, str(staging / META_TENSORS))
        (staging / GRAPH).write_text(plan.graph_json)
        if onnx:
            from fxforge.backends.onnx.backend import export_onnx

            if exported is None or not exported.write(staging / ONNX):
                export_onnx(compiled.graph_module, compiled.example_inputs, staging / ONNX, options=onnx_options)
        for name, source in companions.items():
            if isinstance(source, bytes):
                (staging / name).write_bytes(source)
            else:
                shutil.copyfile(source, staging / name)
        files = {path.name: _sha256(path) for path in sorted(staging.iterdir())}
        (staging / MANIFEST).write_text(json.dumps({**plan.manifest, "files": files}, indent=2))
    return directory


def _check_companions(companions: Mapping[str, Path | bytes] | None) -> dict[str, Path | bytes]:
    checked: dict[str, Path | bytes] = {}
    for name, source in (companions or {}).items():
        if name not in COMPANION_FILES:
            raise ArtifactError(f"cannot save companion file {name!r}: an artifact holds only "
                                f"{', '.join(sorted(COMPANION_FILES))} next to the model")
        if not isinstance(source, bytes):
            source = Path(source)
            if not source.is_file():
                raise ArtifactError(f"cannot save companion file {name!r}: {source} is not a file")
        checked[name] = source
    return checked


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"cannot save to {directory}: it is a file. Name a directory instead.")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise ArtifactError(f"refusing to replace {directory}: it holds files but no fxforge artifact "
                            f"({MANIFEST} is missing). Save to a new or empty directory.")


def _plan(compiled: ArtifactContents) -> _Plan:
    gm = compiled.graph_module
    graph_json = json.dumps(graph_to_json(gm.graph))
    tensors = params_and_buffers(gm)
    for name in tensors:
        check_attr_path(name, what="cannot save: tensor name")
    unique, aliases = _dedupe(tensors)
    meta_tensors: dict[str, torch.Tensor] = {}
    graph_meta = _pass_meta(gm, meta_tensors)
    specs = {}
    for field, key in (("in_spec", IN_SPEC), ("out_spec", OUT_SPEC)):
        specs[field] = pytree.treespec_dumps(gm.meta[key]) if gm.meta.get(key) else None
        if specs[field] is not None:
            try:
                load_treespec(specs[field], field=field)
            except ArtifactError as exc:
                raise ArtifactError(f"cannot save: the model's {exc}; return tuples, lists or dicts") from None
    input_names = gm.meta.get(INPUT_NAMES)
    for i, name in enumerate(input_names or ()):
        check_dotted_name(name, what=f"cannot save: input name #{i}")
    params = dict(gm.named_parameters(remove_duplicate=False))
    manifest = {
        "format": FORMAT_VERSION,
        "fxforge": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pipeline": compiled.pipeline_spec,
        "backend": compiled.backend,
        **specs,
        "input_names": list(input_names) if input_names is not None else None,
        "input_shapes": input_shapes(gm),  # load rebuilds shape metadata from these, without tracing
        "graph_meta": graph_meta,
        "tensors": {name: {"parameter": name in params,
                           "requires_grad": bool(params[name].requires_grad) if name in params else False,
                           "alias_of": aliases.get(name)}
                    for name in tensors},
        # The report is informative only; default=str keeps odd values from failing a save.
        "report": json.loads(json.dumps(compiled.report, default=str)),
    }
    json.dumps(manifest)  # graph_meta holds JSON values only (checked): fail here, not mid-write
    return _Plan(weights={k: v.detach().contiguous() for k, v in unique.items()},
                 inputs={f"input_{i}": x.contiguous() for i, x in enumerate(compiled.example_inputs)},
                 meta_tensors=meta_tensors, graph_json=graph_json, manifest=manifest)


def _pass_meta(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The `gm.meta` entries passes leave for later passes and runtimes (keys starting
    "fxforge_": KV-cache and Medusa layouts, adapter records, sparsity masks), as JSON with
    their tensors moved into `tensors`. Anything else in them is an error naming the key: a
    model must not silently lose it on load."""
    saved = {}
    for key, value in gm.meta.items():
        if not str(key).startswith("fxforge_") or key in _SPEC_KEYS:
            continue
        try:
            saved[key] = _encode_meta(value, tensors, key)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"cannot save graph metadata '{key}': {exc}. Passes must keep "
                                "gm.meta['fxforge_*'] entries to JSON values and tensors.") from exc
    return saved


def _encode_meta(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, tuple(LAYOUT_RECORDS.values())):  # typed layouts: plain data, typed on load
        return value.to_json()
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path} has non-string keys")
        if "__tensor__" in value:
            raise ValueError(f"{path} uses the reserved key '__tensor__'")
        return {k: _encode_meta(v, tensors, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # tuples come back as lists
        return [_encode_meta(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path} holds a {type(value).__name__}, which is neither JSON nor a tensor")


# ----------------------------------------------------------------------------------- loading


def load_artifact(directory: str | Path) -> ArtifactContents:
    """Read an artifact written by `save_artifact`, checking everything before using it.

    Raises ArtifactError naming the file, field or node at fault; see the module docstring for
    what is trusted. The record's `report` is empty: the saved one is informative only.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    _check_files(directory, manifest)
    graph = graph_from_json(_read_json(directory / GRAPH), tensor_names=manifest.tensors)
    weights, example_inputs, meta_tensors = _read_tensors(directory, manifest, graph)
    graph_meta = _decode_meta(manifest.graph_meta, meta_tensors, "graph_meta", 0)
    try:
        gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
        for name, info in manifest.tensors.items():
            set_attr(gm, name, weights[info.alias_of or name], buffer=not info.parameter,
                     trainable=info.requires_grad)
        gm = torch.fx.GraphModule(gm, graph, class_name="FxforgeGraph")  # FX generates code here
        if can_rebuild(example_inputs, manifest.input_shapes):
            rebuild_meta(gm, example_inputs, manifest.input_shapes)  # fake propagation, no trace
        else:  # an artifact without input_shapes (older, or derived input dims)
            gm = trace(gm, example_inputs)  # rebuilds node.meta["val"] with the same dynamic dims
        _restore_requires_grad(gm, manifest)
    except Exception as exc:  # the checked data still describes a graph that does not run
        raise ArtifactError(f"artifact {directory} describes a graph that cannot be rebuilt: "
                            f"{type(exc).__name__}: {exc}. Re-save it with CompiledModel.save().") from exc
    if manifest.in_spec:
        gm.meta[IN_SPEC] = load_treespec(manifest.in_spec, field="in_spec")
    if manifest.out_spec:
        gm.meta[OUT_SPEC] = load_treespec(manifest.out_spec, field="out_spec")
    gm.meta[INPUT_NAMES] = manifest.input_names
    gm.meta.update(graph_meta)
    # model.onnx is data for ONNX Runtime (hashed above); reused only when its options are recorded
    onnx = None
    if ONNX in manifest.files and manifest.onnx_options is not None:
        _check_onnx_external_data(directory / ONNX)
        onnx = SavedOnnx(directory / ONNX, manifest.onnx_options)
    return ArtifactContents(gm, example_inputs, pipeline_spec=manifest.pipeline, backend=manifest.backend, report=[],
                            onnx=onnx)


def _check_onnx_external_data(path: Path) -> None:
    """model.onnx may keep its weights in model.onnx.data and nowhere else: ONNX Runtime would
    otherwise read whatever file a hostile artifact names (an absolute path, `../`)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign protobuf
        raise ArtifactError(f"artifact {path.parent}: {ONNX} could not be read: {exc}") from None

    def tensors(graph: onnx.GraphProto) -> Any:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else [])
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for tensor in tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location != ONNX_DATA:
            raise ArtifactError(f"artifact {path.parent}: {ONNX} reads tensor {tensor.name!r} from {location!r}; "
                                f"an artifact's ONNX weights live in {ONNX_DATA} only. Re-save it.")


def _read_manifest(directory: Path) -> Manifest:
    if not directory.is_dir():
        backups = stale_siblings(directory, BACKUP)
        if backups and not directory.exists():
            raise ArtifactError(f"no artifact at {directory}: a save there was interrupted, and the "
                                f"previous artifact is at {backups[0]}. Rename it to {directory.name}.")
        raise ArtifactError(f"no artifact at {directory}: the directory does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an fxforge artifact: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{path} is corrupted: {exc}") from None
    from fxforge.backends import BACKENDS

    return parse_manifest(data, allowed_files=LISTED_FILES, backends=frozenset(BACKENDS))


def _check_files(directory: Path, manifest: Manifest) -> None:
    """Every file but the manifest is listed and matches its hash; every listed file exists."""
    missing = sorted(REQUIRED_FILES - set(manifest.files))
    if missing:
        raise ArtifactError(f"artifact {directory} is incomplete: its manifest does not list {missing[0]}. "
                            f"Re-save it with CompiledModel.save().")
    unlisted = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST and p.name not in manifest.files)
    if unlisted:
        raise ArtifactError(f"artifact {directory} holds files its manifest does not list: "
                            f"{', '.join(unlisted)}. An artifact is written whole by CompiledModel.save(); "
                            f"remove them or re-save it.")
    for name, digest in manifest.files.items():
        path = directory / name
        if path.is_symlink():
            raise ArtifactError(f"artifact {directory}: {name} is a symbolic link; artifacts hold plain files")
        if not path.is_file():
            raise ArtifactError(f"artifact {directory} is incomplete: {name} is missing. "
                                f"Re-save it with CompiledModel.save().")
        if _sha256(path) != digest:
            raise ArtifactError(f"artifact {directory} is corrupted: {name} does not match its checksum "
                                f"in {MANIFEST}. Re-save it with CompiledModel.save().")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path} is corrupted: {exc}") from None


def _read_tensors(directory: Path, manifest: Manifest, graph: torch.fx.Graph
                  ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    def read(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(directory / name))
        except Exception as exc:  # safetensors raises its own error type for a malformed file
            raise ArtifactError(f"artifact {directory}: {name} could not be read: {exc}") from None

    weights, inputs = read(WEIGHTS), read(INPUTS)
    meta_tensors = read(META_TENSORS) if META_TENSORS in manifest.files else {}
    stored = {name for name, info in manifest.tensors.items() if info.alias_of is None}
    if set(weights) != stored:
        diff = sorted(set(weights) ^ stored)
        raise ArtifactError(f"artifact {directory}: {WEIGHTS} and the manifest's 'tensors' disagree "
                            f"about {diff[:3]}. Re-save it with CompiledModel.save().")
    placeholders = sum(1 for n in graph.nodes if n.op == "placeholder")
    if set(inputs) != {f"input_{i}" for i in range(placeholders)}:
        raise ArtifactError(f"artifact {directory}: {INPUTS} must hold input_0..input_{placeholders - 1}, "
                            f"one example per graph input")
    return weights, tuple(inputs[f"input_{i}"] for i in range(placeholders)), meta_tensors


def _decode_meta(value: Any, tensors: dict[str, torch.Tensor], where: str, depth: int) -> Any:
    if depth > 64:
        raise ArtifactError(f"manifest field '{where}' is nested too deeply")
    if isinstance(value, dict):
        if "__tensor__" in value:
            key = value["__tensor__"]
            if set(value) != {"__tensor__"} or not isinstance(key, str) or key not in tensors:
                raise ArtifactError(f"manifest field '{where}' refers to a tensor {META_TENSORS} does not hold")
            return tensors[key]
        return {k: _decode_meta(v, tensors, f"{where}/{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_meta(v, tensors, f"{where}/{i}", depth + 1) for i, v in enumerate(value)]
    return value


def _restore_requires_grad(gm: torch.fx.GraphModule, manifest: Manifest) -> None:
    for name, info in manifest.tensors.items():
        if info.parameter:
            try:
                get_attr(gm, name).requires_grad_(info.requires_grad)
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
