"""Flash-attention and split-KV decode kernels (TRITON_INTERPRET=1) against fxforge::attention's
reference, plus compile checks of both for Hopper (sm_90)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fxforge.ir.ops  # noqa: F401  (registers fxforge::attention)
from fxforge.ir.ops import lowering_for
from fxforge.kernels.decode_attention import decode_attention
from fxforge.kernels.flash_attention import attention_triton

reference = torch.ops.fxforge.attention
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(b, hq, hkv, lq, lk, d, dtype, mask_kind=None):
    q = torch.randn(b, hq, lq, d).to(dtype)
    k = torch.randn(b, hkv, lk, d).to(dtype)
    v = torch.randn(b, hkv, lk, d).to(dtype)
    if mask_kind == "bool":  # per-batch mask broadcast over heads; key 0 always visible
        mask = torch.rand(b, 1, lq, lk) > 0.4
        mask[..., 0] = True
    elif mask_kind == "additive":  # per-head bias broadcast over batch, with some -inf
        mask = torch.randn(1, hq, lq, lk).masked_fill(torch.rand(1, hq, lq, lk) < 0.2, float("-inf")).to(dtype)
        mask[..., 0] = 0.0
    else:
        mask = None
    return q, k, v, mask


def check_against_reference(q, k, v, mask, is_causal, groups, scale=None, out=None):
    if out is None:
        out = attention_triton(q, k, v, mask, is_causal, scale, groups)
    # The reference in float32 is the truth for every input dtype.
    expected = reference(q.float(), k.float(), v.float(), None if mask is None else mask if mask.dtype == torch.bool
                         else mask.float(), is_causal, scale, groups)
    assert out.dtype == q.dtype and out.shape == expected.shape
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_forward_matches_reference(dtype, is_causal, mask_kind):
    # Length 37 is no multiple of any block; GQA with 4 query heads on 2 kv heads.
    q, k, v, mask = make_inputs(1, 4, 2, 37, 37, 64, dtype, mask_kind)
    check_against_reference(q, k, v, mask, is_causal, 2)


def test_causal_spanning_many_blocks():
    # 100 queries span two BLOCK_M=64 tiles and 4 BLOCK_N=32 key blocks: the second tile runs
    # fully-visible blocks without the triangle test and the diagonal with it.
    q, k, v, _ = make_inputs(1, 2, 2, 100, 100, 32, torch.float32)
    check_against_reference(q, k, v, None, True, 1, scale=0.2)


@pytest.mark.parametrize("lq, lk", [(20, 90), (70, 40)])
def test_causal_rectangular_is_bottom_right(lq, lk):
    # Lq < Lk: chunked prefill against a cache; Lq > Lk: the first Lq - Lk rows see nothing.
    q, k, v, _ = make_inputs(1, 2, 1, lq, lk, 16, torch.float32)
    out = attention_triton(q, k, v, None, True, None, 2)
    check_against_reference(q, k, v, None, True, 2, out=out)
    if lq > lk:
        assert torch.equal(out[:, :, : lq - lk], torch.zeros_like(out[:, :, : lq - lk]))


def test_head_dim_128_bf16_and_non_power_of_two_dims():
    q, k, v, _ = make_inputs(1, 2, 2, 33, 33, 128, torch.bfloat16)
    check_against_reference(q, k, v, None, True, 1)
    # head dim 40 (padded to 64 in the kernel) and a value dim different from the key dim
    q, k, _, _ = make_inputs(1, 2, 2, 19, 23, 40, torch.float32)
    v = torch.randn(1, 2, 23, 24)
    check_against_reference(q, k, v, None, False, 1)


def test_non_contiguous_inputs():
    # q/k/v as views of a (B, L, H, D) projection, as models produce them: strides, not copies.
    qkv = torch.randn(1, 29, 3, 2, 32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, None, True, 1)


def test_fully_masked_rows_are_zero():
    q, k, v, _ = make_inputs(1, 2, 2, 9, 12, 16, torch.float32)
    mask = torch.ones(9, 12, dtype=torch.bool)
    mask[3] = False
    out = attention_triton(q, k, v, mask, False, None, 1)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    check_against_reference(q, k, v, mask, False, 1, out=out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_decode_matches_reference(dtype, mask_kind):
    q, k, v, mask = make_inputs(1, 4, 2, 1, 300, 64, dtype, mask_kind)
    check_against_reference(q, k, v, mask, True, 2)


@pytest.mark.parametrize("num_splits", [1, 3, 5])
def test_decode_split_counts_agree(num_splits):
    # 5 splits of one 64-key block each (the last one ragged); 1 split = no combining at all.
    q, k, v, _ = make_inputs(2, 2, 2, 1, 290, 64, torch.float32)
    out = decode_attention(q, k, v, None, None, 1, num_splits=num_splits)
    check_against_reference(q, k, v, None, False, 1, out=out)


def test_decode_chunk_with_every_key_masked():
    # The second 64-key chunk is fully masked: its m = -inf and l = 0 must drop out of the combine.
    q, k, v, _ = make_inputs(1, 2, 2, 1, 192, 32, torch.float32)
    mask = torch.ones(1, 1, 1, 192, dtype=torch.bool)
    mask[..., 64:128] = False
    out = decode_attention(q, k, v, mask, None, 1, num_splits=3)
    assert torch.isfinite(out).all()
    check_against_reference(q, k, v, mask, False, 1, out=out)


def test_registered_as_triton_lowering():
    assert lowering_for("triton", "attention") is attention_triton


def test_launcher_validates_inputs():
    q, k, v, _ = make_inputs(1, 4, 2, 5, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="num_kv_groups"):
        attention_triton(q, k, v, None, False, None, 1)
    with pytest.raises(ValueError, match="one dtype"):
        attention_triton(q, k.half(), v, None, False, None, 2)


# --- Hopper compile checks: dot shapes and dtypes the interpreter does not enforce ---------
#
# They run in one separate process with TRITON_INTERPRET=0. In this process triton was imported
# under the interpreter: its own jit library functions (tl.zeros, tl.max, tl.sum) are then
# InterpretedFunctions that the GPU compiler cannot inline, and interpreted kernels that call
# jit helpers leave triton.language.core patched, so compile_for_hopper fails here for any
# kernel that reduces, whatever the kernel is.

def _strides(prefix, dims):
    return {f"stride_{prefix}{d}": "i32" for d in dims}


def _forward_case(dtype, head_dim, is_causal, mask_kind):
    signature = {
        "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Mask": "*u8" if mask_kind == 2 else f"*{dtype}",
        "Out": f"*{dtype}",
        **_strides("q", "bhmd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"),
        **_strides("m", "bhmn"), **_strides("o", "bhmd"),
        "num_heads": "i32", "num_kv_groups": "i32", "Lq": "i32", "Lk": "i32", "seq_bucket": "i32",
        "qk_scale_log2": "fp32",
    }
    constexprs = {
        "HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
        "IS_CAUSAL": is_causal, "MASK_KIND": mask_kind, "UPCAST": False, "PRECISION": "tf32",
        "BLOCK_M": 128, "BLOCK_N": 64,
    }
    signature.update({name: "constexpr" for name in constexprs})
    return ["fxforge.kernels.flash_attention", "flash_attention_fwd_kernel", signature, constexprs, 8, 3]


def _decode_split_case(dtype, head_dim):
    signature = {
        "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Mask": f"*{dtype}",
        "PartAcc": "*fp32", "PartM": "*fp32", "PartL": "*fp32",
        **_strides("q", "bhd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"), **_strides("m", "bhn"),
        "num_kv_heads": "i32", "num_kv_groups": "i32", "num_splits": "i32", "Lk": "i32",
        "keys_per_split": "i32", "qk_scale_log2": "fp32",
    }
    constexprs = {
        "HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
        "BLOCK_G": 16, "BLOCK_N": 64, "MASK_KIND": 1, "UPCAST": False, "PRECISION": "tf32",
    }
    signature.update({name: "constexpr" for name in constexprs})
    return ["fxforge.kernels.decode_attention", "decode_split_kernel", signature, constexprs, 4, 2]


def _decode_combine_case(dtype, head_dim):
    signature = {
        "PartAcc": "*fp32", "PartM": "*fp32", "PartL": "*fp32", "Out": f"*{dtype}",
        **_strides("o", "bhd"), "num_heads": "i32", "num_splits": "i32",
    }
    constexprs = {"HEAD_DIM_V": head_dim, "BLOCK_DV": head_dim, "BLOCK_S": 32}
    signature.update({name: "constexpr" for name in constexprs})
    return ["fxforge.kernels.decode_attention", "decode_combine_kernel", signature, constexprs, 4, 1]


# Each compile takes several seconds on 2 cores, so the cases pair variants up: both dtypes,
# both head dims, causal without a mask and each mask kind without causal.
HOPPER_CASES = {
    "forward-fp16-d64-causal": _forward_case("fp16", 64, True, 0),
    "forward-bf16-d128-boolmask": _forward_case("bf16", 128, False, 2),
    "forward-fp16-d128-additive": _forward_case("fp16", 128, False, 1),
    "decode-split-fp16-d64": _decode_split_case("fp16", 64),
    "decode-split-bf16-d128": _decode_split_case("bf16", 128),
    "decode-combine-fp16-d64": _decode_combine_case("fp16", 64),
    "decode-combine-bf16-d128": _decode_combine_case("bf16", 128),
}

_COMPILE_SCRIPT = """
import importlib, json, sys
from fxforge.kernels._common import compile_for_hopper
results = {}
for name, (module, attr, signature, constexprs, warps, stages) in json.load(sys.stdin).items():
    kernel = getattr(importlib.import_module(module), attr)
    try:
        compiled = compile_for_hopper(kernel, signature, constexprs, num_warps=warps, num_stages=stages)
        results[name] = {"ok": True, "tensor_cores": "mma" in compiled.asm["ptx"]}
    except Exception as error:
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hopper_builds():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(HOPPER_CASES), env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~40 s for all seven compiles together, on a cold triton cache
@pytest.mark.parametrize("case", sorted(HOPPER_CASES))
def test_kernels_compile_for_hopper(hopper_builds, case):
    result = hopper_builds[case]
    assert result["ok"], result.get("error")
    if not case.startswith("decode-combine"):
        assert result["tensor_cores"], "the GEMMs did not lower to mma/wgmma"
