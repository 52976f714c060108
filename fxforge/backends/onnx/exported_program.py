"""An fxforge graph as a `torch.export.ExportedProgram`, without tracing it again.

`torch.onnx.export(gm, ...)` first captures `gm` with `torch.export.export` (a full fake-tensor
re-trace of a graph we already have, shapes and all), then retraces that program once more with
its decomposition table (`run_decompositions`). The first trace rebuilds what the graph already
holds: its nodes carry fake values (`meta["val"]`, symbolic dims included) from fxforge's own
trace and the pipeline's metadata refresh. `as_exported_program` builds the program directly —
parameters and buffers lifted to placeholders named as torch.export names them, the graph's
symbolic dims as range constraints — so the exporter starts at its decomposition step.

That step (`run_decompositions`) is a second full re-trace, and on an fxforge graph it only lowers
the few composite ops the tracer kept (`.to(dtype)`, `.contiguous()`, `.reshape()`).
`lower_composites` lowers those here the way the re-trace does, and the program returned
(`DecomposedProgram`) skips the re-trace when no op is left that it would change: no trace at
all, where the exporter alone traces twice. The ONNX written is the same
(tests/backends/onnx/test_export_fast_paths.py).

Falls back (returns None) where the graph is not in the form this handles: an input without a
fake value, a `get_attr` of something that is not a parameter or buffer, outputs that are not
all nodes. The caller then
hands the GraphModule to the exporter, which traces it as before.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                          TensorArgument)
from torch.fx import GraphModule

logger = logging.getLogger(__name__)


def as_exported_program(gm: GraphModule, example_inputs: Sequence[Any]) -> ExportedProgram | None:
    """`gm` (flat tensor inputs, flat output tuple, weights as get_attr) as an ExportedProgram over
    the same tensors, or None where its metadata does not allow it (see the module docstring)."""
    from torch._guards import detect_fake_mode

    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node.meta copied shallowly: the fake values are shared
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(example_inputs) or len(placeholders) != len(tensors):
        return None
    if any(not isinstance(n.meta.get("val"), torch.Tensor) for n in placeholders):
        return None
    fake_mode = detect_fake_mode([n.meta["val"] for n in placeholders])
    if fake_mode is None:
        return None

    parameters = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    state = {**parameters, **buffers}
    lifted: dict[str, torch.fx.Node] = {}
    input_specs: list[InputSpec] = []
    first = placeholders[0] if placeholders else None
    # torch.export's order: parameters, then buffers (each in the module's order), then user inputs
    wanted = [(name, InputKind.PARAMETER) for name in parameters] + [(name, InputKind.BUFFER) for name in buffers]
    uses: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            if node.target not in parameters and node.target not in buffers:
                return None  # a submodule or constant attribute: leave it to the exporter's own trace
            uses.setdefault(node.target, []).append(node)
    for name, kind in wanted:
        nodes = uses.get(name)
        if not nodes or name in lifted:
            continue
        prefix = "p_" if kind is InputKind.PARAMETER else "b_"
        with graph.inserting_before(first):
            placeholder = graph.placeholder(prefix + name.replace(".", "_").lower())
        placeholder.meta.update(nodes[0].meta)
        val, tensor = placeholder.meta.get("val"), state[name]
        if not isinstance(val, torch.Tensor) or val.dtype != tensor.dtype or tuple(val.shape) != tuple(tensor.shape):
            # a weight a pass added without a fake value, or replaced (compute_dtype's float32 copies)
            placeholder.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        for node in nodes:
            node.replace_all_uses_with(placeholder)
            graph.erase_node(node)
        lifted[name] = placeholder
        input_specs.append(InputSpec(kind, TensorArgument(placeholder.name), target=name,
                                     persistent=True if kind is InputKind.BUFFER else None))
    for node in placeholders:
        input_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(node.name), target=None))
    output = graph.output_node()
    outputs = output.args[0]
    if not isinstance(outputs, (tuple, list)) or not all(isinstance(o, torch.fx.Node) for o in outputs):
        return None
    output_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), target=None) for o in outputs]

    state_dict = {name: state[name] for name in lifted}
    in_spec = pytree.tree_flatten((tuple(tensors), {}))[1]
    out_spec = pytree.tree_flatten(tuple(outputs))[1]
    signature = ModuleCallSignature(inputs=[TensorArgument(n.name) for n in placeholders],
                                    outputs=[TensorArgument(o.name) for o in outputs],
                                    in_spec=in_spec, out_spec=out_spec,
                                    forward_arg_names=[n.name for n in placeholders])
    lower_composites(graph)
    for node in graph.nodes:
        # nodes a pass added carry no module stack: the exporter would log a warning for each
        # (the re-trace gave them an empty one)
        if node.op == "call_function":
            node.meta.setdefault("nn_module_stack", {})
    root = torch.nn.Module()
    return DecomposedProgram(
        root=root,
        graph=graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict,
        range_constraints=_range_constraints(fake_mode, placeholders),
        module_call_graph=[ModuleCallEntry("", signature)],
        example_inputs=(tuple(tensors), {}),
        constants={},
    )


def _range_constraints(fake_mode: Any, placeholders: list[torch.fx.Node]) -> dict[Any, Any]:
    """{symbol: value range} of every free symbol in the inputs' shapes, from the shape env."""
    shape_env = fake_mode.shape_env
    constraints = {}
    for node in placeholders:
        for size in node.meta["val"].shape:
            if isinstance(size, torch.SymInt):
                for symbol in size.node.expr.free_symbols:
                    constraints[symbol] = shape_env.var_to_range[symbol]
    return constraints


