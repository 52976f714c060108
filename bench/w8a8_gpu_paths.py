"""GPU check of fxforge::linear_w8a8's Triton paths at decode batch sizes, per activation scaling.

For each layer (4096², 8192²), batch (1, 2, 4, 16, 128) and act_scale ("tensor", "token"): the
kernel's output is compared with the op's reference on the same GPU for exact equality (the
lowering is declared BIT_EXACT), then timed with triton.testing.do_bench next to fp16 cuBLAS.
At batch 1 it also times the unfused route (quantize kernel + BLOCK_M = 16 GEMM, GEMV_MAX_M = 0)
against the one-launch GEMV, at batch 2-16 the per-tensor range split over programs (one launch
more) against the single-program quantizer, and every row once more inside a CUDA graph (the
kernels' own time, no host launch overhead); prints the configs the autotuners chose. Writes
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


def _quantized_equal(x: torch.Tensor, act_scale: str) -> bool:
    """Whether the Triton activation quantizer agrees with the reference's on this GPU (diagnosis)."""
    from fxforge.ir.ops.linear_w8a8 import quantize_per_tensor, quantize_per_token
    from fxforge.kernels.w8a8_quantize import quantize_per_tensor_triton, quantize_per_token_triton

    if act_scale == "token":
        (x8, s), (rx8, rs) = quantize_per_token_triton(x), quantize_per_token(x)
        return torch.equal(x8, rx8) and torch.equal(s, rs.flatten())
    (a8, s, zp), (q, rs, rzp) = quantize_per_tensor_triton(x), quantize_per_tensor(x)
    return torch.equal(a8.int() + 128, q.int()) and torch.equal(s, rs) and torch.equal(zp, rzp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    require_cuda("bench/w8a8_gpu_paths.py")
    import triton.testing

    from fxforge.kernels import w8a8_gemm, w8a8_quantize
    from fxforge.kernels.w8a8_gemm import linear_w8a8_triton

    timer = gpu_timer()

    def graph_timer(fn):
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=20)
        except Exception as e:  # a diagnosis column: report and go on
            print(f"do_bench_cudagraph failed: {type(e).__name__}: {e}", flush=True)
            return float("nan")
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
                        print(f"  quantized activations equal: {_quantized_equal(x, act_scale)}", flush=True)
                        print(f"MISMATCH {n}x{k} batch {batch} {act_scale} bias={b is not None}: max |diff| "
                              f"{(got.float() - ref.float()).abs().max().item():.3g}", flush=True)
                row["w8a8_ms"] = timer(lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                # In a CUDA graph: the kernels' own GPU time, without the host's launch overhead.
                row["fp16_graph_ms"] = graph_timer(lambda: torch.nn.functional.linear(x, weight))
                row["w8a8_graph_ms"] = graph_timer(lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                if act_scale == "tensor" and 1 < batch <= 16:
                    saved = w8a8_quantize.SINGLE_PROGRAM_MAX_NUMEL
                    w8a8_quantize.SINGLE_PROGRAM_MAX_NUMEL = 0  # range pass over several programs
                    mismatches += not torch.equal(linear_w8a8_triton(x, qweight, wscale, None, act_scale),
                                                  torch.ops.fxforge.linear_w8a8(x, qweight, wscale, None, act_scale))
                    row["split_range_ms"] = timer(lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                    row["split_range_graph_ms"] = graph_timer(
                        lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                    w8a8_quantize.SINGLE_PROGRAM_MAX_NUMEL = saved
                if batch == 1:
                    w8a8_gemm.GEMV_MAX_M = 0
                    unfused = linear_w8a8_triton(x, qweight, wscale, None, act_scale)
                    mismatches += not torch.equal(unfused, torch.ops.fxforge.linear_w8a8(x, qweight, wscale, None,
                                                                                         act_scale))
                    row["unfused_ms"] = timer(lambda: linear_w8a8_triton(x, qweight, wscale, None, act_scale))
                    w8a8_gemm.GEMV_MAX_M = 1
                rows.append(row)
                extra = "".join(f"  {key} {row[key]:.4f}" for key in ("unfused_ms", "split_range_ms",
                                                                       "split_range_graph_ms") if key in row)
                extra += f"  graph: fp16 {row['fp16_graph_ms']:.4f} w8a8 {row['w8a8_graph_ms']:.4f}"
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
    payload = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "mismatches": mismatches,
               "peak_rss_mib": round(peak_mib), "chosen_configs": chosen, "rows": rows,
               "note": "ms per call from triton.testing.do_bench (*_graph_ms: do_bench_cudagraph); unfused = quantize kernel + small-M GEMM at batch 1; split_range = range kernel + quantize kernel + GEMM"}
    text = json.dumps(payload, indent=2) + "\n"
    results_path("w8a8_gpu_paths", gpu).write_text(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / results_path("w8a8_gpu_paths", gpu).name).write_text(text)


if __name__ == "__main__":
    main()
