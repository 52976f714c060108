"""Running a graph at several input sets together (fxforge/ir/lockstep.py) and the reused
dequantization buffers (fxforge/ir/scratch.py): bit for bit the outputs of separate runs, each
packed weight (each slice of a large one) dequantized once for every set, the claim of quantize
likewise, and a buffer reused only inside its block."""
import pytest
import torch
from torch import nn

import fxforge
import fxforge.ir.ops.linear_wq as linear_wq_module
from fxforge.ir.lockstep import run_graph_many
from fxforge.ir.scratch import scratch, scratch_buffers
from fxforge.ir.trace import trace
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 4096)  # 1 MiB of float32: several row slices at a 256 KiB chunk

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x))))).softmax(-1)


@pytest.fixture
def dequantizations(monkeypatch):
    """Row counts of every dequantize_wq call; row slices are 256 KiB of float32."""
    monkeypatch.setattr(linear_wq_module, "DENSE_CHUNK_BYTES", 256 << 10)
    calls = []
    original = linear_wq_module.dequantize_wq

    def counting(qweight, *args, **kwargs):
        calls.append(qweight.shape[0])
        return original(qweight, *args, **kwargs)

    monkeypatch.setattr(linear_wq_module, "dequantize_wq", counting)
    return calls


def _quantized():
    torch.manual_seed(0)
    gm = trace(_Mlp().eval(), (torch.randn(2, 5, 64),))
    ctx = PassContext(example_inputs=(torch.randn(2, 5, 64),))
    quantized, _ = Pipeline("quantize(bits=4,group_size=32)").run(gm, ctx, verify=False)
    return quantized


def test_outputs_equal_separate_runs_and_each_weight_is_dequantized_once(dequantizations):
    gm = _quantized()
    sets = [(torch.randn(2, 5, 64),), (torch.randn(3, 7, 64),), (torch.randn(1, 1, 64),)]
    separate = [run_graph(gm, inputs) for inputs in sets]
    per_run = list(dequantizations)
    dequantizations.clear()
    together = run_graph_many(gm, sets)
    assert len(together) == 3
    for alone, joint in zip(separate, together):
        assert len(alone) == len(joint) and all(torch.equal(a, b) for a, b in zip(alone, joint))
    # up, down, and the head in 4 slices of 1024 rows: once each for the three sets
    assert sorted(dequantizations) == sorted(per_run[:len(per_run) // 3]) == [64, 128, 1024, 1024, 1024, 1024]


def test_the_reference_of_quantize_builds_each_claimed_weight_once(monkeypatch, dequantizations):
    import fxforge.passes.quantize as quantize_module
    from fxforge.ir.reference import reference_graph

    gm = trace(_Mlp().eval(), (torch.randn(2, 5, 64),))
    ctx = PassContext(example_inputs=(torch.randn(2, 5, 64),))
    p = Pipeline("quantize(bits=4,group_size=32)").passes[0]
    from fxforge.passes.cow import structural_copy

    result = p.run(structural_copy(gm), ctx)
    reference = reference_graph(gm, result.semantics)
    claims = []
    original = quantize_module.claimed_weight
    monkeypatch.setattr(quantize_module, "claimed_weight",
                        lambda layer, axis, out=None: claims.append(1) or original(layer, axis, out=out))
    sets = [(torch.randn(2, 5, 64),), (torch.randn(4, 3, 64),)]
    separate = [run_graph(reference, inputs) for inputs in sets]
    alone = len(claims)
    claims.clear()
    together = run_graph_many(reference, sets)
    assert len(claims) * 2 == alone == 2 * 6  # up, down, 4 head slices
    assert all(torch.equal(a, b) for s, t in zip(separate, together) for a, b in zip(s, t))


def test_a_node_whose_weights_differ_between_sets_runs_once_per_set():
    from fxforge.ir.lockstep import _batched
    from fxforge.ir.ops.registry import many_for

    assert many_for(torch.ops.fxforge.linear_wq.default) is linear_wq_module._linear_wq_many
    assert many_for(torch.ops.aten.linear.default) is None  # not an fxforge op: run once per set

    class _Run:
        def __init__(self, args):
            self.args = args

        def fetch_args_kwargs_from_env(self, node):
            return self.args, {}

    class _Node:
        target = torch.ops.fxforge.linear_wq.default
        args = (None,)

    shared, other = torch.zeros(1), torch.zeros(1)
    assert _batched(_Node(), [_Run((1, shared)), _Run((2, other))]) is None


def test_scratch_reuses_its_buffer_inside_the_block_only():
    outside = [scratch("t", (4, 4), torch.float32), scratch("t", (4, 4), torch.float32)]
    assert outside[0].data_ptr() != outside[1].data_ptr() or outside[0] is not outside[1]
    with scratch_buffers():
        a = scratch("t", (4, 4), torch.float32)
        b = scratch("t", (2, 8), torch.float32)  # same size or smaller: the same memory
        c = scratch("u", (4, 4), torch.float32)  # another slot: its own
        d = scratch("t", (8, 8), torch.float32)  # larger: grown
        assert a.data_ptr() == b.data_ptr() != c.data_ptr() and tuple(b.shape) == (2, 8)
        assert d.numel() == 64 and tuple(d.shape) == (8, 8)


def test_a_quantized_compile_verifies_both_shapes_from_one_run(dequantizations):
    torch.manual_seed(0)
    model = _Mlp().eval()
    compiled = fxforge.compile(model, (torch.randn(2, 5, 64),), passes="quantize(bits=4,group_size=32)")
    record = compiled.report["quantize"]
    assert len(record.verified_shapes) == 2 and record.verified_against == "semantics"
    # one lockstep run of the result at both shapes: each weight (slice) dequantized once
    assert sorted(dequantizations) == [64, 128, 1024, 1024, 1024, 1024]


def test_scratch_buffers_belong_to_the_thread_that_opened_them():
    import threading

    seen = {}
    with scratch_buffers():
        mine = scratch("t", (4,), torch.float32)

        def other():
            with scratch_buffers():
                seen["other"] = scratch("t", (4,), torch.float32).data_ptr()
            seen["outside"] = scratch("t", (4,), torch.float32).data_ptr()

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        assert scratch("t", (4,), torch.float32).data_ptr() == mine.data_ptr()
    assert seen["other"] != mine.data_ptr()
