"""fxforge::linear_wq: bit packing, the reference's numerics, the fake impl under export, errors."""
import pytest
import torch

from fxforge.ir.ops.linear_wq import dequantize_wq, pack_bits, unpack_bits

linear_wq = torch.ops.fxforge.linear_wq


def _all_codes(bits: int, k: int) -> torch.Tensor:
    """Rows that put every code value at every position (hence every bit offset in a byte)."""
    levels = 1 << bits
    rows = torch.arange(levels).unsqueeze(1) + torch.arange(k).unsqueeze(0)
    return (rows % levels).to(torch.uint8)


def _random_wq(n: int, k: int, bits: int, group_size: int, scale_dtype=torch.float32):
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * 0.1 + 0.01).to(scale_dtype)
    zeros = torch.randint(0, 1 << bits, (n, k // group_size), dtype=torch.uint8)
    return q, scales, zeros


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_every_value(bits):
    q = _all_codes(bits, k=32)
    packed = pack_bits(q, bits)
    assert packed.shape == (q.shape[0], 32 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, 32), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_layout_is_matmulnbits(bits):
    # Element k lives in byte (k*bits)//8 at bit offset (k*bits)%8, low bits first.
    q = torch.randint(0, 1 << bits, (3, 16), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    for n in range(3):
        for k in range(16):
            byte = int(packed[n, (k * bits) // 8])
            assert (byte >> ((k * bits) % 8)) & ((1 << bits) - 1) == int(q[n, k])


def test_pack_nibble_order_example():
    assert pack_bits(torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8), 4).tolist() == [[0x21, 0xF3]]


@pytest.mark.parametrize("bits,group_size", [(4, 16), (4, 48), (2, 24), (8, 48)])
def test_reference_matches_plain_float_computation(bits, group_size):
    n, k = 5, 48
    q, scales, zeros = _random_wq(n, k, bits, group_size)
    x, bias = torch.randn(2, 3, k), torch.randn(n)
    expected_w = torch.empty(n, k, dtype=torch.float64)
    for j in range(k):  # the definition, one column at a time
        g = j // group_size
        expected_w[:, j] = (q[:, j].double() - zeros[:, g].double()) * scales[:, g].double()
    expected = x.double() @ expected_w.T + bias.double()
    got = linear_wq(x, pack_bits(q, bits), scales, zeros, bias, bits, group_size)
    assert got.dtype == torch.float32 and got.shape == (2, 3, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dequantize_wq(pack_bits(q, bits), scales, zeros, bits, group_size, k).double(),
                               expected_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_keeps_half_dtypes(dtype):
    q, scales, zeros = _random_wq(4, 32, 4, 32, scale_dtype=dtype)
    x = torch.randn(3, 32, dtype=dtype)
    got = linear_wq(x, pack_bits(q, 4), scales, zeros, None, 4, 32)
    expected = x.float() @ dequantize_wq(pack_bits(q, 4), scales, zeros, 4, 32, 32).T
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


class _QuantLinear(torch.nn.Module):
    def __init__(self, n=6, k=32, bits=4, group_size=16):
        super().__init__()
        q, scales, zeros = _random_wq(n, k, bits, group_size)
        self.register_buffer("qweight", pack_bits(q, bits))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = torch.nn.Parameter(torch.randn(n))
        self.bits, self.group_size = bits, group_size

    def forward(self, x):
        return linear_wq(x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size)


def test_fake_impl_gives_shapes_under_export():
    module = _QuantLinear()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(module, (torch.randn(3, 5, 32),), dynamic_shapes=({0: batch},))
    (node,) = [n for n in ep.graph.nodes if n.target is torch.ops.fxforge.linear_wq.default]
    shape = node.meta["val"].shape
    assert not isinstance(shape[0], int)  # batch stays symbolic
    assert tuple(shape[1:]) == (5, 6)
    x = torch.randn(7, 5, 32)
    torch.testing.assert_close(ep.module()(x), module(x))


def test_error_group_size_does_not_divide_k():
    q, scales, zeros = _random_wq(4, 48, 4, 16)
    with pytest.raises(ValueError, match="K=48 is not divisible by group_size=32"):
        linear_wq(torch.randn(2, 48), pack_bits(q, 4), scales[:, :1], zeros[:, :1], None, 4, 32)


def test_error_qweight_width_does_not_match_bits():
    q, scales, zeros = _random_wq(4, 32, 4, 16)
    with pytest.raises(ValueError, match="bits argument does not match"):
        linear_wq(torch.randn(2, 32), pack_bits(q, 4), scales, zeros, None, 8, 16)


def test_error_scale_shape_and_bits_and_pack_range():
    q, scales, zeros = _random_wq(4, 32, 4, 16)
    with pytest.raises(ValueError, match=r"scales has shape \(4, 1\), expected"):
        linear_wq(torch.randn(2, 32), pack_bits(q, 4), scales[:, :1], zeros, None, 4, 16)
    with pytest.raises(ValueError, match="use 2, 4 or 8"):
        pack_bits(q, 3)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_bits(q | 8, 2)


def test_error_surfaces_at_export_time():
    module = _QuantLinear()
    module.group_size = 7
    with pytest.raises(ValueError, match="not divisible by group_size=7"):
        torch.export.export(module, (torch.randn(3, 32),))
