"""GPU benchmark of fxforge's quantized-linear Triton kernels against torch fp16 matmul.

Times, in one run on one GPU with triton.testing.do_bench:
  fp16    torch.nn.functional.linear with an fp16 weight (cuBLAS), the baseline
  int4    fxforge::linear_wq Triton kernel, 4-bit weights, group 128 (GEMV path at batch 1)
  w8a8    fxforge::linear_w8a8 Triton kernels (default per-tensor quantization + int8 GEMM)
at batch 1, 16 and 128 on 4096x4096 and 8192x8192 layers; prints a table and writes
bench/results/quantize_gpu_<gpu name>.json. Each kernel's output is checked against the op's
reference first, so a fast wrong kernel cannot produce a number. bench/gpu_suite.py runs the
same measurement through `run`.

    python bench/quantize_gpu.py            # needs a CUDA GPU (written for an H100)
"""
from __future__ import annotations

import json

import torch
from _gpu import check_close, gpu_timer, int4_operands, require_cuda, results_path  # bench/ is on sys.path

BATCHES = (1, 16, 128)
SIZES = (4096, 8192)
QUICK_SIZES = (4096,)
SMOKE_SIZES, SMOKE_BATCHES = (256,), (1, 16)
GROUP_SIZE = 128


def _checked(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    check_close("bench/quantize_gpu.py", name, got, expected, atol=1e-3, rtol=2e-2)


def run(timer, device: str = "cuda", *, quick: bool = False, smoke: bool = False) -> list[dict]:
    """Rows {n, k, batch, fp16_ms, int4_ms, w8a8_ms}; every kernel checked against its op first."""
    from fxforge.kernels.w8a8_gemm import linear_w8a8_triton
    from fxforge.kernels.wq_gemm import linear_wq_triton

    sizes, batches = (SMOKE_SIZES, SMOKE_BATCHES) if smoke else (QUICK_SIZES if quick else SIZES, BATCHES)
    torch.manual_seed(0)
    rows = []
    for size in sizes:
        n = k = size
        weight = (torch.randn(n, k, device=device) * 0.02).to(torch.float16)
        qweight4, scales4, zeros4 = int4_operands(n, k, GROUP_SIZE, device)
        qweight8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        wscale8 = torch.rand(n, device=device) * 1e-3
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=torch.float16)
            # Correctness first (the reference runs on the same device's tensors).
            _checked(f"int4 {n}x{k} batch {batch}", linear_wq_triton(x, qweight4, scales4, zeros4, None, 4, GROUP_SIZE),
                     torch.ops.fxforge.linear_wq(x, qweight4, scales4, zeros4, None, 4, GROUP_SIZE))
            _checked(f"w8a8 {n}x{k} batch {batch}", linear_w8a8_triton(x, qweight8, wscale8, None),
                     torch.ops.fxforge.linear_w8a8(x, qweight8, wscale8, None))
            times = {
                "fp16": timer(lambda: torch.nn.functional.linear(x, weight)),
                "int4": timer(lambda: linear_wq_triton(x, qweight4, scales4, zeros4, None, 4, GROUP_SIZE)),
                "w8a8": timer(lambda: linear_w8a8_triton(x, qweight8, wscale8, None)),
            }
            rows.append({"n": n, "k": k, "batch": batch, **{f"{name}_ms": ms for name, ms in times.items()}})
        del weight, qweight4, scales4, zeros4, qweight8, wscale8
    return rows


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print(
            f"{row['n']:>5}x{row['k']:<5} batch {row['batch']:>3}  fp16 {row['fp16_ms']:.4f} ms  "
            f"int4 {row['int4_ms']:.4f} ms ({row['fp16_ms'] / row['int4_ms']:.2f}x)  "
            f"w8a8 {row['w8a8_ms']:.4f} ms ({row['fp16_ms'] / row['w8a8_ms']:.2f}x)",
            flush=True,
        )


def main() -> None:
    require_cuda("bench/quantize_gpu.py")
    import triton

    gpu = torch.cuda.get_device_name()
    rows = run(gpu_timer(), "cuda")
    print_table(rows)
    path = results_path("quantize_gpu", gpu)
    payload = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "group_size": GROUP_SIZE,
        "note": "ms per call from triton.testing.do_bench; speedup = fp16_ms / kernel_ms",
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
