"""Triton linear_wq kernels (GEMM for M > 1, split-K GEMV for M == 1) against the op's reference.

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


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton.language as tl
    from fxforge.kernels._common import compile_for_hopper
    from fxforge.kernels.wq_gemm import wq_gemm_kernel, wq_gemv_kernel
    for dt, dot in (("fp16", tl.float16), ("bf16", tl.bfloat16)):
        common = {"x_ptr": "*" + dt, "qweight_ptr": "*u8", "scales_ptr": "*" + dt, "zeros_ptr": "*u8",
                  "bias_ptr": "*" + dt}
        gemm = compile_for_hopper(
            wq_gemm_kernel,
            {**common, "out_ptr": "*" + dt, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
             "stride_qn": "i32", "stride_gn": "i32", "stride_om": "i32", "BITS": "constexpr",
             "GROUP_SIZE": "constexpr", "HAS_BIAS": "constexpr", "DOT_DTYPE": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"BITS": 4, "GROUP_SIZE": 128, "HAS_BIAS": True, "DOT_DTYPE": dot,
             "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
            num_warps=4, num_stages=2,
        )
        assert "wgmma" in gemm.asm["ptx"], "the GEMM should use Hopper tensor cores"
        gemv = compile_for_hopper(
            wq_gemv_kernel,
            {**common, "out_ptr": "*fp32", "N": "i32", "K": "i32", "stride_qn": "i32", "stride_gn": "i32",
             "BITS": "constexpr", "GROUP_SIZE": "constexpr", "HAS_BIAS": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SPLIT_K": "constexpr"},
            {"BITS": 8 if dt == "fp16" else 2, "GROUP_SIZE": 48, "HAS_BIAS": True,
             "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 4},
            num_warps=4, num_stages=2,
        )
        assert "atom" in gemv.asm["ptx"], "split-K partial sums are combined with atomics"
        print(dt, "ok")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["fp16", "ok", "bf16", "ok"]
