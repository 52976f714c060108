"""fxforge::linear_w8a8 exported to ORT's integer kernels, run by ORT, against the reference.

The reference is defined as ORT computes each act_scale mode (see the op's docstring), so
float32 outputs must match to ~1e-5 relative (in practice they are bit-identical), including
inputs that land exactly halfway between two codes.
"""
import platform
from pathlib import Path

import onnx
import pytest
import torch
from testing_utils import export_op_module, run_ort


def _x86_without_vnni() -> bool:
    """ORT's uint8 x int8 kernel on x86 without VNNI (vpmaddubsw) saturates int16 pair sums, as
    ORT documents; with VNNI (vpdpbusd, AVX-VNNI, AMX) and on Arm (udot/sdot) it is exact."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


exact_u8s8 = pytest.mark.skipif(_x86_without_vnni(), reason="ORT's u8s8 GEMM saturates on x86 without VNNI")
GEMM = "MatMulIntegerToFloat"


class W8A8Linear(torch.nn.Module):
    def __init__(self, n, k, bias=True, dtype=torch.float32, act_scale="tensor"):
        super().__init__()
        self.eval()
        self.act_scale = act_scale
        self.register_buffer("qweight", torch.randint(-127, 128, (n, k), dtype=torch.int8))
        self.register_buffer("wscale", torch.rand(n) * 0.01)
        self.bias = torch.nn.Parameter(torch.randn(n).to(dtype)) if bias else None

    def forward(self, x):
        return torch.ops.fxforge.linear_w8a8(x, self.qweight, self.wscale, self.bias, self.act_scale)


def _inputs(batch: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, k, generator=g) * [0.01, 1.0, 30.0][seed % 3]
    if seed % 2:
        x = x.abs()  # all positive: the per-tensor zero point is 0
    if seed % 4 == 1:
        # Values on a coarse grid: x / scale often lands exactly on .5, exercising half-to-even.
        x = torch.round(x * 4) / 4
    x[0, 0] = 0  # an all-zero token takes the per-token zero-scale guard
    x[-1, 1, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5])
    return x.to(dtype)


@exact_u8s8
@pytest.mark.parametrize("act_scale", ["tensor", "token"])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float32, False), (torch.float16, True)])
def test_matches_reference(tmp_path, act_scale, dtype, bias):
    module = W8A8Linear(n=24, k=80, bias=bias, dtype=dtype, act_scale=act_scale)
    model, session = export_op_module(module, torch.randn(2, 3, 80, dtype=dtype), tmp_path / "m.onnx")
    ops = [node.op_type for node in model.graph.node]
    assert ops.count(GEMM) == 1 and "MatMulInteger" not in ops
    assert ("DynamicQuantizeLinear" in ops) == (act_scale == "tensor")
    # per token: one blocked QuantizeLinear forms the codes (not Div/Round/Clip/Add/Cast)
    assert ("QuantizeLinear" in ops) == (act_scale == "token") and "Round" not in ops
    # per token: the (…, M, 1) row scales are the GEMM's A scale, no Mul after it
    assert "Mul" not in ops if act_scale == "token" else True
    for seed, batch in enumerate((1, 2, 5, 1, 2, 5, 3, 4)):  # batch 1: the decode shape, M = 3 rows
        x = _inputs(batch, 80, dtype, seed)
        got, expected = run_ort(session, x), module(x)
        assert got.shape == (batch, 3, 24) and got.dtype == dtype
        if dtype == torch.float32:  # bit for bit: the lowering keeps the reference's rounding order
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:  # one float16 ulp from the final cast
            torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
def test_weight_is_one_int8_initializer(tmp_path, act_scale):
    module = W8A8Linear(24, 80, act_scale=act_scale)
    model, _ = export_op_module(module, torch.randn(2, 3, 80), tmp_path / "m.onnx")
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert [tuple(i.dims) for i in int8] == [(80, 24)]  # stored once, (K, N), one byte an element
    # ...and the GEMM reads it directly: no Transpose left to run or fold.
    (gemm,) = [n for n in model.graph.node if n.op_type == GEMM]
    assert gemm.input[1] == int8[0].name
    assert "Transpose" not in {n.op_type for n in model.graph.node}
    # Per-column float32 scales, also an initializer the op reads directly.
    scales = {i.name: i for i in model.graph.initializer}
    assert tuple(scales[gemm.input[3]].dims) == (24,)


def test_per_tensor_differs_from_per_token():
    # The two modes are different quantizers: a token with a large range coarsens the others
    # only per tensor. (Guards against a mode flag that is silently ignored.)
    module = W8A8Linear(16, 64).requires_grad_(False)
    x = torch.randn(1, 3, 64)
    x[0, 0] *= 100
    y_tensor = module(x)
    module.act_scale = "token"
    y_token = module(x)
    exact = x @ (module.qweight.float() * module.wscale[:, None]).T + module.bias
    err = lambda y: float((y[0, 1:] - exact[0, 1:]).norm() / exact[0, 1:].norm())  # noqa: E731
    assert err(y_token) < 0.5 * err(y_tensor)


@exact_u8s8
@pytest.mark.parametrize("shape", [(1, 80), (5, 80)])
def test_per_token_other_ranks(tmp_path, shape):
    # 2-D x, one token (the decode shape) and several: row scales (M, 1), codes exact.
    module = W8A8Linear(n=24, k=80, act_scale="token")
    _, session = export_op_module(module, torch.randn(*shape), tmp_path / "m.onnx")
    x = torch.round(torch.randn(*shape) * 8) / 4  # many exact halves
    torch.testing.assert_close(run_ort(session, x), module(x), rtol=0, atol=0)