# ---------------------------------------------------------------- the exporter's decomposition step
# torch.onnx.export decomposes every program it is given (`run_decompositions` with a table of the
# ops ONNX does not implement): a second full fake-tensor re-trace, most of the export's time. On
# an fxforge graph it changes nothing but a few CompositeImplicitAutograd ops the tracer kept
# (`.to(dtype)`, `.contiguous()`, `.reshape()`), which `lower_composites` lowers here as the
# re-trace would; `DecomposedProgram.run_decompositions` then returns the program itself when no
# node is one the table (or the re-trace) would change, and decomposes as usual otherwise.

_SIZE_QUERIES = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
                 torch.ops.aten.sym_storage_offset.default}


def lower_composites(graph: torch.fx.Graph) -> int:
    """Rewrite, in place, the composite ops the decomposition re-trace would lower, as it lowers
    them (ATen's CompositeImplicitAutograd kernels): `to.dtype` to nothing when the dtype is
    already right, else `_to_copy(dtype=)`; `to.device` to nothing when it changes nothing;
    `contiguous` to nothing on a contiguous tensor, else `clone(memory_format=contiguous_format)`;
    `reshape` of a contiguous tensor to `view`. Nodes in other forms are left for the re-trace
    (DecomposedProgram then decomposes). Returns how many nodes were rewritten."""
    aten = torch.ops.aten
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        target, args = node.target, node.args
        source = args[0] if args and isinstance(args[0], torch.fx.Node) else None
        val = source.meta.get("val") if source is not None else None
        if not isinstance(val, torch.Tensor):
            continue
        replacement: Any = None
        if target == aten.to.dtype and len(args) == 2 and isinstance(args[1], torch.dtype):
            replacement = source if val.dtype == args[1] else (aten._to_copy.default, (source,), {"dtype": args[1]})
        elif target == aten.to.device and len(args) == 3 and isinstance(args[2], torch.dtype):
            if torch.device(args[1]) == val.device and args[2] == val.dtype:
                replacement = source
        elif target == aten.contiguous.default and len(args) == 1:
            contiguous = _known_contiguous(val)
            if contiguous is not None:
                replacement = source if contiguous else (aten.clone.default, (source,),
                                                         {"memory_format": torch.contiguous_format})
        elif target == aten.reshape.default and len(args) == 2 and _known_contiguous(val):
            replacement = (aten.view.default, args, {})
        if replacement is None:
            continue
        if isinstance(replacement, tuple):
            op, new_args, new_kwargs = replacement
            with graph.inserting_before(node):
                new = graph.call_function(op, new_args, new_kwargs)
            new.meta.update(node.meta)
            replacement = new
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def _known_contiguous(val: torch.Tensor) -> bool | None:
    """Whether a (fake) tensor is contiguous, None where its symbolic strides leave it open."""
    from torch.fx.experimental.symbolic_shapes import statically_known_false, statically_known_true

    try:
        contiguous = val.is_contiguous()
        if statically_known_true(contiguous):
            return True
        return False if statically_known_false(contiguous) else None
    except Exception:  # noqa: BLE001 - undecidable: leave the node to the re-trace
        return None


def already_decomposed(graph: torch.fx.Graph, decomp_table: Any) -> bool:
    """Whether decomposing `graph` with `decomp_table` would leave its ops as they are: no node is
    in the table, mutates (functionalization would rewrite it), is a higher-order op, or is a
    CompositeImplicitAutograd op the re-trace lowers (one that aliases or mutates; functional ones
    such as `linear`, which ONNX translates, are kept when the table does not list them)."""
    try:  # how run_decompositions itself tells the composite ops it keeps from those it lowers
        from torch._export.utils import _is_cia_op as is_cia, _is_preservable_cia_op as preservable
    except ImportError:
        return False
    if not isinstance(decomp_table, dict):
        return False
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return False
        if not isinstance(target, torch._ops.OpOverload):
            continue  # Python arithmetic on sizes, operator.getitem: traced as they are
        if target in decomp_table or target._schema.is_mutable:
            return False
        if target not in _SIZE_QUERIES and is_cia(target) and not preservable(target):
            return False
    return True


class DecomposedProgram(ExportedProgram):
    """An ExportedProgram that skips `run_decompositions` where it would change no op (see
    `already_decomposed`): the exporter's re-trace costs as much as the rest of the export."""

    def run_decompositions(self, decomp_table: Any = None, decompose_custom_triton_ops: bool = False
                           ) -> ExportedProgram:
        if decomp_table is not None and not decompose_custom_triton_ops and \
                already_decomposed(self.graph, decomp_table):
            return self
        logger.debug("decomposing the program: it holds ops the table or the re-trace would change")
        return super().run_decompositions(decomp_table, decompose_custom_triton_ops)
