"""Ship adapters on their own: `save_adapters` / `load_adapters` (safetensors + metadata).

    save_adapters(compiled, "adapter.safetensors")     # only adapter tensors, a few MB at most
    load_adapters(other_compiled, "adapter.safetensors")

The file holds each adapted layer's tensors under "<module path>.<role>" and, in the
safetensors metadata, the method, rank, alpha, scale and shapes of every layer. Loading checks
all of it against the graph first (same layers adapted, same method and rank; every tensor
present, none unknown, same shape, same dtype, finite) and changes nothing when anything
disagrees. Saving writes a temporary sibling and renames it into place. Residual methods (PiSSA, OLoRA, LoRA-GA, SORSA, LoLDU)
also store their residual base weight, without which their adapters mean something else.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxforge.errors import FxforgeError
from fxforge.finite_checks import nonfinite_problem
from fxforge.ir.graph import get_attr, set_attr
from fxforge.passes.adapters.common import adapter_records, freeze_all_but_adapters, get_method

FORMAT = "fxforge-adapters/1"
BASE_WEIGHT_ROLE = "base_weight"


class AdapterLoadError(FxforgeError, ValueError):
    """An adapter file does not fit the graph it is loaded into (nothing was changed)."""


def graph_module_of(compiled: Any) -> torch.fx.GraphModule:
    """The GraphModule of a CompiledModel (or the GraphModule itself)."""
    return getattr(compiled, "graph_module", compiled)


_graph_module = graph_module_of
FORMATS = ("fxforge", "peft")


def save_adapters(compiled: Any, path: str | Path, format: str = "fxforge", *, base_model: Any = None) -> Path:
    """Write the adapter tensors of `compiled` (a CompiledModel or GraphModule) to `path`.

    format: "fxforge" (default): one safetensors file at `path`, any adapter method;
        "peft": `path` is a directory with adapter_config.json + adapter_model.safetensors that
        Hugging Face PEFT loads (`PeftModel.from_pretrained(hf_model, path)`): LoRA, rsLoRA, EVA,
        DoRA and Bone/MiSS; PiSSA, OLoRA and LoRA-GA with `base_model=` (the model you compiled),
        as LoRA of rank 2r relative to its weights. fxforge.adapters_peft says why the others
        have no PEFT form.

    All or nothing: every tensor is checked first (a NaN/inf adapter is refused, since loading
    it would be refused too), then the file is written to a temporary sibling and renamed into
    place, so a crash or error mid-write leaves any previous file at `path` as it was.
    """
    if format not in FORMATS:
        raise ValueError(f"save_adapters: format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if format == "peft":
        from fxforge.adapters_peft import save_peft

        return save_peft(compiled, path, base_model)
    if base_model is not None:
        raise ValueError("save_adapters: base_model= is for format='peft' only (fxforge's format stores the "
                         "residual base weights itself)")
    gm = _graph_module(compiled)
    records = adapter_records(gm)
    if not records:
        raise FxforgeError("save_adapters: the model has no adapters; compile it with passes='add_adapters(...)' "
                           "(adapters that were merged are part of the base weights now)")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for module_path, record in sorted(records.items()):
        roles = _roles(record, with_base=get_method(record["method"]).changes_base_weight)
        for role, name in roles.items():
            tensors[f"{module_path}.{role}"] = get_attr(gm, name).detach().contiguous().cpu()
        layers[module_path] = {
            "method": record["method"], "rank": record["rank"], "alpha": record["alpha"],
            "scale": record["scale"], "options": record["options"],
            "shapes": {role: list(get_attr(gm, name).shape) for role, name in roles.items()},
        }
    bad = [f"{key} {problem}" for key, t in tensors.items() if (problem := nonfinite_problem(t))]
    if bad:
        raise FxforgeError("save_adapters: refusing to write non-finite adapter tensors (nothing was written):\n  - "
                           + "\n  - ".join(bad) + "\nThe adapters diverged in training; fix them before saving.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = sorted({layer["method"] for layer in layers.values()})
    metadata = {"format": FORMAT, "methods": ",".join(methods), "layers": json.dumps(layers)}
    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling of `path`, then rename it over `path` (atomic on POSIX
    and Windows); the sibling is removed if anything fails, so `path` is either old or new."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_adapters(compiled: Any, path: str | Path) -> list[str]:
    """Load adapter tensors saved by `save_adapters` into `compiled`; return the layers loaded.

    `path` is an fxforge adapter file, or a PEFT adapter directory (it has adapter_config.json;
    written by PEFT's save_pretrained or by save_adapters(format="peft")); naming the
    directory's adapter_model.safetensors loads the directory too. See fxforge.adapters_peft.

    All or nothing: the whole file is read and checked before the first parameter changes, and
    AdapterLoadError lists every problem: layers, methods, ranks or roles that differ from the
    graph's adapters, tensors missing from or unknown to the file, shapes, dtypes and NaN/inf.

    Dtype rule: each tensor must have exactly the dtype of the parameter it replaces. No cast
    is applied, not even a widening one: a float16 or int8 file loaded into a float32 model
    is a different model from the one the adapters were trained against (or not an adapter at
    all), so it is refused with the dtypes named; cast the file or compile in its dtype.
    """
    from fxforge.adapters_peft import WEIGHTS_FILE, is_peft_dir, load_peft

    path = Path(path)
    if path.is_dir() or (path.name == WEIGHTS_FILE and is_peft_dir(path.parent)):
        directory = path if path.is_dir() else path.parent
        if not is_peft_dir(directory):
            raise AdapterLoadError(f"load_adapters: {directory} has no adapter_config.json, so it is no PEFT adapter "
                                   f"directory (those hold adapter_config.json and adapter_model.safetensors); "
                                   f"name a PEFT adapter directory or an fxforge adapter file")
        return load_peft(compiled, directory)
    gm = _graph_module(compiled)
    layers, tensors = _read(path)
    records = adapter_records(gm)
    _check(records, layers, gm, path)
    targets = _check_tensors(records, layers, tensors, gm, path)
    assign_adapter_tensors(gm, targets)
    return sorted(layers)


def assign_adapter_tensors(gm: torch.fx.GraphModule, targets: dict[str, torch.Tensor]) -> None:
    """Put checked tensors in place of the graph attributes they name (all, or none on failure),
    keeping each parameter's requires_grad; then exactly the adapters train."""
    old = {name: get_attr(gm, name) for name in targets}
    try:
        for name, value in targets.items():
            set_attr(gm, name, value, trainable=old[name].requires_grad)
    except BaseException:  # set_attr does not fail on a checked name; if it ever does, undo
        for name, value in old.items():
            set_attr(gm, name, value, trainable=value.requires_grad)
        raise
    freeze_all_but_adapters(gm)
    if hasattr(gm, "recompile"):
        gm.recompile()


def _roles(record: dict[str, Any], with_base: bool) -> dict[str, str]:
    """role -> graph attribute name of one adapted layer (its base weight too, when asked)."""
    roles = dict(record["tensors"])
    if with_base:
        roles[BASE_WEIGHT_ROLE] = record["weight"]
    return roles


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(layers metadata, every tensor) of an adapter file, or AdapterLoadError saying why not."""
    if not path.is_file():
        raise AdapterLoadError(f"load_adapters: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise AdapterLoadError(
                    f"load_adapters: {path} is not an fxforge adapter file (format {metadata.get('format')!r}, "
                    f"expected {FORMAT!r}); save it with save_adapters()")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except AdapterLoadError:
        raise
    except Exception as exc:  # safetensors raises its own error types (and OSError) for bad bytes
        raise AdapterLoadError(f"load_adapters: {path} is not a readable safetensors file "
                               f"({type(exc).__name__}: {exc}); save adapters with save_adapters()") from None
    try:
        layers = json.loads(metadata["layers"])
        if not isinstance(layers, dict) or not all(isinstance(v, dict) and isinstance(v.get("shapes"), dict)
                                                   for v in layers.values()):
            raise ValueError("expected {module path: {method, rank, shapes, ...}}")
    except (KeyError, ValueError) as exc:
        raise AdapterLoadError(f"load_adapters: {path} has malformed 'layers' metadata ({exc}); "
                               f"save it again with save_adapters()") from None
    return layers, tensors


def _check_tensors(records: dict[str, Any], layers: dict[str, Any], tensors: dict[str, torch.Tensor],
                   gm: torch.fx.GraphModule, path: Path) -> dict[str, torch.Tensor]:
    """{graph attribute: tensor to load}, once every tensor has the right name, shape, dtype and
    finite values; otherwise one AdapterLoadError listing all that is wrong."""
    targets: dict[str, torch.Tensor] = {}
    problems = []
    expected: set[str] = set()
    for module_path in layers:
        record = records[module_path]
        # the graph decides which tensors a layer needs: a residual method's file must carry its base weight
        with_base = get_method(record["method"]).changes_base_weight
        for role, name in _roles(record, with_base).items():
            key = f"{module_path}.{role}"
            expected.add(key)
            if key not in tensors:
                problems.append(f"{key}: missing from the file")
                continue
            have, given = get_attr(gm, name), tensors[key]
            problem = tensor_problem(key, given, have, "the file",
                                     f"save the adapters from a model of dtype {have.dtype}")
            if problem:
                problems.append(problem)
            else:
                targets[name] = given
    unknown = sorted(set(tensors) - expected)
    if unknown:
        problems.append(f"tensors in the file that no adapter of the graph takes: {', '.join(unknown)}")
    if problems:
        raise AdapterLoadError(f"load_adapters: {path} cannot be loaded (nothing was changed):\n  - "
                               + "\n  - ".join(problems))
    return targets


def tensor_problem(key: str, given: torch.Tensor, have: torch.Tensor, source: str, dtype_fix: str) -> str | None:
    """Why the tensor `given` (read from `source`) cannot replace the graph's `have`, or None.
    Shapes and dtypes must match exactly (no cast is applied) and values must be finite."""
    if tuple(given.shape) != tuple(have.shape):
        return f"{key}: shape {tuple(given.shape)} in {source} but {tuple(have.shape)} in the graph"
    if given.dtype != have.dtype:
        return (f"{key}: dtype {given.dtype} in {source} but {have.dtype} in the graph (no cast is "
                f"applied: {dtype_fix})")
    problem = nonfinite_problem(given)
    return f"{key}: {problem}" if problem else None


def layer_set_problems(records: Any, layers: Any, source: str) -> list[str]:
    """Layers `source` (a file, a directory) adapts that the graph does not, and the reverse."""
    problems = []
    missing = sorted(set(layers) - set(records))
    extra = sorted(set(records) - set(layers))
    if missing:
        problems.append(f"layers in {source} without an adapter in the graph: {', '.join(missing)}")
    if extra:
        problems.append(f"adapted layers of the graph missing from {source}: {', '.join(extra)}")
    return problems


def _check(records: dict[str, Any], layers: dict[str, Any], gm: torch.fx.GraphModule, path: Path) -> None:
    """Every mismatch between file and graph, in one error."""
    problems = layer_set_problems(records, layers, "the file")
    for module_path in sorted(set(layers) & set(records)):
        layer, record = layers[module_path], records[module_path]
        for key in ("method", "rank"):
            if layer.get(key) != record[key]:
                problems.append(f"{module_path}: {key} is {layer.get(key)!r} in the file but {record[key]!r} in the graph")
        names = _roles(record, with_base=BASE_WEIGHT_ROLE in layer["shapes"])
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
