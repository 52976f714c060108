"""An fxforge graph as a `torch.export.ExportedProgram`, without tracing it again.

`torch.onnx.export(gm, ...)` first captures `gm` with `torch.export.export` (a full fake-tensor
re-trace of a graph we already have, shapes and all), then retraces that program once more with
its decomposition table (`run_decompositions`). The first trace rebuilds what the graph already
holds: its nodes carry fake values (`meta["val"]`, symbolic dims included) from fxforge's own
trace and the pipeline's metadata refresh. `as_exported_program` builds the program directly —
parameters and buffers lifted to placeholders named as torch.export names them, the graph's
symbolic dims as range constraints — so the exporter starts at its decomposition step: one trace
instead of two. The ONNX written is the same (tests/backends/onnx/test_exported_program.py).

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
    root = torch.nn.Module()
    return ExportedProgram(
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
