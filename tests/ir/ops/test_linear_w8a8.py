"""fxforge::linear_w8a8: per-token quantization, exact integer product, fake impl, errors."""
import pytest
import torch

from fxforge.ir.ops.linear_w8a8 import quantize_per_token

linear_w8a8 = torch.ops.fxforge.linear_w8a8


def test_exact_when_activations_are_on_the_int8_grid():
    # x = x8 * 2^-3 with a 127 in each row: quantization is lossless, so y is known exactly.
    n, k = 6, 40
    x8 = torch.randint(-127, 128, (4, k), dtype=torch.int32)
    x8[:, 0] = 127
    x = x8.float() * 0.125
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wscale = torch.rand(n) * 0.01
    bias = torch.randn(n)
    expected = (x8.double() @ w.double().T) * 0.125 * wscale.double() + bias.double()
    got = linear_w8a8(x, w, wscale, bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_matches_plain_float_computation_on_random_inputs():
    n, k = 5, 33
    x, w = torch.randn(2, 3, k), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wscale = torch.rand(n) * 0.02
    rows = x.reshape(-1, k).double()
    s = rows.abs().amax(-1, keepdim=True) / 127
    x8 = torch.clamp(torch.round(rows / s), -127, 127)
    expected = ((x8 @ w.double().T) * s * wscale.double()).reshape(2, 3, n)
    got = linear_w8a8(x, w, wscale, None)
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # ...and within int8 quantization error of the unquantized product.
    float_y = x.double() @ (w.double() * wscale.double()[:, None]).T
    assert (got.double() - float_y).abs().max() < 0.02 * float_y.abs().max()


def test_large_k_accumulates_without_overflow():
    # The int32 sum reaches 127*127*4096 > 2^24: no overflow, no visible rounding. x8 = 127 and
    # s_x = 1/127, so y = sum of the weights.
    k = 4096
    x = torch.full((1, k), 1.0)
    w = torch.full((1, k), 127, dtype=torch.int8)
    w[0, 0] = 126
    got = linear_w8a8(x, w, torch.ones(1), None)
    assert got.item() == pytest.approx(float(127 * (k - 1) + 126), rel=1e-6)


def test_zero_row_and_round_half_even():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [127.0, 0.5, 1.5, 2.5]])
    x8, scale = quantize_per_token(x)
    assert x8.tolist() == [[0, 0, 0, 0], [127, 0, 2, 2]]
    assert scale.flatten().tolist() == [1.0, 1.0]
    bias = torch.randn(3)
    y = linear_w8a8(x, torch.ones(3, 4, dtype=torch.int8), torch.ones(3), bias)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_their_dtype(dtype):
    x = torch.randn(3, 16, dtype=dtype)
    w, wscale = torch.randint(-127, 128, (4, 16), dtype=torch.int8), torch.rand(4)
    y = linear_w8a8(x, w, wscale, None)
    assert y.dtype == dtype
    # Same quantization as the float32 path on the same (half-representable) values.
    torch.testing.assert_close(y.float(), linear_w8a8(x.float(), w, wscale, None), rtol=1e-2, atol=1e-2)


class _W8A8Linear(torch.nn.Module):
    def __init__(self, n=6, k=16):
        super().__init__()
        self.register_buffer("qweight", torch.randint(-127, 128, (n, k), dtype=torch.int8))
        self.register_buffer("wscale", torch.rand(n))

    def forward(self, x):
        return linear_w8a8(x, self.qweight, self.wscale, None)


def test_fake_impl_gives_shapes_under_export():
    module = _W8A8Linear()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(module, (torch.randn(3, 16),), dynamic_shapes=({0: batch},))
    (node,) = [n for n in ep.graph.nodes if n.target is torch.ops.fxforge.linear_w8a8.default]
    assert not isinstance(node.meta["val"].shape[0], int)
    assert node.meta["val"].shape[1] == 6
    x = torch.randn(9, 16)
    torch.testing.assert_close(ep.module()(x), module(x))


def test_errors_name_the_problem():
    w = torch.randint(-127, 128, (4, 16), dtype=torch.int8)
    with pytest.raises(ValueError, match="qweight has K=16 but x has K=8"):
        linear_w8a8(torch.randn(2, 8), w, torch.ones(4), None)
    with pytest.raises(ValueError, match="qweight must be 2-D int8"):
        linear_w8a8(torch.randn(2, 16), w.float(), torch.ones(4), None)
    with pytest.raises(ValueError, match=r"wscale has shape \(3,\), expected \(4,\)"):
        linear_w8a8(torch.randn(2, 16), w, torch.ones(3), None)
