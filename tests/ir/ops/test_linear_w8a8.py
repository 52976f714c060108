"""fxforge::linear_w8a8: per-tensor and per-token quantization, exact integer product, fake impl, errors."""
import pytest
import torch

from fxforge.ir.ops.linear_w8a8 import per_tensor_params, quantize_per_tensor, quantize_per_token

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
    got = linear_w8a8(x, w, wscale, bias, "token")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_per_tensor_exact_on_its_grid():
    # x = (q - zp) * s with min -zp*s and max (255-zp)*s on the grid: lossless, y known exactly.
    n, k, zp, s = 6, 40, 100, 0.25
    q = torch.randint(0, 256, (4, k), dtype=torch.int32)
    q[0, 0], q[1, 1] = 0, 255
    x = (q - zp).float() * s
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wscale = torch.rand(n) * 0.01
    scale, zero_point = per_tensor_params(x)
    assert scale.item() == s and zero_point.item() == zp
    expected = ((q - zp).double() @ w.double().T) * s * wscale.double()
    torch.testing.assert_close(linear_w8a8(x, w, wscale, None, "tensor").double(), expected, rtol=1e-6, atol=1e-6)


def test_per_tensor_params_follow_dynamic_quantize_linear():
    # The range always includes 0: an all-positive x has zero point 0, all-negative 255.
    _, zp = per_tensor_params(torch.tensor([1.0, 3.0]))
    assert zp.item() == 0
    scale, zp = per_tensor_params(torch.tensor([-2.0, -1.0]))
    assert zp.item() == 255 and scale.item() == pytest.approx(2 / 255)
    assert [t.item() for t in per_tensor_params(torch.zeros(3))] == [1.0, 0.0]  # zero range: scale 1
    # Range 63.75: scale 0.25 exactly; -lo/s = 100.5 rounds to the even zero point 100, and
    # codes round half to even after the division: 0.5 -> 0, 1.5 -> 2, 154.5 -> 154.
    x = torch.tensor([-25.125, 0.0, 0.125, 0.375, 38.625])
    q, scale, zp = quantize_per_tensor(x)
    assert scale.item() == 0.25 and zp.item() == 100
    assert q.dtype == torch.uint8 and q.tolist() == [0, 100, 100, 102, 254]


def test_matches_plain_float_computation_on_random_inputs():
    n, k = 5, 33
    x, w = torch.randn(2, 3, k), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wscale = torch.rand(n) * 0.02
    rows = x.reshape(-1, k).double()
    s = rows.abs().amax(-1, keepdim=True) / 127
    x8 = torch.clamp(torch.round(rows / s), -127, 127)
    expected = ((x8 @ w.double().T) * s * wscale.double()).reshape(2, 3, n)
    got = linear_w8a8(x, w, wscale, None, "token")
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # ...and within int8 quantization error of the unquantized product.
    float_y = x.double() @ (w.double() * wscale.double()[:, None]).T
    assert (got.double() - float_y).abs().max() < 0.02 * float_y.abs().max()
    # Per tensor: one asymmetric scale over all six rows, also close to the float product.
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s_t = (hi - lo) / 255
    zp = round(-lo / s_t)
    q = torch.clamp(torch.round(x.double() / s_t) + zp, 0, 255) - zp
    expected_t = (q.reshape(-1, k) @ w.double().T) * s_t * wscale.double()
    got_t = linear_w8a8(x, w, wscale, None, "tensor")
    torch.testing.assert_close(got_t.double().reshape(-1, n), expected_t, rtol=1e-5, atol=1e-6)
    assert (got_t.double() - float_y).abs().max() < 0.03 * float_y.abs().max()


def test_large_k_accumulates_without_overflow():
    # The int32 sum reaches 127*127*4096 > 2^24: no overflow, no visible rounding. x8 = 127 and
    # s_x = 1/127, so y = sum of the weights.
    k = 4096
    x = torch.full((1, k), 1.0)
    w = torch.full((1, k), 127, dtype=torch.int8)
    w[0, 0] = 126
    for act_scale in ("token", "tensor"):  # per tensor: s = 1/255, zp = 0, codes 255, so y = 255/255 * Σw
        got = linear_w8a8(x, w, torch.ones(1), None, act_scale)
        assert got.item() == pytest.approx(float(127 * (k - 1) + 126), rel=1e-6)


def test_zero_row_and_round_half_even():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [127.0, 0.5, 1.5, 2.5]])
    x8, scale = quantize_per_token(x)
    assert x8.tolist() == [[0, 0, 0, 0], [127, 0, 2, 2]]
    assert scale.flatten().tolist() == [1.0, 1.0]
    bias = torch.randn(3)
    y = linear_w8a8(x, torch.ones(3, 4, dtype=torch.int8), torch.ones(3), bias, "token")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], bias)
    y = linear_w8a8(torch.zeros(2, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(3), bias, "tensor")
    torch.testing.assert_close(y, bias.expand(2, 3))


def test_empty_input():
    for act_scale in ("token", "tensor"):
        y = linear_w8a8(torch.zeros(0, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(3), None, act_scale)
        assert y.shape == (0, 3)


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_their_dtype(dtype, act_scale):
    x = torch.randn(3, 16, dtype=dtype)
    w, wscale = torch.randint(-127, 128, (4, 16), dtype=torch.int8), torch.rand(4)
    y = linear_w8a8(x, w, wscale, None, act_scale)
    assert y.dtype == dtype
    # Same quantization as the float32 path on the same (half-representable) values.
    torch.testing.assert_close(y.float(), linear_w8a8(x.float(), w, wscale, None, act_scale), rtol=1e-2, atol=1e-2)


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
    with pytest.raises(ValueError, match="act_scale must be one of"):
        linear_w8a8(torch.randn(2, 16), w, torch.ones(4), None, "row")
