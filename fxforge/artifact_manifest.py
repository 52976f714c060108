"""manifest.json as a typed record: every field checked by type before anything uses it.

A malformed field is an `ArtifactError` naming the field and what it should hold, never a
KeyError or AttributeError from deep inside loading. The input/output structures (pytree
specs) are decoded here too, by a decoder that only builds containers already registered in
this process: torch's own `treespec_loads` imports modules named in the file (enum and
defaultdict contexts), which would run code from the artifact.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree

from fxforge.artifact_shapes import check_input_shapes
from fxforge.errors import ArtifactError
from fxforge.ir.allowlist import check_attr_path, check_dotted_name
from fxforge.ir.trace import IN_SPEC, INPUT_NAMES, OUT_SPEC
from fxforge.runtime.layouts import LAYOUT_RECORDS

FORMAT_VERSION = 1
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SPEC_DEPTH = 32


@dataclass(frozen=True)
class TensorInfo:
    """How one saved tensor comes back: parameter or buffer, trainable, or an alias of another."""

    parameter: bool
    requires_grad: bool
    alias_of: str | None


@dataclass(frozen=True)
class Manifest:
    """The checked contents of manifest.json."""

    fxforge: str
    torch: str
    python: str
    pipeline: str
    backend: str
    in_spec: str | None
    out_spec: str | None
    input_names: list[str] | None
    graph_meta: dict[str, Any]
    tensors: dict[str, TensorInfo]
    report: list[Any]
    files: dict[str, str]
    # the OnnxOptions model.onnx was translated with (absent: no model.onnx, or an older artifact,
    # whose file is then not reused by fxforge.load)
    onnx_options: Any = None
    # each graph input's dims, ints and dim names (fxforge/artifact_shapes.py): load rebuilds shape
    # metadata from them without tracing; absent (older artifacts, derived dims): load re-traces
    input_shapes: list[list[int | str]] | None = None


def parse_manifest(data: Any, *, allowed_files: frozenset[str], backends: frozenset[str]) -> Manifest:
    """Check every field of the parsed manifest.json; ArtifactError naming the first bad one."""
    if not isinstance(data, dict):
        raise ArtifactError(f"manifest.json must hold an object, got {type(data).__name__}")
    version = data.get("format")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(f"manifest field 'format' is {version!r}: this fxforge reads format "
                            f"{FORMAT_VERSION}; re-save the artifact with this version")
    known = {"format", *Manifest.__dataclass_fields__}
    if set(data) - known:
        raise ArtifactError(f"manifest has unknown fields {sorted(set(data) - known)}")
    text = {name: _field(data, name, str) for name in ("fxforge", "torch", "python", "pipeline", "backend")}
    if text["backend"] not in backends:
        raise ArtifactError(f"manifest field 'backend' is {text['backend']!r}, not one of "
                            f"{', '.join(sorted(backends))}")
    input_names = _field(data, "input_names", list, optional=True)
    if input_names is not None:
        for i, name in enumerate(input_names):
            check_dotted_name(name, what=f"manifest field 'input_names[{i}]'")
    files = _field(data, "files", dict)
    for name, digest in files.items():
        if name not in allowed_files:
            raise ArtifactError(f"manifest field 'files' lists {name!r}, which is not a file of an "
                                f"fxforge artifact ({', '.join(sorted(allowed_files))})")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise ArtifactError(f"manifest field 'files[{name!r}]' must be a sha256 hex digest")
    tensors = {}
    for name, info in _field(data, "tensors", dict).items():
        check_attr_path(name, what="manifest field 'tensors': tensor name")
        tensors[name] = _tensor_info(name, info)
    for name, info in tensors.items():
        if info.alias_of is not None and (info.alias_of not in tensors or tensors[info.alias_of].alias_of):
            raise ArtifactError(f"manifest field 'tensors[{name!r}].alias_of' must name a saved tensor "
                                f"that is not itself an alias")
    graph_meta = _field(data, "graph_meta", dict, optional=True) or {}
    for key in graph_meta:
        if not key.startswith("fxforge_") or key in (IN_SPEC, OUT_SPEC, INPUT_NAMES):
            raise ArtifactError(f"manifest field 'graph_meta' key {key!r} is not a pass's 'fxforge_*' entry")
    graph_meta = {key: layout_record(key, value) for key, value in graph_meta.items()}
    in_spec, out_spec = (_field(data, name, str, optional=True) for name in ("in_spec", "out_spec"))
    for name, spec in (("in_spec", in_spec), ("out_spec", out_spec)):
        if spec is not None:
            load_treespec(spec, field=name)  # checked now, so a bad spec fails before any work
    return Manifest(**text, in_spec=in_spec, out_spec=out_spec, input_names=input_names,
                    graph_meta=graph_meta, tensors=tensors,
                    report=_field(data, "report", list, optional=True) or [], files=files,
                    onnx_options=_onnx_options(_field(data, "onnx_options", dict, optional=True)),
                    input_shapes=check_input_shapes(data.get("input_shapes")))


def _onnx_options(value: dict[str, Any] | None) -> Any:
    """The manifest's `onnx_options` as an `OnnxOptions`, every field checked by its own validation."""
    if value is None:
        return None
    from fxforge.backends.onnx.options import OnnxOptions
    from fxforge.errors import BackendError

    unknown = set(value) - set(OnnxOptions.names())
    if unknown:
        raise ArtifactError(f"manifest field 'onnx_options' has unknown keys {sorted(unknown)}")
    try:
        return OnnxOptions(**value)
    except BackendError as exc:
        raise ArtifactError(f"manifest field 'onnx_options': {exc}") from None


