"""Triton LUT kernel for fxforge::shift_add_linear against the op's reference, and its Hopper compile.

Runs under TRITON_INTERPRET=1 (tests/conftest.py). The Hopper compile check runs in a fresh
interpreter-free subprocess: under TRITON_INTERPRET=1 triton's own @jit library functions
(tl.sum, ...) are interpreted objects the GPU compiler cannot take.
"""
import textwrap

import pytest
import torch

from fxforge.ir.ops import lowering_for
from fxforge.ir.ops.shift_add_linear import pack_signs, round_to_apot
from fxforge.kernels._common import run_outside_interpreter
from fxforge.kernels.shift_add_lut import block_k_for, shift_add_linear_triton

reference = torch.ops.fxforge.shift_add_linear


def _operands(n, k, q, group_size, terms=3, bias=True, dtype=torch.float32):
    planes = (torch.randint(0, 2, (q, n, k)) * 2 - 1).to(torch.int8)
    # scales of mixed sign and magnitude, including an all-zero α (every term unused)
    alpha = torch.randn(n, k // group_size, q) * 0.1
    alpha[0, 0, 0] = 0.0
    exps, signs = round_to_apot(alpha, terms)
    return pack_signs(planes), exps, signs, (torch.randn(n).to(dtype) if bias else None)


# K=72 leaves padding bits in the last word and g=24 gives 8-wide K blocks; K=128, g=64 spans
# two K blocks per group; g=K is one group per row. m=1 is the GEMV, 3 one small-batch tile,
# 11 two tiles with a tail. Both ways of applying the powers of two are covered.
CASES = [(72, 24, 1, True), (128, 64, 11, True), (64, 64, 3, True), (72, 24, 11, False), (128, 64, 1, False)]


@pytest.mark.parametrize("k,group_size,m,exponent_add", CASES)
def test_matches_reference(k, group_size, m, exponent_add):
    packed, exps, signs, bias = _operands(40, k, 3, group_size, bias=m != 3)
    x = torch.randn(m, k)
    got = shift_add_linear_triton(x, packed, exps, signs, bias, group_size, exponent_add=exponent_add)
    expected = reference(x, packed, exps, signs, bias, group_size)
    assert got.shape == (m, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("q,terms", [(1, 1), (4, 2)])
def test_plane_and_term_counts(q, terms):
    packed, exps, signs, bias = _operands(24, 64, q, 32, terms=terms)
    x = torch.randn(2, 5, 64)
    got = shift_add_linear_triton(x, packed, exps, signs, bias, 32)
    expected = reference(x, packed, exps, signs, bias, 32)
    assert got.shape == (2, 5, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    packed, exps, signs, bias = _operands(24, 64, 2, 32, dtype=dtype)
    x = torch.randn(3, 64).to(dtype)
    got = shift_add_linear_triton(x, packed, exps, signs, bias, 32)
    expected = reference(x, packed, exps, signs, bias, 32)
    assert got.dtype == dtype
    # both accumulate in float32; the only difference is the final rounding to 16 bits
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype] * expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tol)


def test_exponent_add_flushes_underflow_to_zero():
    # α = 2^-126 times activations well below 1 underflows float32's normal range
    packed, exps, signs, _ = _operands(8, 32, 1, 32, terms=1)
    exps.fill_(-126)
    signs.fill_(1)
    x = torch.full((1, 32), 1e-3)
    got = shift_add_linear_triton(x, packed, exps, signs, None, 32)
    assert torch.isfinite(got).all() and got.abs().max() < 1e-38


def test_registered_as_triton_lowering_and_checks_shapes():
    assert lowering_for("triton", "shift_add_linear") is shift_add_linear_triton
    packed, exps, signs, _ = _operands(8, 64, 2, 32)
    with pytest.raises(ValueError, match="int32 words per row"):
        shift_add_linear_triton(torch.randn(2, 128), packed, exps, signs, None, 32)


def test_block_k_divides_group():
    assert [block_k_for(g) for g in (8, 24, 32, 96, 128)] == [8, 8, 32, 32, 64]


_COMPILE_SCRIPT = textwrap.dedent(
    """
    from fxforge.kernels._common import compile_for_hopper
    from fxforge.kernels.shift_add_lut import shift_add_lut_kernel
    signature = {"x_ptr": "*fp16", "packed_ptr": "*i32", "exps_ptr": "*i8", "signs_ptr": "*i8", "bias_ptr": "*fp16",
                 "out_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32",
                 "Q": "constexpr", "TERMS": "constexpr", "GROUP_SIZE": "constexpr", "HAS_BIAS": "constexpr",
                 "EXPONENT_ADD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    for block_m, exponent_add in ((1, True), (8, False)):
        compiled = compile_for_hopper(
            shift_add_lut_kernel, signature,
            {"Q": 3, "TERMS": 3, "GROUP_SIZE": 128, "HAS_BIAS": True, "EXPONENT_ADD": exponent_add,
             "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64},
            num_warps=4, num_stages=2,
        )
        ptx = compiled.asm["ptx"]
        assert "sm_90" in ptx
        print(block_m, "ok")
    """
)


@pytest.mark.slow
def test_kernel_compiles_for_hopper():
    assert run_outside_interpreter(_COMPILE_SCRIPT, timeout=300).split() == ["1", "ok", "8", "ok"]


def test_triton_backend_runs_a_shift_add_model():
    import fxforge
    from fxforge.models import get_model

    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, passes="shift_add(bits=2,group_size=-1,iters=1)",
                               backend="triton")
    eager = compiled.graph_module
    args, kwargs = zoo.make_inputs(batch=1)  # the GEMV path
    from fxforge.ir.trace import flatten_inputs
    from fxforge.ir.verify import run_graph

    flat = flatten_inputs(eager, args, kwargs)
    torch.testing.assert_close(compiled.run_flat(*flat)[0], run_graph(eager, flat)[0], rtol=1e-4, atol=1e-5)
