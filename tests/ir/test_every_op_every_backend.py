"""Every fxforge op × every backend that lowers it, on the op's own `sample_inputs`, against its
reference and within the tolerance the lowering declares (OpInfo-style, as in PyTorch's
`op_db`).

A backend runs the samples the way a compiled model does: all samples of an op are calls in
one graph (weights as get_attr constants, activations as inputs), lowered by the backend's
real `prepare` (the ONNX one exports, folds weight layouts, optimizes and opens an ONNX Runtime
session; the Triton one swaps each op for its kernel, run by the interpreter on CPU). One
export per op keeps the whole file near 30 s on one core.

The eager backend runs the reference itself, so its check is the one that can fail there:
the op's fake implementation (what tracing sees) gives the reference's shape and dtype.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule

from fxforge.backends import get_backend
from fxforge.backends.onnx.lowerings import load_all as load_onnx_lowerings
from fxforge.ir.ops import all_ops, backends_lowering, get_op, lowering_tolerance, sample_inputs
from fxforge.ir.verify import compare_tensors
from fxforge.kernels import load_all as load_kernels

load_onnx_lowerings()
load_kernels()

# fxforge's own ops; ops that tests or plugins define for their own purposes test themselves
# (and, defined at collection time, would otherwise depend on which test files were collected).
OPS = sorted(name for name, op in all_ops().items() if op.module.startswith("fxforge."))
CASES = [(op, backend) for op in OPS for backend in backends_lowering(op)]


def one_op_graph(op_name: str) -> tuple[GraphModule, list[torch.Tensor]]:
    """A graph calling `op_name` once per sample (outputs in sample order) and its flat inputs."""
    overload = get_op(op_name).overload
    root, graph, inputs, outputs = nn.Module(), Graph(), [], []
    for i, sample in enumerate(sample_inputs(op_name)):
        args = []
        for j, value in enumerate(sample.args):
            if j < sample.inputs:
                args.append(graph.placeholder(f"sample{i}_arg{j}"))
                inputs.append(value)
            elif isinstance(value, torch.Tensor):
                root.register_buffer(f"sample{i}_arg{j}", value)
                args.append(graph.get_attr(f"sample{i}_arg{j}"))
            else:
                args.append(value)
        outputs.append(graph.call_function(overload, tuple(args)))
    graph.output(tuple(outputs))
    return GraphModule(root, graph), inputs


def test_every_op_declares_sample_inputs():
    assert len(OPS) >= 14  # the package's ops were found (the filter is no way out)
    missing = []
    for name in OPS:
        try:
            sample_inputs(name)
        except ValueError as error:
            missing.append(str(error))
    assert not missing, "\n".join(missing)


def test_every_lowering_is_covered_here():
    """A lowering registered for a backend this file does not run would go untested."""
    runs = {"eager", "onnx", "triton"}
    extra = sorted({(op, b) for op, b in CASES if b not in runs})
    assert not extra, f"lowerings for backends this test does not run: {extra}; add the backend to run_backend"


def run_backend(backend: str, gm: GraphModule, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    runner = get_backend(backend)(gm, inputs)
    with torch.no_grad():
        return list(runner(*inputs))


@pytest.mark.parametrize("op_name,backend", CASES, ids=[f"{op}-{b}" for op, b in CASES])
def test_op_on_backend_matches_reference(op_name, backend):
    samples = sample_inputs(op_name)  # fails, naming the op, when it declares none
    gm, inputs = one_op_graph(op_name)
    reference = get_op(op_name).overload
    with torch.no_grad():
        expected = [reference(*s.args) for s in samples]
    if backend == "eager":
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            for sample, want in zip(samples, expected):
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in sample.args]
                fake = reference(*fake_args)
                assert (tuple(fake.shape), fake.dtype) == (tuple(want.shape), want.dtype), (
                    f"{op_name} [{sample.name}]: the fake implementation says {tuple(fake.shape)} "
                    f"{fake.dtype}, the reference returns {tuple(want.shape)} {want.dtype}")
    tolerance = lowering_tolerance(backend, op_name)
    assert tolerance is not None or backend == "eager", (
        f"the {backend} lowering of {op_name} declares no tolerance: pass register_lowering(..., "
        f"tolerance=Tolerance(...)) with the bound it meets, measured on these samples")
    got = run_backend(backend, gm, inputs)
    assert len(got) == len(samples)
    for sample, want, out in zip(samples, expected, got):
        assert tuple(out.shape) == tuple(want.shape) and out.dtype == want.dtype, (
            f"{op_name} on {backend} [{sample.name}]: {tuple(out.shape)} {out.dtype}, expected "
            f"{tuple(want.shape)} {want.dtype}")
        if tolerance is None:  # eager: the reference ran
            assert torch.equal(out, want), f"{op_name} on eager [{sample.name}] is not the reference"
            continue
        error = compare_tensors(want, out, tolerance)
        assert error.ok, f"{op_name} on {backend} [{sample.name}]: {error.reason} (max abs {error.max_abs:.3g}, " \
                         f"rel L2 {error.rel_l2:.3g}, cosine {error.cosine:.6f}); declared {tolerance}"
