"""Model + example inputs -> the fxforge IR: a flat, unlifted `torch.fx.GraphModule`.

This is the first step of every flow. torch.export (non-strict) captures the model; the result
is unlifted so parameters and buffers are `get_attr` nodes named exactly as in the user's
`model.named_parameters()` (`model.layers.0.self_attn.q_proj.weight`), and the graph takes the
model's inputs as a flat list of tensors and returns a flat tuple. The pytree specs that map
the user's (args, kwargs) and outputs to and from that flat form live in `gm.meta`, so every
copy of the graph carries them.

Keyword inputs that hold no tensor (`use_cache=False`, `return_dict=False`, `scale=None`) are
constants, not inputs: they are bound into the traced call and recorded in
`gm.meta[CONSTANT_KWARGS]`, so the graph takes only tensors (an ONNX file gets no `use_cache`
input) and a call that passes a different value is refused instead of silently ignored.

Each call_function node keeps its source module path in `node.meta["module_path"]` (from
torch.export's `nn_module_stack`), so passes and users can target layers by name.
"""
from __future__ import annotations

import copy
import inspect
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from fxforge.errors import InputError, TraceError
from fxforge.ir.graph import adopt_meta

IN_SPEC = "fxforge_in_spec"
OUT_SPEC = "fxforge_out_spec"
INPUT_NAMES = "fxforge_input_names"
CONSTANT_KWARGS = "fxforge_constant_kwargs"  # name -> value of keyword inputs baked into the graph
# What a keyword constant may be: JSON values, so artifacts save them and nothing is pickled.
_CONSTANT_TYPES = (type(None), bool, int, float, str)
# Not "fxforge_"-prefixed: process-local addresses, never saved with an artifact.
BORROWED = "borrowed_storages"


@dataclass(frozen=True)
class TracedInputs:
    """The example inputs in the flat form the IR graph takes."""

    flat: tuple[torch.Tensor, ...]
    spec: pytree.TreeSpec


class _ConstantsAdapter(nn.Module):
    """Calls the model with the keyword constants bound (`use_cache=False`, `scale=None`).

    The wrapped model sits under the attribute `m`, which `trace` strips from every name
    afterwards. forward() advertises an explicit signature (the example inputs' positions and
    the tensor keyword names) because torch.export cannot match dynamic shapes to a
    `*args, **kwargs` signature.
    """

    def __init__(self, model: nn.Module, constants: dict[str, Any]):
        super().__init__()
        self.m = model
        self._extra = dict(constants)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.m(*args, **kwargs, **self._extra)


class _TransformersAdapter(_ConstantsAdapter):
    """Calls a transformers model with `use_cache=False, return_dict=False` (unless given).

    That makes its outputs plain tensors/tuples (never ModelOutput) and keeps KV caches out of
    the graph. A single output is returned bare rather than as a 1-tuple.
    """

    def __init__(self, model: nn.Module, constants: dict[str, Any]):
        params = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        defaults = {k: False for k in ("use_cache", "return_dict") if k in params or takes_any}
        super().__init__(model, {**defaults, **constants})  # the caller's own constants win

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.m(*args, **kwargs, **self._extra)
        if hasattr(out, "to_tuple"):  # a ModelOutput despite return_dict=False
            out = out.to_tuple()
        if isinstance(out, tuple) and len(out) == 1:
            return out[0]
        return out


def _adapter_for(model: nn.Module, num_args: int, kwarg_names: list[str],
                 constants: dict[str, Any] | None = None) -> _ConstantsAdapter:
    """An adapter (transformers' or the constants-only one) whose forward() names exactly these inputs."""
    base = _TransformersAdapter if is_transformers_model(model) else _ConstantsAdapter

    def forward(self: _ConstantsAdapter, *args: Any, **kwargs: Any) -> Any:
        return base.forward(self, *args, **kwargs)

    P = inspect.Parameter
    # Name positional inputs as the model does (input_ids, ...): they become graph input names.
    model_params = [p.name for p in inspect.signature(model.forward).parameters.values()
                    if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    names = [model_params[i] if i < len(model_params) else f"arg{i}" for i in range(num_args)]
    forward.__signature__ = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)]
        + [P(name, P.POSITIONAL_OR_KEYWORD) for name in names]
        + [P(k, P.KEYWORD_ONLY) for k in kwarg_names]
    )
    cls = type(base.__name__.lstrip("_"), (base,), {"forward": forward})
    return cls(model, dict(constants or {}))


