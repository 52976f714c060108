"""Triton lora_linear kernel: matches the op's reference under the interpreter; compiles for Hopper."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fxforge.ir.ops import lowering_for
from fxforge.kernels.lora_linear import lora_linear_triton

REFERENCE = torch.ops.fxforge.lora_linear.default


@pytest.mark.parametrize("m,k,n,rank,bias", [(5, 40, 24, 3, True), (33, 64, 48, 8, False), (1, 16, 16, 20, True)])
def test_matches_reference_float32(m, k, n, rank, bias):
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g)
    w, a, b = torch.randn(n, k, generator=g), torch.randn(rank, k, generator=g), torch.randn(n, rank, generator=g)
    bias_t = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(lora_linear_triton(x, w, bias_t, a, b, 0.5), REFERENCE(x, w, bias_t, a, b, 0.5),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_and_leading_dims(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, generator=g).to(dtype)
    w, a, b = (torch.randn(s, generator=g).mul(0.2).to(dtype) for s in [(16, 32), (4, 32), (16, 4)])
    bias = torch.randn(16, generator=g).to(dtype)
    got = lora_linear_triton(x, w, bias, a, b, 2.0)
    ref = REFERENCE(x.float(), w.float(), bias.float(), a.float(), b.float(), 2.0)
    assert got.shape == (2, 3, 16) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_registered_and_checks_shapes():
    assert lowering_for("triton", "lora_linear") is lora_linear_triton
    with pytest.raises(ValueError, match=r"B must be \(16, 4\)"):
        lora_linear_triton(torch.randn(2, 32), torch.randn(16, 32), None, torch.randn(4, 32), torch.randn(16, 5), 1.0)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    from fxforge.kernels._common import compile_for_hopper
    from fxforge.kernels.lora_linear import lora_linear_kernel
    for dt, dot in (("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32")):
        import triton.language as tl
        kernel = compile_for_hopper(
            lora_linear_kernel,
            {"x_ptr": "*" + dt, "w_ptr": "*" + dt, "bias_ptr": "*" + dt, "a_ptr": "*" + dt, "b_ptr": "*" + dt,
             "out_ptr": "*" + dt, "scale": "fp32", "M": "i32", "N": "i32", "K": "i32", "RANK": "i32",
             "stride_xm": "i32", "stride_wn": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_om": "i32",
             "HAS_BIAS": "constexpr", "DOT_DTYPE": "constexpr", "R": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            {"HAS_BIAS": True, "DOT_DTYPE": getattr(tl, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dot]),
             "R": 16, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3,
        )
        assert "wgmma" in kernel.asm["ptx"] or "mma" in kernel.asm["ptx"], "tensor-core MMA expected"
        print(dt, "ok")
    """
)


@pytest.mark.slow
def test_kernel_compiles_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["fp16", "ok", "bf16", "ok", "fp32", "ok"]


def test_triton_backend_runs_an_adapted_graph():
    from fxforge.backends.triton import prepare
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.passes.adapters.add_adapters import AddAdapters
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import run_pass

    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).eval()
    x = torch.randn(6, 32)
    gm = trace(model, (x,))
    canonicalize(gm)
    adapted = run_pass(AddAdapters(rank=4), gm, PassContext(example_inputs=(x,)))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    lowered = prepare(adapted, (x,))
    assert sum(n.target is lora_linear_triton for n in lowered.graph.nodes) == 2
    with torch.no_grad():
        torch.testing.assert_close(lowered(x)[0], adapted(x)[0], atol=1e-4, rtol=1e-4)
