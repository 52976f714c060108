"""Triton linear_wq kernels (small-M GEMV configs for M <= SMALL_M, GEMM configs above) against the op's reference.

Runs under TRITON_INTERPRET=1 (tests/conftest.py). The Hopper compile check runs in a fresh
interpreter-free subprocess: under TRITON_INTERPRET=1 triton's own @jit library functions
(tl.sum, tl.cdiv) are interpreted objects the GPU compiler cannot take.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fxforge.ir.ops.linear_wq import pack_bits
from fxforge.kernels import wq_gemm
from fxforge.kernels.wq_gemm import linear_wq_triton
from fxforge.ir.ops import lowering_for

reference = torch.ops.fxforge.linear_wq


def _operands(n, k, bits, group_size, dtype, bias):
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, k // group_size), dtype=torch.uint8)
    return pack_bits(q, bits), scales, zeros, (torch.randn(n).to(dtype) if bias else None)


def _tolerance(dtype):
    # fp16: the dequantized weight is rounded to fp16 for tl.dot (2^-11 relative).
    # bf16: results are stored as bf16 (one ulp = 2^-8 relative).
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


# (bits, group_size, K): group 32 divides the 32-wide K tile (one scale per tile); 48 and 16
# do not (scales gathered per element); K=80 and 96 leave a masked K tail in some tile.
SHAPES = [(4, 32, 96), (8, 48, 96), (2, 16, 80)]


@pytest.mark.parametrize("bits,group_size,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_matches_reference(bits, group_size, k, dtype, m):
    bias = m != 3  # both with and without bias, across the GEMV and GEMM paths
    qweight, scales, zeros, b = _operands(40, k, bits, group_size, dtype, bias)
    x = torch.randn(m, k).to(dtype)
    got = linear_wq_triton(x, qweight, scales, zeros, b, bits, group_size)
    expected = reference(x, qweight, scales, zeros, b, bits, group_size)
    assert got.dtype == dtype and got.shape == (m, 40)
    tol = _tolerance(dtype) * expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 3, 64)])
def test_bf16_and_leading_dims(shape):
    qweight, scales, zeros, b = _operands(24, 64, 4, 32, torch.bfloat16, True)
    x = torch.randn(shape).to(torch.bfloat16)
    got = linear_wq_triton(x, qweight, scales, zeros, b, 4, 32)
    expected = reference(x, qweight, scales, zeros, b, 4, 32)
    assert got.shape == (*shape[:-1], 24) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=1e-2 * expected.float().abs().max().item())


def test_registered_as_triton_lowering_and_checks_shapes():
    assert lowering_for("triton", "linear_wq") is linear_wq_triton
    qweight, scales, zeros, _ = _operands(8, 64, 4, 32, torch.float32, False)
    with pytest.raises(ValueError, match="bits argument does not match"):
        linear_wq_triton(torch.randn(2, 64), qweight, scales, zeros, None, 8, 32)


# The small-M path (M <= SMALL_M): (bits, group_size, K, N). Group 32 divides the interpreter's
# 32-wide K tile (scale applied after the dot); 16, 48 and 9 do not (scales gathered per
# element), and K = 80, 112 and 18 leave a masked K tail. Rows of 18 bytes (K=36 at 4 bits,
# K=18 at 8 bits) are not whole int32 words, so the weight is read byte by byte; odd N leaves
# a masked column block. Group 12 in int32 words (K=48) straddles words: M == 1 takes the
# tensor-core kernel there.
SMALL_M_SHAPES = [(4, 32, 128, 37), (4, 16, 80, 33), (2, 16, 112, 24), (8, 48, 96, 19), (4, 12, 36, 21), (8, 9, 18, 17),
                  (4, 12, 48, 21)]


@pytest.mark.parametrize("bits,group_size,k,n", SMALL_M_SHAPES)
@pytest.mark.parametrize("m,bias", [(1, True), (1, False), (3, False), (8, True)])
def test_small_m_path_matches_reference(bits, group_size, k, n, m, bias):
    qweight, scales, zeros, b = _operands(n, k, bits, group_size, torch.float16, bias)
    x = torch.randn(m, k).to(torch.float16)
    got = linear_wq_triton(x, qweight, scales, zeros, b, bits, group_size)
    expected = reference(x, qweight, scales, zeros, b, bits, group_size)
    assert got.dtype == torch.float16 and got.shape == (m, n)
    tol = _tolerance(torch.float16) * expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("m", [wq_gemm.SMALL_M, wq_gemm.SMALL_M + 1])
def test_small_m_boundary(m):
    qweight, scales, zeros, b = _operands(20, 64, 4, 32, torch.float32, True)
    x = torch.randn(m, 64)
    got = linear_wq_triton(x, qweight, scales, zeros, b, 4, 32)
    expected = reference(x, qweight, scales, zeros, b, 4, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_packed_weight_read_as_words_only_when_aligned():
    qweight, scales, zeros, _ = _operands(8, 64, 4, 32, torch.float32, False)
    units, unit_bits = wq_gemm._as_units(qweight)
    assert unit_bits == 32 and units.dtype == torch.int32 and units.shape == (8, 8)
    # A weight at an odd byte offset cannot be read as int32 words: bytes, same result.
    storage = torch.zeros(qweight.numel() + 1, dtype=torch.uint8)
    shifted = storage[1:].view(8, 32)
    shifted.copy_(qweight)
    assert wq_gemm._as_units(shifted)[1] == 8
    x = torch.randn(1, 64)
    torch.testing.assert_close(linear_wq_triton(x, shifted, scales, zeros, None, 4, 32),
                               reference(x, qweight, scales, zeros, None, 4, 32), rtol=0, atol=1e-4)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton.language as tl
    from fxforge.kernels._common import compile_for_hopper
    from fxforge.kernels.wq_gemm import (
        _GEMM_CONFIGS, _GEMV_CONFIGS, _SMALL_M_CONFIGS, wq_gemm_kernel, wq_gemv_kernel, wq_small_m_kernel,
    )

    def signature(dt, unit):
        sig = {"x_ptr": "*" + dt, "qweight_ptr": unit, "scales_ptr": "*" + dt, "zeros_ptr": "*u8", "bias_ptr": "*" + dt,
               "out_ptr": "*" + dt, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32",
               "stride_gn": "i32", "stride_om": "i32"}
        for name in ("BITS", "GROUP_SIZE", "HAS_BIAS", "DOT_DTYPE", "UNIT_BITS", "BLOCK_M", "BLOCK_N", "BLOCK_K"):
            sig[name] = "constexpr"
        return sig

    def gemv_signature(dt, unit):
        sig = {"x_ptr": "*" + dt, "qweight_ptr": unit, "scales_ptr": "*" + dt, "zeros_ptr": "*u8", "bias_ptr": "*" + dt,
               "out_ptr": "*" + dt, "N": "i32", "K": "i32", "K_UNITS": "i32", "stride_qn": "i32", "stride_gn": "i32"}
        for name in ("BITS", "GROUP_SIZE", "HAS_BIAS", "UNIT_BITS", "BLOCK_N", "BLOCK_K", "STAGES"):
            sig[name] = "constexpr"
        return sig

    # Every autotune config, as the benchmarks run them: fp16, int4 in int32 words, group 128.
    for c in _GEMV_CONFIGS:
        compiled = compile_for_hopper(
            wq_gemv_kernel, gemv_signature("fp16", "*i32"),
            {"BITS": 4, "GROUP_SIZE": 128, "HAS_BIAS": True, "UNIT_BITS": 32, **c.kwargs},
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
        assert "fma.rn.f32" in compiled.asm["ptx"], c.kwargs
        assert compiled.metadata.shared <= 232448, ("gemv", c.kwargs, compiled.metadata.shared)
    for kernel, configs, label in ((wq_small_m_kernel, _SMALL_M_CONFIGS, "small_m"), (wq_gemm_kernel, _GEMM_CONFIGS, "gemm")):
        for c in configs:
            compiled = compile_for_hopper(
                kernel, signature("fp16", "*i32"),
                {"BITS": 4, "GROUP_SIZE": 128, "HAS_BIAS": True, "DOT_DTYPE": tl.float16, "UNIT_BITS": 32, **c.kwargs},
                num_warps=c.num_warps, num_stages=c.num_stages,
            )
            ptx = compiled.asm["ptx"]
            assert "mma" in ptx, (label, c.kwargs)
            if c.kwargs["BLOCK_M"] >= 64:
                assert "wgmma" in ptx, f"{label} {c.kwargs}: BLOCK_M >= 64 should use Hopper wgmma"
            assert compiled.metadata.shared <= 232448, (label, c.kwargs, compiled.metadata.shared)
    print("configs", "ok")
    # bf16, the byte-unit path and per-element scales (group 48 does not divide BLOCK_K).
    for bits, unit, unit_bits in ((2, "*u8", 8), (8, "*i32", 32)):
        compile_for_hopper(
            wq_gemv_kernel, gemv_signature("bf16", unit),
            {"BITS": bits, "GROUP_SIZE": 48, "HAS_BIAS": True, "UNIT_BITS": unit_bits,
             "BLOCK_N": 16, "BLOCK_K": 64, "STAGES": 3},
            num_warps=4, num_stages=3,
        )
        compile_for_hopper(
            wq_small_m_kernel, signature("bf16", unit),
            {"BITS": bits, "GROUP_SIZE": 48, "HAS_BIAS": True, "DOT_DTYPE": tl.bfloat16, "UNIT_BITS": unit_bits,
             "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64},
            num_warps=4, num_stages=3,
        )
    print("bf16", "ok")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["configs", "ok", "bf16", "ok"]
