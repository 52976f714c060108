"""GPU micro-benchmark of fxforge::linear_wq's Triton kernels (int4, group 128) against fp16 cuBLAS.

For 4096x4096 and 8192x8192 layers at batch 1, 16 and 128 it checks the kernel against
torch.ops.fxforge.linear_wq, then times with triton.testing.do_bench:
  fp16     torch.nn.functional.linear with an fp16 weight (cuBLAS)
  old      the previous kernels, if bench/_old_wq_gemm.py exists (a copy of the old module)
  new      fxforge.kernels.wq_gemm.linear_wq_triton (autotuned; batch 1 runs wq_gemv_kernel)
  dot      at batch 1, the tensor-core small-M kernel (wq_small_m_kernel) forced, for comparison
and, at batch 1 and 16, fp16 and new again under triton.testing.do_bench_cudagraph (GPU time
without the Python launch overhead). With WQ_EXPLORE=1 it also autotunes wider config lists
and prints each config's time (batch 1: extra wq_gemv_kernel configs). Writes $OUT/wq_gemv_<gpu>.json (or bench/results/).

    python bench/wq_gemv_gpu.py           # needs a CUDA GPU
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from _gpu import check_close, int4_operands, require_cuda, results_path  # bench/ is on sys.path

SIZES = (4096, 8192)
BATCHES = (1, 16, 128)
GROUP = 128


def _timings(autotuner) -> dict:
    t = getattr(autotuner, "configs_timings", None) or {}
    return {f"{c.kwargs} w{c.num_warps} s{c.num_stages}": round(float(v[0] if isinstance(v, (list, tuple)) else v) * 1e3, 2)
            for c, v in t.items()}


def main() -> None:
    require_cuda("bench/wq_gemv_gpu.py")
    import triton
    import triton.testing

    import fxforge.ir.ops.linear_wq  # noqa: F401  (defines torch.ops.fxforge.linear_wq)
    from fxforge.kernels import wq_gemm

    try:
        import _old_wq_gemm as old
    except ImportError:
        old = None
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    gpu = torch.cuda.get_device_name()
    path = (out_dir / f"wq_gemv_{gpu.replace(' ', '_')}.json") if out_dir else results_path("wq_gemv", gpu)
    payload = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "group_size": GROUP,
               "note": "ms per call, triton.testing.do_bench (graph_ms: do_bench_cudagraph, no launch overhead); "
                       "speedup = fp16_ms / kernel_ms", "rows": [], "autotune_us": {}, "explore_us": {}}

    def save():
        path.write_text(json.dumps(payload, indent=2) + "\n")

    t0 = time.time()
    torch.manual_seed(0)
    ref = torch.ops.fxforge.linear_wq
    for size in SIZES:
        n = k = size
        weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.float16)
        qw, sc, zr = int4_operands(n, k, GROUP, "cuda")
        for batch in BATCHES:
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
            expected = ref(x, qw, sc, zr, None, 4, GROUP)
            new = lambda: wq_gemm.linear_wq_triton(x, qw, sc, zr, None, 4, GROUP)  # noqa: E731
            check_close("wq_gemv_gpu", f"new {size} b{batch}", new(), expected, atol=1e-3, rtol=2e-2)
            tuner = (wq_gemm.wq_gemv_kernel if batch == 1 else
                     wq_gemm.wq_small_m_kernel if batch <= wq_gemm.SMALL_M else wq_gemm.wq_gemm_kernel)
            payload["autotune_us"][f"{size} b{batch}"] = _timings(tuner)
            row = {"n": n, "k": k, "batch": batch, "fp16_ms": triton.testing.do_bench(lambda: torch.nn.functional.linear(x, weight)),
                   "new_ms": triton.testing.do_bench(new)}
            if old is not None:
                oldf = lambda: old.linear_wq_triton(x, qw, sc, zr, None, 4, GROUP)  # noqa: E731
                check_close("wq_gemv_gpu", f"old {size} b{batch}", oldf(), expected, atol=1e-3, rtol=2e-2)
                row["old_ms"] = triton.testing.do_bench(oldf)
            if batch == 1:
                units = qw.view(torch.int32)
                out = torch.empty(1, n, device="cuda", dtype=torch.float16)
                grid = lambda meta: (1, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731

                def dot():
                    wq_gemm.wq_small_m_kernel[grid](
                        x, units, sc, zr, out, out, 1, n, k, x.stride(0), units.stride(0), sc.stride(0), out.stride(0),
                        BITS=4, GROUP_SIZE=GROUP, HAS_BIAS=False, DOT_DTYPE=triton.language.float16, UNIT_BITS=32)
                    return out
                check_close("wq_gemv_gpu", f"dot {size} b1", dot(), expected, atol=1e-3, rtol=2e-2)
                row["dot_ms"] = triton.testing.do_bench(dot)
            if batch <= 16:
                row["fp16_graph_ms"] = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, weight))
                row["new_graph_ms"] = triton.testing.do_bench_cudagraph(new)
            row["best_config"] = str(tuner.best_config)
            payload["rows"].append(row)
            print(f"{n}x{k} b{batch:>3}  fp16 {row['fp16_ms']*1e3:7.1f} us  old {row.get('old_ms', float('nan'))*1e3:7.1f} us  "
                  f"dot {row.get('dot_ms', float('nan'))*1e3:6.1f}  new {row['new_ms']*1e3:7.1f} us ({row['fp16_ms']/row['new_ms']:.2f}x fp16)  "
                  f"graph fp16 {row.get('fp16_graph_ms', float('nan'))*1e3:6.1f} new {row.get('new_graph_ms', float('nan'))*1e3:6.1f}  "
                  f"[{row['best_config']}] t={time.time()-t0:.0f}s", flush=True)
            save()
        # extra correctness: other batch sizes on the small-M path, bf16, bias
        for batch, dt in ((3, torch.float16), (8, torch.bfloat16), (1, torch.bfloat16)):
            x = torch.randn(batch, k, device="cuda", dtype=dt)
            b = torch.randn(n, device="cuda", dtype=dt)
            check_close("wq_gemv_gpu", f"new {size} b{batch} {dt}", wq_gemm.linear_wq_triton(x, qw, sc.to(dt), zr, b, 4, GROUP),
                        ref(x, qw, sc.to(dt), zr, b, 4, GROUP), atol=1e-2, rtol=2e-2)
        del weight, qw, sc, zr
    payload["checked"] = "all rows + batch 3 fp16, 8 and 1 bf16 with bias: match torch.ops.fxforge.linear_wq"
    save()
    print("correctness ok", flush=True)

    if os.environ.get("WQ_EXPLORE") == "1":
        C = triton.Config
        gemv = [C({"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=w, num_stages=st)
                for bn, bk, w, st in [(8, 256, 2, 4), (8, 512, 2, 3), (16, 1024, 4, 3), (8, 1024, 4, 2), (32, 128, 4, 8),
                                      (16, 256, 2, 6), (64, 128, 8, 6), (128, 128, 8, 4), (32, 256, 8, 5), (16, 128, 4, 8)]]
        tuner = triton.autotune(configs=gemv, key=["N", "K"])(wq_gemm.wq_gemv_kernel.fn)
        for size in SIZES:
            if time.time() - t0 > float(os.environ.get("WQ_BUDGET_S", "170")):
                print("explore: out of time", flush=True)
                break
            n = k = size
            qw, sc, zr = int4_operands(n, k, GROUP, "cuda")
            units = qw.view(torch.int32)
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            out = torch.empty(1, n, device="cuda", dtype=torch.float16)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            tuner[grid](x, units, sc, zr, out, out, n, k, k // 8, units.stride(0), sc.stride(0),
                        BITS=4, GROUP_SIZE=GROUP, HAS_BIAS=False, UNIT_BITS=32)
            check_close("wq_gemv_gpu", f"explore gemv {size}", out, ref(x, qw, sc, zr, None, 4, GROUP), atol=1e-3, rtol=2e-2)
            tm = _timings(tuner)
            payload["explore_us"][f"gemv {size} b1"] = tm
            print(f"explore gemv {size} b1:", json.dumps(dict(sorted(tm.items(), key=lambda kv: kv[1]))), flush=True)
            save()
    print(f"wrote {path} in {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
