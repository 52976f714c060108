"""Triton linear_w8a8 kernels (per-token quantization + int8 GEMM) against the op's reference.

Runs under TRITON_INTERPRET=1 (tests/conftest.py); the Hopper compile check runs in an
interpreter-free subprocess (see tests/kernels/test_wq_gemm.py for why).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fxforge.ir.ops import lowering_for
from fxforge.ir.ops.linear_w8a8 import quantize_per_token
from fxforge.kernels.w8a8_gemm import linear_w8a8_triton, quantize_per_token_triton

reference = torch.ops.fxforge.linear_w8a8


def _inputs(m, k, dtype):
    x = torch.randn(m, k).to(dtype)
    x[0, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5]).to(dtype)  # ties: round half to even
    if m > 2:
        x[2] = 0  # zero-scale guard
    return x


def test_quantization_is_bit_identical_to_reference():
    x = _inputs(5, 1500, torch.float32)  # K > one 1024 block: both passes loop
    x8, scale = quantize_per_token_triton(x)
    ref_x8, ref_scale = quantize_per_token(x)
    assert torch.equal(x8, ref_x8)
    assert torch.equal(scale, ref_scale.flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("k", [80, 96])
def test_matches_reference_exactly(dtype, m, k):
    # Integer product and float32 epilogue in the reference's order: bit-identical results.
    n, bias = 40, (m + k) % 2 == 1
    w, wscale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01
    b = torch.randn(n).to(dtype) if bias else None
    x = _inputs(m, k, dtype)
    got = linear_w8a8_triton(x, w, wscale, b)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got, reference(x, w, wscale, b))


def test_bf16_and_leading_dims():
    w, wscale, b = torch.randint(-127, 128, (24, 64), dtype=torch.int8), torch.rand(24), torch.randn(24)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    got = linear_w8a8_triton(x, w, wscale, b.to(torch.bfloat16))
    expected = reference(x, w, wscale, b.to(torch.bfloat16))
    assert got.shape == (2, 3, 24) and got.dtype == torch.bfloat16
    # The interpreter's float32 -> bf16 store may differ from torch's by one bf16 ulp (2^-8).
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_registered_as_triton_lowering_and_checks_shapes():
    assert lowering_for("triton", "linear_w8a8") is linear_w8a8_triton
    with pytest.raises(ValueError, match="qweight has K=16 but x has K=8"):
        linear_w8a8_triton(torch.randn(2, 8), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), None)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    from fxforge.kernels._common import compile_for_hopper
    from fxforge.kernels.w8a8_gemm import quantize_rows_kernel, w8a8_gemm_kernel
    for dt in ("fp16", "bf16"):
        compile_for_hopper(
            quantize_rows_kernel,
            {"x_ptr": "*" + dt, "x8_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
             "stride_qm": "i32", "BLOCK_K": "constexpr"},
            {"BLOCK_K": 1024}, num_warps=4, num_stages=2,
        )
        gemm = compile_for_hopper(
            w8a8_gemm_kernel,
            {"x8_ptr": "*i8", "w_ptr": "*i8", "x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
             "bias_ptr": "*" + dt, "out_ptr": "*" + dt, "M": "i32", "N": "i32", "K": "i32",
             "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32", "HAS_BIAS": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2,
        )
        assert "wgmma" in gemm.asm["ptx"] and ".s8" in gemm.asm["ptx"], "int8 tensor-core MMA expected"
        print(dt, "ok")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["fp16", "ok", "bf16", "ok"]
