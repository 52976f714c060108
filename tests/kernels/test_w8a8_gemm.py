"""Triton linear_w8a8 kernels (per-token / per-tensor quantization + int8 GEMM) against the op's reference.

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
from fxforge.ir.ops.linear_w8a8 import quantize_per_tensor, quantize_per_token
from fxforge.kernels.w8a8_gemm import linear_w8a8_triton
from fxforge.kernels import w8a8_quantize
from fxforge.kernels.w8a8_quantize import quantize_per_tensor_triton, quantize_per_token_triton

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


@pytest.mark.parametrize("split", [None, (1024, 1024), (1024, 4)])
@pytest.mark.parametrize("shift", [0.0, 0.3, -5.0])
def test_per_tensor_quantization_is_bit_identical_to_reference(shift, split, monkeypatch):
    # split: (MIN_CHUNK, MAX_RANGES) for the two-launch path (partial ranges, then quantize);
    # None keeps the single-program path this size takes by default.
    if split is not None:
        monkeypatch.setattr(w8a8_quantize, "SINGLE_PROGRAM_MAX_NUMEL", 1000)
        monkeypatch.setattr(w8a8_quantize, "MIN_CHUNK", split[0])
        monkeypatch.setattr(w8a8_quantize, "MAX_RANGES", split[1])
    # Shifted inputs move the zero point; the grid values land on .5 ties after the division.
    x = _inputs(5, 1500, torch.float32) + shift
    x[1, :64] = torch.round(x[1, :64] * 8) / 8
    a8, scale, zero_point = quantize_per_tensor_triton(x)
    q, ref_scale, ref_zp = quantize_per_tensor(x)
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zp)
    assert a8.dtype == torch.int8 and torch.equal(a8.to(torch.int32) + 128, q.to(torch.int32))


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 33])  # fused GEMV, small-M GEMM, GEMM
@pytest.mark.parametrize("k", [80, 96])
def test_matches_reference_exactly(dtype, m, k, act_scale):
    # Integer product and float32 epilogue in the reference's order: bit-identical results.
    n, bias = 40, (m + k) % 2 == 1
    w, wscale = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01
    w[0] = 127  # Σ_k W8 large: the per-tensor zero-point correction matters
    b = torch.randn(n).to(dtype) if bias else None
    x = _inputs(m, k, dtype) + (0.7 if m % 2 else 0.0)  # off-centre: zero point far from 128
    got = linear_w8a8_triton(x, w, wscale, b, act_scale)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got, reference(x, w, wscale, b, act_scale))


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
def test_bf16_and_leading_dims(act_scale):
    w, wscale, b = torch.randint(-127, 128, (24, 64), dtype=torch.int8), torch.rand(24), torch.randn(24)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    got = linear_w8a8_triton(x, w, wscale, b.to(torch.bfloat16), act_scale)
    expected = reference(x, w, wscale, b.to(torch.bfloat16), act_scale)
    assert got.shape == (2, 3, 24) and got.dtype == torch.bfloat16
    # The interpreter's float32 -> bf16 store may differ from torch's by one bf16 ulp (2^-8).
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_registered_as_triton_lowering_and_checks_shapes():
    assert lowering_for("triton", "linear_w8a8") is linear_w8a8_triton
    with pytest.raises(ValueError, match="qweight has K=16 but x has K=8"):
        linear_w8a8_triton(torch.randn(2, 8), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(ValueError, match="act_scale must be one of"):
        linear_w8a8_triton(torch.randn(2, 16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), None, "row")
    empty = linear_w8a8_triton(torch.zeros(0, 16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), None)
    assert empty.shape == (0, 4)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    from fxforge.kernels._common import compile_for_hopper
    from fxforge.kernels.w8a8_gemm import w8a8_gemm_kernel, w8a8_gemv_kernel
    from fxforge.kernels.w8a8_quantize import quantize_rows_kernel, quantize_tensor_kernel, tensor_range_kernel
    for dt in ("fp16", "bf16"):
        compile_for_hopper(
            quantize_rows_kernel,
            {"x_ptr": "*" + dt, "x8_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
             "stride_qm": "i32", "BLOCK_K": "constexpr"},
            {"BLOCK_K": 1024}, num_warps=4, num_stages=2,
        )
        compile_for_hopper(
            tensor_range_kernel,
            {"x_ptr": "*" + dt, "lo_ptr": "*fp32", "hi_ptr": "*fp32", "numel": "i32", "per_program": "i32",
             "BLOCK": "constexpr"},
            {"BLOCK": 1024}, num_warps=4, num_stages=2,
        )
        for fused in (True, False):
            compile_for_hopper(
                quantize_tensor_kernel,
                {"x_ptr": "*" + dt, "a8_ptr": "*i8", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "scale_ptr": "*fp32",
                 "zp_ptr": "*fp32", "numel": "i32", "num_ranges": "i32", "per_program": "i32",
                 "FUSED_RANGE": "constexpr", "BLOCK": "constexpr", "BLOCK_R": "constexpr"},
                {"FUSED_RANGE": fused, "BLOCK": 1024, "BLOCK_R": 64}, num_warps=4, num_stages=2,
            )
        for per_token in (True, False):
            gemm = compile_for_hopper(
                w8a8_gemm_kernel,
                {"x8_ptr": "*i8", "w_ptr": "*i8", "x_scale_ptr": "*fp32", "x_zp_ptr": "*fp32",
                 "w_scale_ptr": "*fp32", "bias_ptr": "*" + dt, "out_ptr": "*" + dt, "M": "i32", "N": "i32",
                 "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
                 "PER_TOKEN": "constexpr", "HAS_BIAS": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                {"PER_TOKEN": per_token, "HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
                num_warps=4, num_stages=2,
            )
            assert "wgmma" in gemm.asm["ptx"] and ".s8" in gemm.asm["ptx"], "int8 tensor-core MMA expected"
            gemv = compile_for_hopper(
                w8a8_gemv_kernel,
                {"x_ptr": "*" + dt, "w_ptr": "*i8", "w_scale_ptr": "*fp32", "bias_ptr": "*" + dt,
                 "out_ptr": "*" + dt, "N": "i32", "K": "i32", "stride_wn": "i32", "PER_TOKEN": "constexpr",
                 "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "STAGES": "constexpr"},
                {"PER_TOKEN": per_token, "HAS_BIAS": True, "BLOCK_N": 8, "BLOCK_K": 512, "STAGES": 3},
                num_warps=4, num_stages=3,
            )
            assert "div.rn.f32" in gemv.asm["ptx"], "the IEEE divide the reference rounds with"
        print(dt, "ok")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["fp16", "ok", "bf16", "ok"]
