"""Compile every autotune config of fxforge's GPU kernels for an H100 (sm_90), without a GPU.

The tests compile one config per kernel (tests/kernels); the autotuner on a GPU tries all of
them, and a config that does not compile, or needs more shared memory than an H100 block may
have (227 KiB), is skipped there at a cost. This checks each config as bench/gpu_suite.py runs
it (fp16 activations) and prints, per config, whether it compiled, its shared memory and whether
the dots lowered to wgmma. Exit status 1 when any config fails or does not fit.

    python bench/hopper_configs.py          # CPU only; runs itself with TRITON_INTERPRET=0
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_MAX_SHARED = 232448  # bytes per block (227 KiB opt-in)

_CHILD = r"""
import json, sys, time
import triton
import triton.language as tl
from fxforge.kernels._common import compile_for_hopper
from fxforge.kernels import wq_gemm, w8a8_gemm, w8a8_quantize, lora_linear, flash_attention, decode_attention, shift_add_lut

def strides(prefix, dims):
    return {f"stride_{prefix}{d}": "i32" for d in dims}

cases = []  # (label, kernel, signature, constexprs, warps, stages)
wq_common = {"x_ptr": "*fp16", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8", "bias_ptr": "*fp16",
             "out_ptr": "*fp16"}
for c in wq_gemm._GEMV_CONFIGS:
    cases.append((f"wq_gemv {c.kwargs}", wq_gemm.wq_gemv_kernel,
                  {**wq_common, "N": "i32", "K": "i32", "K_UNITS": "i32", "stride_qn": "i32", "stride_gn": "i32",
                   "BITS": "constexpr", "GROUP_SIZE": "constexpr", "HAS_BIAS": "constexpr", "UNIT_BITS": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "STAGES": "constexpr"},
                  {"BITS": 4, "GROUP_SIZE": 128, "HAS_BIAS": False, "UNIT_BITS": 32, **c.kwargs},
                  c.num_warps, c.num_stages))
for label, kernel, configs in (("wq_small_m", wq_gemm.wq_small_m_kernel, wq_gemm._SMALL_M_CONFIGS),
                               ("wq_gemm", wq_gemm.wq_gemm_kernel, wq_gemm._GEMM_CONFIGS)):
    for c in configs:
        cases.append((f"{label} {c.kwargs}", kernel,
                      {**wq_common, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                       "stride_qn": "i32", "stride_gn": "i32", "stride_om": "i32", "BITS": "constexpr",
                       "GROUP_SIZE": "constexpr", "HAS_BIAS": "constexpr", "DOT_DTYPE": "constexpr",
                       "UNIT_BITS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                      {"BITS": 4, "GROUP_SIZE": 128, "HAS_BIAS": False, "DOT_DTYPE": tl.float16, "UNIT_BITS": 32,
                       **c.kwargs},
                      c.num_warps, c.num_stages))
