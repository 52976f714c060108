"""GPU check of fxforge::linear_w8a8's Triton paths at decode batch sizes, per activation scaling.

For each layer (4096², 8192²), batch (1, 2, 4, 16, 128) and act_scale ("tensor", "token"): the
kernel's output is compared with the op's reference on the same GPU for exact equality (the
lowering is declared BIT_EXACT), then timed with triton.testing.do_bench next to fp16 cuBLAS.
At batch 1 it also times the unfused route (quantize kernel + BLOCK_M = 16 GEMM, GEMV_MAX_M = 0)
against the one-launch GEMV, and prints the configs the autotuners chose. Writes
bench/results/w8a8_gpu_paths_<gpu>.json (and DIR/... with --out DIR).

    python bench/w8a8_gpu_paths.py [--out DIR]      # needs a CUDA GPU
"""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch
from _gpu import gpu_timer, require_cuda, results_path  # bench/ is on sys.path

SIZES = (4096, 8192)
BATCHES = (1, 2, 4, 16, 128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    require_cuda("bench/w8a8_gpu_paths.py")
    from fxforge.kernels import w8a8_gemm
    from fxforge.kernels.w8a8_gemm import linear_w8a8_triton

    timer = gpu_timer()
    torch.manual_seed(0)
    rows, mismatches = [], 0
    for size in SIZES:
        n = k = size
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.float16)
        qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        wscale = torch.rand(n, device="cuda") * 1e-3
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        for batch in BATCHES:
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16) + 0.3
            fp16_ms = timer(lambda: torch.nn.functional.linear(x, weight))
            for act_scale in ("tensor", "token"):
                row = {"n": n, "k": k, "batch": batch, "act_scale": act_scale, "fp16_ms": fp16_ms}
                for b in (None, bias):
                    got = linear_w8a8_triton(x, qweight, wscale, b, act_scale)
                    ref = torch.ops.fxforge.linear_w8a8(x, qweight, wscale, b, act_scale)
                    exact = torch.equal(got, ref)
                    mismatches += not exact
                    if not exact:
                        print(f"MISMATCH {n}x{k} batch {batch} {act_scale} bias={b is not None}: max |diff| "
                              f"{(got.float() - ref.float()).abs().max().item():.3g}", flush=True)
                row["w8a8_ms"] = timer(lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                if batch == 1:
                    w8a8_gemm.GEMV_MAX_M = 0
                    unfused = linear_w8a8_triton(x, qweight, wscale, None, act_scale)
                    mismatches += not torch.equal(unfused, torch.ops.fxforge.linear_w8a8(x, qweight, wscale, None,
                                                                                         act_scale))
                    row["unfused_ms"] = timer(lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                    w8a8_gemm.GEMV_MAX_M = 1
                rows.append(row)
                extra = f"  unfused {row['unfused_ms']:.4f} ms" if "unfused_ms" in row else ""
                print(f"{n:>5}x{k:<5} batch {batch:>3} {act_scale:<6} fp16 {fp16_ms:.4f} ms  w8a8 "
                      f"{row['w8a8_ms']:.4f} ms ({fp16_ms / row['w8a8_ms']:.2f}x){extra}", flush=True)
    chosen = {}
    for name in ("w8a8_gemv_kernel", "w8a8_small_m_kernel", "w8a8_gemm_kernel"):
        tuner = getattr(w8a8_gemm, name)
        chosen[name] = {str(key): str(cfg) for key, cfg in tuner.cache.items()}
        for key, cfg in tuner.cache.items():
            print(f"{name} {key}: {cfg}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{mismatches} mismatch(es) against the reference; peak RSS {peak_mib:.0f} MiB, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    gpu = torch.cuda.get_device_name()
    import triton
    payload = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "mismatches": mismatches,
               "peak_rss_mib": round(peak_mib), "chosen_configs": chosen, "rows": rows,
               "note": "ms per call from triton.testing.do_bench; unfused = quantize kernel + small-M GEMM"}
    text = json.dumps(payload, indent=2) + "\n"
    results_path("w8a8_gpu_paths", gpu).write_text(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / results_path("w8a8_gpu_paths", gpu).name).write_text(text)


if __name__ == "__main__":
    main()
