"""What a serialized graph may name: call targets, node names, attribute paths.

Loading an artifact turns strings from a file into a `torch.fx.Graph`, and FX turns that graph
into Python source (`GraphModule.recompile`) that is then executed. So every string that can
reach that source must be checked *before* the graph is built:

* call targets resolve only to ops in the `aten`, `prims` and `fxforge` namespaces (looked up in
  `torch.ops`, never imported or evaluated), minus the few aten ops that touch files or print,
  and to a short table of pure Python functions the graph format needs (`operator.getitem` for
  multi-output ops, symbolic-shape arithmetic);
* node and placeholder names are plain identifiers that are not keywords, builtins, dunders or
  names FX's generated code already uses;
* attribute paths (get_attr targets, tensor names, keyword-argument names) are dot-separated
  atoms of letters, digits and underscores, none of them a dunder or an attribute every
  `nn.Module` already has.

Every refusal is an `ArtifactError` naming the offending string and why it is refused.
"""
from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from typing import Any, Callable

import torch
from torch import nn

from fxforge.errors import ArtifactError

OP_NAMESPACES = ("aten", "prims", "fxforge")

# aten ops that reach outside the tensor world: aten::save / aten::from_file read and write
# files named by a string argument; _print and warn write to the console. No model needs them.
DENIED_OPS = frozenset({"save", "from_file", "_print", "warn"})

# Pure functions FX graphs from torch.export call besides ops: getitem picks one output of a
# multi-output op; the rest is the arithmetic of symbolic shapes (SymInt math under dynamic
# shapes). Each is looked up here by name; nothing else is resolvable.
PYTHON_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_")},
    **{f"math.{name}": getattr(math, name) for name in ("ceil", "floor", "trunc", "sqrt")},
    **{f"torch.{name}": getattr(torch, name) for name in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "_sym_sqrt")
       if hasattr(torch, name)},
}
_NAME_OF_FUNCTION = {id(fn): name for name, fn in PYTHON_FUNCTIONS.items()}

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ATOM = re.compile(r"[A-Za-z0-9_]+")  # one step of a dotted path: "layers.0.weight" has three
_OP_NAME = re.compile(r"torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")

# Names FX's generated code itself refers to (its globals, `self`, the builtins it calls): a
# node or input called `torch` or `self` would shadow them and change what the code does. Node
# names also avoid every keyword and builtin, as FX's own namer does.
CODEGEN_NAMES = frozenset({"self", "torch", "operator", "math", "inf", "nan", "NoneType", "device",
                           "fx_pytree", "pytree", "getattr", "slice", "tuple", "list", "dict"})
RESERVED_NAMES = frozenset(set(keyword.kwlist) | set(dir(builtins)) | CODEGEN_NAMES)

# Every attribute a module already has (forward, training, ...; at the top, the GraphModule's
# graph, code, meta too): a tensor or submodule under such a name would replace the module's
# own machinery.
_MODULE_ATTRIBUTES = frozenset(dir(nn.Module()))
_GRAPH_MODULE_ATTRIBUTES = frozenset(dir(torch.fx.GraphModule(nn.Module(), torch.fx.Graph())))