w8a8_sig = {"x8_ptr": "*i8", "w_ptr": "*i8", "x_scale_ptr": "*fp32", "x_zp_ptr": "*fp32", "w_scale_ptr": "*fp32",
            "bias_ptr": "*fp16", "out_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32", "PER_TOKEN": "constexpr",
            "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
for label, configs in (("w8a8_small_m", w8a8_gemm._SMALL_M_CONFIGS), ("w8a8_gemm", w8a8_gemm._GEMM_CONFIGS)):
    for c in configs:
        cases.append((f"{label} {c.kwargs}", w8a8_gemm.w8a8_gemm_kernel, w8a8_sig,
                      {"PER_TOKEN": False, "HAS_BIAS": False, **c.kwargs}, c.num_warps, c.num_stages))
for c in w8a8_gemm._GEMV_CONFIGS:
    for per_token in (False, True):
        cases.append((f"w8a8_gemv per_token={per_token} {c.kwargs}", w8a8_gemm.w8a8_gemv_kernel,
                      {"x_ptr": "*fp16", "w_ptr": "*i8", "w_scale_ptr": "*fp32", "bias_ptr": "*fp16",
                       "out_ptr": "*fp16", "N": "i32", "K": "i32", "stride_wn": "i32", "PER_TOKEN": "constexpr",
                       "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                       "STAGES": "constexpr"},
                      {"PER_TOKEN": per_token, "HAS_BIAS": False, **c.kwargs}, c.num_warps, c.num_stages))
cases.append(("w8a8 quantize_rows BLOCK_K=1024", w8a8_quantize.quantize_rows_kernel,
              {"x_ptr": "*fp16", "x8_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
               "stride_qm": "i32", "BLOCK_K": "constexpr"}, {"BLOCK_K": 1024}, 4, 3))
cases.append(("w8a8 tensor_range BLOCK=1024", w8a8_quantize.tensor_range_kernel,
              {"x_ptr": "*fp16", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "numel": "i32", "per_program": "i32",
               "BLOCK": "constexpr"}, {"BLOCK": w8a8_quantize.TENSOR_BLOCK}, 4, 3))
for fused in (True, False):
    cases.append((f"w8a8 quantize_tensor FUSED_RANGE={fused}", w8a8_quantize.quantize_tensor_kernel,
                  {"x_ptr": "*fp16", "a8_ptr": "*i8", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "scale_ptr": "*fp32",
                   "zp_ptr": "*fp32", "numel": "i32", "num_ranges": "i32", "per_program": "i32",
                   "FUSED_RANGE": "constexpr", "BLOCK": "constexpr", "BLOCK_R": "constexpr"},
                  {"FUSED_RANGE": fused, "BLOCK": w8a8_quantize.TENSOR_BLOCK, "BLOCK_R": 1024}, 4, 3))
for c in lora_linear._CONFIGS:
    cases.append((f"lora_linear {c.kwargs}", lora_linear.lora_linear_kernel,
                  {"x_ptr": "*fp16", "w_ptr": "*fp16", "bias_ptr": "*fp16", "a_ptr": "*fp16", "b_ptr": "*fp16",
                   "out_ptr": "*fp16", "scale": "fp32", "M": "i32", "N": "i32", "K": "i32", "RANK": "i32",
                   "stride_xm": "i32", "stride_wn": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_om": "i32",
                   "HAS_BIAS": "constexpr", "DOT_DTYPE": "constexpr", "R": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                  {"HAS_BIAS": False, "DOT_DTYPE": tl.float16, "R": 16, **c.kwargs}, c.num_warps, c.num_stages))
for head_dim in (64, 128):
    for c in flash_attention._FORWARD_CONFIGS:
        sig = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Mask": "*fp16", "Out": "*fp16",
               **strides("q", "bhmd"), **strides("k", "bhnd"), **strides("v", "bhnd"), **strides("m", "bhmn"),
               **strides("o", "bhmd"), "num_heads": "i32", "num_kv_groups": "i32", "Lq": "i32", "Lk": "i32",
               "seq_bucket": "i32", "qk_scale_log2": "fp32"}
        const = {"HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
                 "IS_CAUSAL": True, "MASK_KIND": 0, "UPCAST": False, "PRECISION": "tf32", **c.kwargs}
        sig.update({k: "constexpr" for k in const})
        cases.append((f"flash_fwd d={head_dim} {c.kwargs}", flash_attention.flash_attention_fwd_kernel, sig, const,
                      c.num_warps, c.num_stages))
    for c in decode_attention._SPLIT_CONFIGS:
        sig = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Mask": "*fp16", "PartAcc": "*fp32", "PartM": "*fp32",
               "PartL": "*fp32", **strides("q", "bhd"), **strides("k", "bhnd"), **strides("v", "bhnd"),
               **strides("m", "bhn"), "num_kv_heads": "i32", "num_kv_groups": "i32", "num_splits": "i32",
               "Lk": "i32", "keys_per_split": "i32", "qk_scale_log2": "fp32"}
        const = {"HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_D": head_dim, "BLOCK_DV": head_dim,
                 "BLOCK_G": 16, "BLOCK_N": decode_attention.DECODE_BLOCK_N, "MASK_KIND": 0, "UPCAST": False,
                 "PRECISION": "tf32"}
        sig.update({k: "constexpr" for k in const})
        cases.append((f"decode_split d={head_dim} warps={c.num_warps} stages={c.num_stages}",
                      decode_attention.decode_split_kernel, sig, const, c.num_warps, c.num_stages))
# The Medusa section's triton backend: code-lm tiny in float32, head dim 16, a bool tree mask.
for c in flash_attention._FORWARD_CONFIGS:
    sig = {"Q": "*fp32", "K": "*fp32", "V": "*fp32", "Mask": "*u8", "Out": "*fp32",
           **strides("q", "bhmd"), **strides("k", "bhnd"), **strides("v", "bhnd"), **strides("m", "bhmn"),
           **strides("o", "bhmd"), "num_heads": "i32", "num_kv_groups": "i32", "Lq": "i32", "Lk": "i32",
           "seq_bucket": "i32", "qk_scale_log2": "fp32"}
    const = {"HEAD_DIM": 16, "HEAD_DIM_V": 16, "BLOCK_D": 16, "BLOCK_DV": 16, "IS_CAUSAL": False, "MASK_KIND": 2,
             "UPCAST": False, "PRECISION": "ieee", **c.kwargs}
    sig.update({k: "constexpr" for k in const})
    cases.append((f"flash_fwd fp32 d=16 boolmask {c.kwargs}", flash_attention.flash_attention_fwd_kernel, sig,
                  const, c.num_warps, c.num_stages))
for c in decode_attention._SPLIT_CONFIGS:
    sig = {"Q": "*fp32", "K": "*fp32", "V": "*fp32", "Mask": "*u8", "PartAcc": "*fp32", "PartM": "*fp32",
           "PartL": "*fp32", **strides("q", "bhd"), **strides("k", "bhnd"), **strides("v", "bhnd"),
           **strides("m", "bhn"), "num_kv_heads": "i32", "num_kv_groups": "i32", "num_splits": "i32",
           "Lk": "i32", "keys_per_split": "i32", "qk_scale_log2": "fp32"}
    const = {"HEAD_DIM": 16, "HEAD_DIM_V": 16, "BLOCK_D": 16, "BLOCK_DV": 16, "BLOCK_G": 16,
             "BLOCK_N": decode_attention.DECODE_BLOCK_N, "MASK_KIND": 2, "UPCAST": False, "PRECISION": "ieee"}
    sig.update({k: "constexpr" for k in const})
    cases.append((f"decode_split fp32 d=16 boolmask warps={c.num_warps} stages={c.num_stages}",
                  decode_attention.decode_split_kernel, sig, const, c.num_warps, c.num_stages))
for dt, d in (("fp16", 128), ("fp32", 16)):
    const = {"HEAD_DIM_V": d, "BLOCK_DV": d, "BLOCK_S": 64}
    sig = {"PartAcc": "*fp32", "PartM": "*fp32", "PartL": "*fp32", "Out": f"*{dt}", **strides("o", "bhd"),
           "num_heads": "i32", "num_splits": "i32", **{k: "constexpr" for k in const}}
    cases.append((f"decode_combine {dt} d={d}", decode_attention.decode_combine_kernel, sig, const, 4, 1))
for block_m in (1, 8):
    const = {"Q": 3, "TERMS": 3, "GROUP_SIZE": 128, "HAS_BIAS": False, "EXPONENT_ADD": True,
             "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": shift_add_lut.block_k_for(128, 64)}
    sig = {"x_ptr": "*fp16", "packed_ptr": "*i32", "exps_ptr": "*i8", "signs_ptr": "*i8", "bias_ptr": "*fp16",
           "out_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32",
           **{k: "constexpr" for k in const}}
    cases.append((f"shift_add_lut BLOCK_M={block_m}", shift_add_lut.shift_add_lut_kernel, sig, const, 4, 3))

only = sys.argv[1] if len(sys.argv) > 1 else ""
for label, kernel, sig, const, warps, stages in cases:
    if only not in label:
        continue
    start = time.perf_counter()
    try:
        k = compile_for_hopper(kernel, sig, const, num_warps=warps, num_stages=stages)
        meta = k.metadata
        shared = getattr(meta, "shared", None)
        row = {"label": label, "ok": True, "shared": shared, "wgmma": "wgmma" in k.asm["ptx"]}
    except Exception as e:
        row = {"label": label, "ok": False, "error": f"{type(e).__name__}: {str(e)[-800:]}"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv[:1]], env=env, stdout=subprocess.PIPE, text=True)
    bad = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("{"):
            print(line, end="")
            continue
        row = json.loads(line)
        if not row["ok"]:
            bad += 1
            print(f"FAIL {row['label']}: {row['error']}")
            continue
        fits = row["shared"] is None or row["shared"] <= H100_MAX_SHARED
        bad += not fits
        print(f"{'ok  ' if fits else 'SMEM'} {row['label']}: shared {row['shared']} B"
              f"{'' if fits else ' > H100 limit'}, wgmma {row['wgmma']} ({row['seconds']} s)", flush=True)
    if proc.wait() != 0:
        print(f"the compile process exited with {proc.returncode}")
        bad += 1
    print(f"{bad} config(s) failed or do not fit" if bad else "every config compiles for sm_90 and fits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
