"""GPU benchmark of the shift-add LUT kernel at batch 1 against torch fp16 matmul and int4.

Times, in one run on one GPU with triton.testing.do_bench, at batch 1 (decoding) on 4096x4096
and 8192x8192 layers:
  fp16       torch.nn.functional.linear with an fp16 weight (cuBLAS), the baseline
  int4       fxforge::linear_wq Triton kernel, 4-bit weights, group 128 (its split-K GEMV)
  lut-shift  fxforge::shift_add_linear LUT kernel, 3 planes, group 128, powers of two applied
             as exponent adds (EXPONENT_ADD=True)
  lut-mul    the same kernel applying them as float multiplies (EXPONENT_ADD=False)
Every kernel's output is checked against its op's reference first, so a fast wrong kernel
cannot produce a number. Prints a table; writes bench/results/shift_add_gpu_<gpu name>.json.
Target (issue 8): the LUT kernel faster than fp16 at batch 1. bench/gpu_suite.py runs the same
measurement through `run`.

    python bench/shift_add_gpu.py          # needs a CUDA GPU (written for an H100)
"""
from __future__ import annotations

import json

import torch
from _gpu import check_close, gpu_timer, int4_operands, require_cuda, results_path  # bench/ is on sys.path

SIZES = (4096, 8192)
QUICK_SIZES = (4096,)
SMOKE_SIZES = (128,)
BATCH = 1
GROUP_SIZE = 128
PLANES = 3
TERMS = 3


def _checked(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    check_close("bench/shift_add_gpu.py", name, got, expected, atol=1e-3, rtol=2e-2)


def _shift_add_operands(n: int, k: int, device: str):
    from fxforge.ir.ops.shift_add_linear import pack_signs, round_to_apot

    planes = (torch.randint(0, 2, (PLANES, n, k), device=device) * 2 - 1).to(torch.int8)
    exps, signs = round_to_apot(torch.rand(n, k // GROUP_SIZE, PLANES, device=device) * 0.02 + 1e-3, TERMS)
    return pack_signs(planes), exps, signs


def run(timer, device: str = "cuda", *, quick: bool = False, smoke: bool = False) -> list[dict]:
    """Rows {n, k, batch, fp16_ms, int4_ms, lut_shift_ms, lut_mul_ms}; every kernel checked first."""
    from fxforge.kernels.shift_add_lut import shift_add_linear_triton
    from fxforge.kernels.wq_gemm import linear_wq_triton

    torch.manual_seed(0)
    rows = []
    for size in SMOKE_SIZES if smoke else QUICK_SIZES if quick else SIZES:
        n = k = size
        weight = (torch.randn(n, k, device=device) * 0.02).to(torch.float16)
        packed, exps, signs = _shift_add_operands(n, k, device)
        qweight4, scales4, zeros4 = int4_operands(n, k, GROUP_SIZE, device)
        x = torch.randn(BATCH, k, device=device, dtype=torch.float16)
        reference = torch.ops.fxforge.shift_add_linear(x, packed, exps, signs, None, GROUP_SIZE)
        for exponent_add in (True, False):
            _checked(f"shift_add_lut {n}x{k} exponent_add={exponent_add}",
                     shift_add_linear_triton(x, packed, exps, signs, None, GROUP_SIZE, exponent_add=exponent_add),
                     reference)
        _checked(f"int4 {n}x{k}", linear_wq_triton(x, qweight4, scales4, zeros4, None, 4, GROUP_SIZE),
                 torch.ops.fxforge.linear_wq(x, qweight4, scales4, zeros4, None, 4, GROUP_SIZE))
        times = {
            "fp16": timer(lambda: torch.nn.functional.linear(x, weight)),
            "int4": timer(lambda: linear_wq_triton(x, qweight4, scales4, zeros4, None, 4, GROUP_SIZE)),
            "lut_shift": timer(
                lambda: shift_add_linear_triton(x, packed, exps, signs, None, GROUP_SIZE, exponent_add=True)),
            "lut_mul": timer(
                lambda: shift_add_linear_triton(x, packed, exps, signs, None, GROUP_SIZE, exponent_add=False)),
        }
        rows.append({"n": n, "k": k, "batch": BATCH, **{f"{name}_ms": ms for name, ms in times.items()}})
    return rows


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print(
            f"{row['n']:>5}x{row['k']:<5} batch {row['batch']}  fp16 {row['fp16_ms']:.4f} ms  "
            f"int4 {row['int4_ms']:.4f} ms  "
            f"lut-shift {row['lut_shift_ms']:.4f} ms ({row['fp16_ms'] / row['lut_shift_ms']:.2f}x fp16)  "
            f"lut-mul {row['lut_mul_ms']:.4f} ms ({row['fp16_ms'] / row['lut_mul_ms']:.2f}x fp16)",
            flush=True,
        )


def main() -> None:
    require_cuda("bench/shift_add_gpu.py")
    import triton

    gpu = torch.cuda.get_device_name()
    rows = run(gpu_timer(), "cuda")
    print_table(rows)
    path = results_path("shift_add_gpu", gpu)
    payload = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "group_size": GROUP_SIZE, "planes": PLANES, "terms": TERMS,
        "note": "ms per call from triton.testing.do_bench; speedup = fp16_ms / kernel_ms",
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