def target_name(target: Any) -> str:
    """The serialized name of a call target, or ArtifactError if an artifact cannot hold it."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
        resolve_target(name, what="call target")  # refuses at save what load would refuse
        return name
    name = _NAME_OF_FUNCTION.get(id(target))
    if name is not None:
        return name
    raise ArtifactError(
        f"cannot save call target {getattr(target, '__qualname__', target)!r}: artifacts hold only "
        f"aten/prims/fxforge ops and {', '.join(sorted(PYTHON_FUNCTIONS))}. Express the computation "
        f"as an fxforge op (fxforge/ir/ops/) so it can be saved and loaded safely.")


def resolve_target(name: Any, *, what: str) -> Callable[..., Any]:
    """The callable a serialized target names; ArtifactError unless it is allowlisted.

    Ops are found by attribute lookup in `torch.ops.<namespace>` (a registry lookup that runs no
    code from the artifact) and must come back as an `OpOverload`: a name such as
    `torch.ops.aten.__class__.x` resolves to something else and is refused.
    """
    if not isinstance(name, str):
        raise ArtifactError(f"{what} must be a string, got {type(name).__name__}")
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    match = _OP_NAME.fullmatch(name)
    if match is None:
        raise ArtifactError(
            f"{what} {name!r} is not allowed: targets must be torch.ops.<aten|prims|fxforge>.<op>."
            f"<overload> or one of {', '.join(sorted(PYTHON_FUNCTIONS))}")
    namespace, op, overload = match.groups()
    if namespace not in OP_NAMESPACES:
        raise ArtifactError(f"{what} {name!r} is not allowed: only ops in the "
                            f"{', '.join(OP_NAMESPACES)} namespaces can be loaded")
    if namespace == "aten" and op in DENIED_OPS:
        raise ArtifactError(f"{what} {name!r} is not allowed: aten::{op} reads or writes outside "
                            f"the model (files, console)")
    if namespace == "fxforge":
        import fxforge.ir.ops  # noqa: F401  (registers every fxforge:: op before the lookup)
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        packet = None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        raise ArtifactError(f"{what} {name!r} names no op: {namespace}::{op} does not exist in this "
                            f"torch (or fxforge) version")
    if overload not in packet.overloads():
        raise ArtifactError(f"{what} {name!r} names no op: {namespace}::{op} has no overload "
                            f"{overload!r} (it has {', '.join(packet.overloads())})")
    resolved = getattr(packet, overload)
    if not isinstance(resolved, torch._ops.OpOverload):  # pragma: no cover - defensive
        raise ArtifactError(f"{what} {name!r} does not resolve to an op")
    return resolved


def check_node_name(name: Any, *, what: str, allow_builtins: bool = False) -> str:
    """`name` if it can be a variable of FX's generated code; ArtifactError otherwise.

    `allow_builtins`: for placeholder targets, which become parameters of forward() (FX names
    nn.Sequential's input `input`); the names the generated code relies on stay refused."""
    if not isinstance(name, str):
        raise ArtifactError(f"{what} must be a string, got {type(name).__name__}")
    if not IDENTIFIER.fullmatch(name) or len(name) > 256:
        raise ArtifactError(f"{what} {_short(name)} is not a plain identifier (letters, digits, "
                            f"underscores, not starting with a digit)")
    reserved = CODEGEN_NAMES | set(keyword.kwlist) if allow_builtins else RESERVED_NAMES
    if name in reserved or name.startswith("__"):
        raise ArtifactError(f"{what} {name!r} is reserved (a keyword, builtin, dunder or a name the "
                            f"generated code uses)")
    return name


def check_dotted_name(path: Any, *, what: str) -> str:
    """`path` if it is dot-separated atoms of letters, digits and underscores, none a dunder."""
    if not isinstance(path, str):
        raise ArtifactError(f"{what} must be a string, got {type(path).__name__}")
    if len(path) > 1024:
        raise ArtifactError(f"{what} {_short(path)} is too long")
    for atom in path.split("."):
        if not ATOM.fullmatch(atom):
            raise ArtifactError(f"{what} {_short(path)} is not a dotted path of letters, digits "
                                f"and underscores")
        if atom.startswith("__"):
            raise ArtifactError(f"{what} {path!r} uses the reserved name {atom!r} (a dunder)")
    return path


def check_attr_path(path: Any, *, what: str) -> str:
    """`path` if it is a safe attribute path of the graph module ("layers.0.weight"):
    a dotted name none of whose atoms is a keyword or an attribute every module already has."""
    check_dotted_name(path, what=what)
    for depth, atom in enumerate(path.split(".")):
        taken = _GRAPH_MODULE_ATTRIBUTES if depth == 0 else _MODULE_ATTRIBUTES
        if atom in taken or keyword.iskeyword(atom):
            raise ArtifactError(f"{what} {path!r} uses the reserved name {atom!r} (a keyword or an "
                                f"attribute every module already has)")
    return path


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