def split_constant_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor kwargs, constant kwargs): a keyword input holding no tensor is a constant.

    Raises TraceError for a non-tensor value that is not None/bool/int/float/str (a list of
    ints, an object): such a value cannot be saved with an artifact or compared at call time.
    """
    tensors, constants = {}, {}
    for name, value in kwargs.items():
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)):
            tensors[name] = value
        elif isinstance(value, _CONSTANT_TYPES):
            constants[name] = value
        else:
            raise TraceError(
                f"keyword input {name!r} is a {type(value).__name__} holding no tensor; keyword inputs are "
                f"tensors (graph inputs) or None/bool/int/float/str constants baked into the graph. Bind it "
                f"in a wrapper module (forward calls the model with {name}=...) or pass a tensor")
    return tensors, constants


def drop_constant_kwargs(constants: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without the `constants` baked into a graph at trace time (`gm.meta[CONSTANT_KWARGS]`).

    A constant may be passed again or left out; passing a *different* value raises InputError,
    since the graph was traced with the original one (a silently ignored `use_cache=True` or
    `flag=True` would return the wrong thing).
    """
    if not constants:
        return kwargs
    for name, baked in constants.items():
        if name in kwargs and not _same_constant(kwargs[name], baked):
            raise InputError(
                f"keyword input {name!r} was compiled as the constant {baked!r} and is part of the graph; "
                f"got {kwargs[name]!r}. Leave it out (or pass {baked!r}), or compile again with "
                f"{name}={kwargs[name]!r}")
    return {k: v for k, v in kwargs.items() if k not in constants}


def _same_constant(value: Any, baked: Any) -> bool:
    # type too: True == 1 and 1 == 1.0, but each traces differently
    return type(value) is type(baked) and value == baked


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a dependency, but tracing plain models needs no HF
        return False
    return isinstance(model, PreTrainedModel)


def auto_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Every dimension of every tensor input marked `Dim.AUTO`: dynamic where the model allows.

    Dimensions the model pins (a CNN's channels, an MLP's features) silently become static,
    so this default costs nothing and gives dynamic batch and sequence axes to models that
    support them.
    """

    def mark(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())} if x.dim() else None
        return None

    # torch.export matches dynamic_shapes to forward()'s bound parameters, in order (a tuple
    # works for *args/**kwargs signatures too, where a dict keyed by name does not).
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:  # before torch.export sees them: say so in forward()'s own terms
        model = module.m if isinstance(module, _ConstantsAdapter) else module
        raise TraceError(
            f"the example inputs do not match {type(model).__name__}.forward"
            f"{inspect.signature(model.forward)}: {exc}. Pass args/kwargs exactly as you call the model"
        ) from exc
    return tuple(pytree.tree_map(mark, value, is_leaf=lambda x: x is None)
                 for value in bound.arguments.values())


def trace(
    model: nn.Module,
    args: tuple | Any = (),
    kwargs: dict | None = None,
    dynamic_shapes: Any = "auto",
) -> GraphModule:
    """Capture `model` on example inputs as an fxforge IR graph.

    Args:
        model: any nn.Module; transformers models are called with use_cache=False and
            return_dict=False. The model is not modified (it is put in eval mode on a copy
            only if it was in training mode).
        args, kwargs: example inputs, as you would call the model.
        dynamic_shapes: "auto" (every dimension dynamic where the model allows), None (all
            static), or torch.export's dynamic_shapes for (args, kwargs).

    Returns:
        A GraphModule taking the flat tensor inputs and returning a flat tuple.

    Example:
        >>> gm = trace(model, (input_ids,), {"attention_mask": mask})
        >>> gm(input_ids, mask)  # flat positional inputs
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    args = args if isinstance(args, tuple) else (args,)
    kwargs, constants = split_constant_kwargs(dict(kwargs or {}))
    if model.training:
        # Eval-mode semantics (dropout off, batch-norm running stats) without touching the
        # user's model, and without copying its weights: a module tree in eval mode over them.
        model = _eval_view(model)

    root: nn.Module = model
    prefix = ""
    if is_transformers_model(model) or constants:
        root, prefix = _adapter_for(model, len(args), list(kwargs), constants), "m."

    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        dynamic_shapes = auto_dynamic_shapes(root, args, kwargs)

    program = _export(root, args, kwargs, dynamic_shapes)
    gm = _unlift(program, prefix)
    adopt_meta(gm)  # torch.export's shapes are refresh_meta's: the first refresh redoes only rewrites
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    gm.meta[IN_SPEC] = in_spec
    gm.meta[OUT_SPEC] = program.call_spec.out_spec
    gm.meta[INPUT_NAMES] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if constants:
        gm.meta[CONSTANT_KWARGS] = constants
    from fxforge.calibration.streaming import mark_streamed

    mark_streamed(gm)  # weights mapped from files (hf.from_pretrained(lazy=True)): passes stream them
    user_storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    gm.meta[BORROWED] = frozenset(t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())
                                  if t.untyped_storage().data_ptr() in user_storages)
    return gm


