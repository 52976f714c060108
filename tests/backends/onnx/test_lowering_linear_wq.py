"""fxforge::linear_wq exported to com.microsoft::MatMulNBits and run by ONNX Runtime."""
import onnx
import pytest
import torch
from testing_utils import export_op_module, run_ort

import fxforge.backends.onnx.lowerings.linear_wq as wq_lowering
from fxforge.backends.onnx.options import OnnxOptions
from fxforge.ir.ops.linear_wq import dequantize_wq, pack_bits


class QuantLinear(torch.nn.Module):
    def __init__(self, n, k, bits, group_size, bias=True, dtype=torch.float32):
        super().__init__()
        self.eval()
        q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
        self.register_buffer("qweight", pack_bits(q, bits))
        self.register_buffer("scales", (torch.rand(n, k // group_size) * 0.1 + 0.01).to(dtype))
        self.register_buffer("zeros", torch.randint(0, 1 << bits, (n, k // group_size), dtype=torch.uint8))
        self.bias = torch.nn.Parameter(torch.randn(n).to(dtype)) if bias else None
        self.bits, self.group_size = bits, group_size

    def forward(self, x):
        return torch.ops.fxforge.linear_wq(x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size)


@pytest.mark.parametrize(
    "bits,group_size,dtype,bias",
    [(4, 32, torch.float32, True), (8, 16, torch.float16, False), (2, 32, torch.float32, False)],
)
def test_matches_reference_at_accuracy_level_0(tmp_path, bits, group_size, dtype, bias):
    module = QuantLinear(n=24, k=96, bits=bits, group_size=group_size, bias=bias, dtype=dtype)
    model, session = export_op_module(module, torch.randn(2, 3, 96, dtype=dtype), tmp_path / "m.onnx",
                                      options=OnnxOptions(accuracy_level=0))  # float compute: tight comparison
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert node.domain == "com.microsoft"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 96, "N": 24, "bits": bits, "block_size": group_size, "accuracy_level": 0}
    for batch in (2, 5):  # the second size exercises the dynamic batch dimension
        x = torch.randn(batch, 3, 96, dtype=dtype)
        got, expected = run_ort(session, x), module(x)
        assert got.shape == (batch, 3, 24) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


def test_default_export_is_4_bit_and_within_activation_quantization_bound(tmp_path):
    k, n, g = 512, 64, 128
    module = QuantLinear(n=n, k=k, bits=4, group_size=g, bias=False)
    model, session = export_op_module(module, torch.randn(3, k), tmp_path / "m.onnx")
    (node,) = [nd for nd in model.graph.node if nd.op_type == "MatMulNBits"]
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "accuracy_level")) == 4

    # Real 4-bit storage: B's initializer (possibly behind a Reshape ORT folds) has two weights
    # a byte, and everything stored is about 1/8 of fp32 (+ scales and zero points per group).
    sizes = {init.name: onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer}
    producers = {out: nd for nd in model.graph.node for out in nd.output}
    b_name = node.input[1]
    while b_name not in sizes and producers[b_name].op_type == "Reshape":
        b_name = producers[b_name].input[0]
    assert sizes[b_name] == n * k // 2
    fp32_bytes = n * k * 4
    assert fp32_bytes / 8 <= sum(sizes.values()) < 0.14 * fp32_bytes

    # At accuracy_level 4 ORT rounds each block of activations to int8 (error <= max|x_blk|/254
    # per element), so |y - ref| <= sum over blocks of max|x_blk|/254 * sum_k |ŵ[n, k]|.
    x = torch.randn(7, k)
    got, expected = run_ort(session, x), module(x)
    w = dequantize_wq(module.qweight, module.scales, module.zeros, 4, g, k).abs()
    step = x.abs().reshape(7, k // g, g).amax(-1) / 254  # (tokens, blocks)
    bound = step @ w.reshape(n, k // g, g).sum(-1).T + 1e-4
    assert ((got - expected).abs() <= bound).all()
    assert (got - expected).abs().max() > 1e-5  # the int8 path really ran (else level 0 semantics)


def test_bfloat16_activations_go_through_float32(tmp_path):

    class Bf16(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = QuantLinear(n=8, k=64, bits=4, group_size=32)

        def forward(self, x):
            return self.inner(x.to(torch.bfloat16)).to(torch.float32)

    module = Bf16()
    _, session = export_op_module(module, torch.randn(2, 64), tmp_path / "m.onnx", options=OnnxOptions(accuracy_level=0))
    x = torch.randn(4, 64)
    torch.testing.assert_close(run_ort(session, x), module(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("group_size", [24, 8])
def test_group_size_matmulnbits_cannot_take_is_refused(group_size):
    # The check runs first in the lowering, so calling it directly is what export would raise
    # (a full export takes ~5 s on CI; the error path needs none of it).
    with pytest.raises(ValueError, match=rf"group_size={group_size} cannot be exported to ONNX.*power of two >= 16"):
        wq_lowering.linear_wq_onnx(None, None, None, None, None, 4, group_size, options=OnnxOptions())


def _export_optimized(module, example, path, options):
    """Exported and optimized as the backend does (`optimize_model`, which packs zero points)."""
    import onnxruntime as ort

    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table
    from fxforge.backends.onnx.optimize import optimize_model

    program = torch.onnx.export(module, (example,), dynamo=True, custom_translation_table=translation_table(options),
                                opset_version=OPSET_VERSION, verbose=False, optimize=False)
    optimize_model(program.model)
    program.save(str(path))
    return onnx.load(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,sym,bias", [(4, False, True), (4, True, False), (2, False, False), (8, True, False)])
def test_optimized_linear_is_one_matmulnbits_with_constant_inputs(tmp_path, bits, sym, bias):
    # k=160 with g=32: 5 blocks, an odd count, so 4-bit zero points need a padding nibble
    module = QuantLinear(n=24, k=160, bits=bits, group_size=32, bias=bias)
    if sym:
        module.zeros.fill_(1 << (bits - 1))
    model, session = _export_optimized(module, torch.randn(3, 160), tmp_path / "m.onnx",
                                       OnnxOptions(accuracy_level=0))
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"] + (["Add"] if bias else [])
    (node,) = model.graph.node[:1]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(name in inits for name in node.input[1:])  # weight, scales, zero points: all stored
    if sym:  # every zero point is MatMulNBits' default 2^(bits-1): no input at all
        assert len(node.input) == 3
    else:
        stored = inits[node.input[3]]
        assert stored.dtype == "uint8" and stored.shape == (24, -(-5 * bits // 8))
        assert (stored == wq_lowering.pack_zero_points(module.zeros.numpy(), bits)).all()
    x = torch.randn(3, 160)
    torch.testing.assert_close(run_ort(session, x), module(x), rtol=1e-5, atol=1e-4)


def test_pack_zero_points_is_matmulnbits_layout():
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8).numpy()
    assert wq_lowering.pack_zero_points(codes, 4).tolist() == [[0x21, 0x03], [0x0F, 0x07]]
    assert wq_lowering.pack_zero_points(codes % 4, 2).tolist() == [[1 | 2 << 2 | 3 << 4], [3 | 0 << 2 | 3 << 4]]