def layout_record(key: str, value: Any) -> Any:
    """A typed layout record (`fxforge.runtime.layouts`) for its graph_meta key, checked field by
    field; other entries unchanged."""
    record = LAYOUT_RECORDS.get(key)
    if record is None:
        return value
    try:
        return record.from_json(value, where=f"manifest field 'graph_meta[{key!r}]'")
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{exc}. Re-save the artifact with this fxforge version.") from None


def load_treespec(text: str, *, field: str) -> pytree.TreeSpec:
    """Decode a `treespec_dumps` string without importing anything it names."""
    try:
        protocol, schema = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise ArtifactError(f"manifest field '{field}' is not a serialized pytree spec") from None
    if protocol != 1:
        raise ArtifactError(f"manifest field '{field}' uses pytree protocol {protocol!r}; only 1 is read")
    return _spec(schema, field, 0)


def _spec(schema: Any, field: str, depth: int) -> pytree.TreeSpec:
    if depth > MAX_SPEC_DEPTH or not isinstance(schema, dict) or set(schema) != {"type", "context", "children_spec"}:
        raise ArtifactError(f"manifest field '{field}' has a malformed pytree node")
    kind, context, children = schema["type"], schema["context"], schema["children_spec"]
    if not isinstance(children, list):
        raise ArtifactError(f"manifest field '{field}': children_spec must be a list")
    if kind is None:
        if context is not None or children:
            raise ArtifactError(f"manifest field '{field}': a leaf has no context or children")
        return pytree.tree_flatten(0)[1]
    # Only containers this process already registered: looking a name up in the registry runs
    # no code. Contexts are plain JSON (no enum hook); namedtuples are found by registered name.
    typ = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(kind) if isinstance(kind, str) else None
    node_def = pytree.SUPPORTED_SERIALIZED_TYPES.get(typ) if typ is not None else None
    if node_def is None or kind == "collections.defaultdict":
        raise ArtifactError(f"manifest field '{field}': container type {kind!r} cannot be loaded "
                            f"(tuples, lists, dicts and registered types only)")
    if kind == "collections.namedtuple":
        if context not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise ArtifactError(f"manifest field '{field}': namedtuple {context!r} is not registered")
        decoded = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[context]
    elif node_def.from_dumpable_context is None:
        try:
            decoded = json.loads(context) if isinstance(context, str) else None
        except (ValueError, RecursionError):
            decoded = None
        if decoded is None and context != "null" or _has_enum(decoded):
            raise ArtifactError(f"manifest field '{field}': the context of a {kind} is not plain JSON")
    else:
        raise ArtifactError(f"manifest field '{field}': container type {kind!r} needs a custom decoder "
                            f"and cannot be loaded from an artifact")
    if kind in ("builtins.dict", "collections.OrderedDict") and (
            not isinstance(decoded, list) or len(decoded) != len(children)):
        raise ArtifactError(f"manifest field '{field}': a dict's keys must match its children")
    specs = [_spec(c, field, depth + 1) for c in children]
    try:
        return pytree.TreeSpec(typ, decoded, specs)
    except Exception as exc:  # TreeSpec checks its own invariants
        raise ArtifactError(f"manifest field '{field}': invalid {kind} node: {exc}") from None


def _has_enum(value: Any) -> bool:
    if isinstance(value, dict):
        return "__enum__" in value or any(_has_enum(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_enum(v) for v in value)
    return False


def _tensor_info(name: str, info: Any) -> TensorInfo:
    where = f"manifest field 'tensors[{name!r}]'"
    if not isinstance(info, dict) or set(info) != {"parameter", "requires_grad", "alias_of"}:
        raise ArtifactError(f"{where} must be an object with parameter, requires_grad and alias_of")
    if not isinstance(info["parameter"], bool) or not isinstance(info["requires_grad"], bool):
        raise ArtifactError(f"{where}: parameter and requires_grad must be true or false")
    if info["alias_of"] is not None and not isinstance(info["alias_of"], str):
        raise ArtifactError(f"{where}: alias_of must be a tensor name or null")
    return TensorInfo(info["parameter"], info["requires_grad"], info["alias_of"])


def _field(data: dict[str, Any], name: str, kind: type, *, optional: bool = False) -> Any:
    if name not in data:
        if optional:
            return None
        raise ArtifactError(f"manifest field '{name}' is missing")
    value = data[name]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ArtifactError(f"manifest field '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    if kind is dict and not all(isinstance(k, str) for k in value):
        raise ArtifactError(f"manifest field '{name}' must have string keys")
    return value