def flatten_inputs(gm: GraphModule, args: tuple, kwargs: dict | None = None) -> list[Any]:
    """The user's (args, kwargs) in the flat order the graph takes them (baked constants dropped)."""
    kwargs = drop_constant_kwargs(gm.meta.get(CONSTANT_KWARGS) or {}, dict(kwargs or {}))
    flat, spec = pytree.tree_flatten((tuple(args), kwargs))
    expected = gm.meta.get(IN_SPEC)
    if expected is not None and spec != expected:
        raise TypeError(
            "inputs are structured differently from the example inputs the model was "
            f"compiled with.\n  expected: {expected}\n  got:      {spec}"
        )
    return flat


def unflatten_outputs(gm: GraphModule, flat_out: Any) -> Any:
    """The graph's flat output tuple in the structure the original model returned."""
    spec = gm.meta.get(OUT_SPEC)
    if spec is None:
        return flat_out
    leaves = list(flat_out) if isinstance(flat_out, (tuple, list)) else [flat_out]
    if spec.num_leaves != len(leaves):  # a pass added outputs (e.g. Medusa heads): keep flat
        return tuple(leaves)
    return pytree.tree_unflatten(leaves, spec)


# --------------------------------------------------------------------------- internals


def _export(root: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(root, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; translate them all
        raise TraceError(_explain_export_failure(root, exc)) from exc


_EXPORT_HINTS: list[tuple[str, str]] = [
    # (pattern in the torch.export message, what the user can do about it)
    (r"data.dependent|Could not guard on data-dependent|GuardOnDataDependentSymNode",
     "the model branches on the *value* of a tensor (e.g. `if x.sum() > 0`). Rewrite the "
     "branch with torch.where/torch.cond, or wrap the model so the branch is decided outside."),
    (r"Constraints violated|specialized|not dynamic|marked as dynamic",
     "a dimension you marked dynamic is fixed by the model. Pass dynamic_shapes=None (all "
     "static) or mark only the batch/sequence dimensions dynamic."),
    (r"Unsupported|not supported|NotImplementedError",
     "the model uses a construct torch.export cannot capture. Wrap the model in an "
     "nn.Module whose forward calls only the traceable part, or replace the construct."),
    (r"got an unexpected keyword argument|missing \d+ required positional argument|takes \d+ positional",
     "the example inputs do not match the model's forward() signature."),
]


def _explain_export_failure(root: nn.Module, exc: Exception) -> str:
    model = root.m if isinstance(root, _ConstantsAdapter) else root
    text = f"{type(exc).__name__}: {exc}"
    first_line = text.strip().splitlines()[0][:400]
    hint = next((h for pat, h in _EXPORT_HINTS if re.search(pat, text)), None)
    hint = hint or ("if the failure is about a dimension, try dynamic_shapes=None; otherwise "
                    "wrap the model so forward() takes only tensors and returns tensors.")
    return (
        f"torch.export (strict=False) could not trace {type(model).__name__}: {first_line}\n"
        f"  fix: {hint}"
    )


def _unlift(program: torch.export.ExportedProgram, prefix: str) -> GraphModule:
    """ExportedProgram -> GraphModule with get_attr parameters, flat I/O, clean names."""
    unlifted = program.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    _inline_wrapper_ops(unlifted)
    # Flat positional inputs and a flat output tuple: the pytree specs live in gm.meta.
    graph._codegen = torch.fx.graph.CodeGen()
    _make_output_flat_tuple(graph)

    root = nn.Module()
    buffers = {name for name, _ in unlifted.named_buffers()}
    for node in graph.nodes:
        if node.op == "get_attr":
            value = _fetch(unlifted, node.target)
            new_name = _strip(node.target, prefix)
            _install(root, new_name, value, as_buffer=node.target in buffers or not isinstance(value, nn.Parameter))
            node.target = new_name
        elif node.op == "call_function":
            node.meta["module_path"] = _module_path(node, prefix)
    gm = GraphModule(root, graph, class_name="FxforgeGraph")
    gm.graph.lint()
    return gm


# Higher-order ops that only set a mode around their body (no-grad for rotary embeddings,
# autocast off). fxforge graphs run in inference semantics, so their bodies are inlined:
# passes then see one flat graph.
_WRAPPER_OPS = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}


def _inline_wrapper_ops(gm: GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _WRAPPER_OPS:
            continue
        body_arg = next(a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        body = _fetch(gm, body_arg.target)
        operands = node.args[node.args.index(body_arg) + 1:]
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        value_map = dict(zip(placeholders, operands))
        with graph.inserting_before(node):
            outputs = graph.graph_copy(body.graph, value_map)
        for copied in value_map.values():
            if isinstance(copied, torch.fx.Node) and "nn_module_stack" not in copied.meta:
                copied.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            assert user.target is operator.getitem, f"unexpected user {user} of {node}"
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not body_arg.users:
            graph.erase_node(body_arg)
    gm.delete_all_unused_submodules()


def _make_output_flat_tuple(graph: torch.fx.Graph) -> None:
    output = graph.output_node()
    flat, _ = pytree.tree_flatten(output.args[0])
    output.args = (tuple(flat),)


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _install(root: nn.Module, name: str, value: Any, as_buffer: bool) -> None:
    *path, leaf = name.split(".")
    mod = root
    for atom in path:
        if not hasattr(mod, atom):
            mod.add_module(atom, nn.Module())
        mod = getattr(mod, atom)
    if hasattr(mod, leaf):  # the same tensor referenced by two get_attr nodes
        return
    if isinstance(value, nn.Module):  # a higher-order op's body
        mod.add_module(leaf, value)
        return
    # Shared, not copied: the graph's tensors are read-only views of the user's (new tensor
    # objects over the same storage, so flags such as requires_grad stay the user's own). No
    # pass writes a tensor in place (the pipeline checks version counters, see
    # passes/cow.py), so the user's model is never mutated and costs no second copy.
    if as_buffer:
        mod.register_buffer(leaf, value.detach() if isinstance(value, torch.Tensor) else value)
    else:
        mod.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=value.requires_grad))


def _eval_view(model: nn.Module) -> nn.Module:
    """`model` in eval mode without touching it: each module shallow-copied with its own
    `training` flag and child/parameter/buffer tables, the tensors themselves shared."""
    copies: dict[int, nn.Module] = {}

    def view(module: nn.Module) -> nn.Module:
        if id(module) in copies:  # a submodule used twice stays one module
            return copies[id(module)]
        clone = copy.copy(module)
        copies[id(module)] = clone
        clone._parameters = dict(module._parameters)
        clone._buffers = dict(module._buffers)
        clone._modules = {name: None if child is None else view(child) for name, child in module._modules.items()}
        clone.training = False
        return clone

    return view(model)


def borrowed_storages(gm: GraphModule) -> set[int]:
    """Storage addresses of the tensors `gm` shares with the model it was traced from."""
    return set(gm.meta.get(BORROWED, ()))


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _module_path(node: torch.fx.Node, prefix: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _type = list(stack.values())[-1]
    path = _strip(path, prefix)
    # torch.export writes indexed submodules as `layers.0` or `layers[0]` / L['self']... forms
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return "" if path in ("m", "") else path
