"""GPU benchmark of fxforge's fused LoRA Triton kernel against unfused torch fp16.

Times, in one run on one GPU with triton.testing.do_bench, fp16, rank 16, on LLM layer shapes
(Llama-3-8B: attention 4096x4096, MLP up 4096->14336 and down 14336->4096) at batch 1, 16, 128:
  base      torch.nn.functional.linear(x, W) alone (cuBLAS): what the layer costs without an adapter
  unfused   the base matmul plus scale * (x @ Aᵀ) @ Bᵀ in torch (three cuBLAS calls and an add)
  fused     fxforge::lora_linear Triton kernel (fxforge/kernels/lora_linear.py): one launch
speedup = unfused_ms / fused_ms; overhead = fused_ms / base_ms. The kernel's output is checked
against the op's reference (float32) first, so a fast wrong kernel cannot produce a number.
Prints a table and writes bench/results/lora_gpu_<gpu name>.json; bench/gpu_suite.py runs the
same measurement through `run`.

    python bench/lora_gpu.py                # needs a CUDA GPU (written for an H100)
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from _gpu import check_close, gpu_timer, require_cuda, results_path  # bench/ is on sys.path

# (in_features k, out_features n)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
QUICK_SHAPES = ((4096, 4096),)
SMOKE_SHAPES = ((128, 96),)
BATCHES = (1, 16, 128)
SMOKE_BATCHES = (1, 16)
RANK = 16
SCALE = 2.0  # lora_alpha / r with alpha = 32


def _unfused(x, w, a, b, scale):
    return F.linear(x, w) + scale * F.linear(F.linear(x, a), b)


def run(timer, device: str = "cuda", *, quick: bool = False, smoke: bool = False) -> list[dict]:
    """Rows {k, n, batch, rank, base_ms, unfused_ms, fused_ms, speedup_vs_unfused, overhead_vs_base}."""
    from fxforge.kernels.lora_linear import lora_linear_triton

    torch.manual_seed(0)
    rows = []
    for k, n in SMOKE_SHAPES if smoke else QUICK_SHAPES if quick else SHAPES:
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.float16)
        a = (torch.randn(RANK, k, device=device) * 0.02).to(torch.float16)
        b = (torch.randn(n, RANK, device=device) * 0.02).to(torch.float16)
        for batch in SMOKE_BATCHES if smoke else BATCHES:
            x = torch.randn(batch, k, device=device, dtype=torch.float16)
            expected = torch.ops.fxforge.lora_linear(x.float(), w.float(), None, a.float(), b.float(), SCALE)
            check_close("bench/lora_gpu.py", f"lora_linear {k}->{n} batch {batch}",
                        lora_linear_triton(x, w, None, a, b, SCALE), expected, atol=2e-2, rtol=1e-2,
                        reference="fxforge::lora_linear's float32 reference")
            if device != "cpu":  # torch's CPU fp16 matmul is not the baseline anywhere; smoke skips this check
                check_close("bench/lora_gpu.py", f"torch unfused {k}->{n} batch {batch}",
                            _unfused(x, w, a, b, SCALE), expected, atol=2e-2, rtol=1e-2,
                            reference="fxforge::lora_linear's float32 reference")
            base_ms = timer(lambda: F.linear(x, w))
            unfused_ms = timer(lambda: _unfused(x, w, a, b, SCALE))
            fused_ms = timer(lambda: lora_linear_triton(x, w, None, a, b, SCALE))
            rows.append({"k": k, "n": n, "batch": batch, "rank": RANK, "base_ms": base_ms, "unfused_ms": unfused_ms,
                         "fused_ms": fused_ms, "speedup_vs_unfused": unfused_ms / fused_ms,
                         "overhead_vs_base": fused_ms / base_ms})
        del w, a, b
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'k->n':>12} {'batch':>5} | {'base ms':>8} {'unfused ms':>10} {'fused ms':>8} | "
          f"{'vs unfused':>10} {'vs base':>8}")
    for r in rows:
        print(f"{str(r['k']) + '->' + str(r['n']):>12} {r['batch']:>5} | {r['base_ms']:>8.4f} "
              f"{r['unfused_ms']:>10.4f} {r['fused_ms']:>8.4f} | {r['speedup_vs_unfused']:>9.2f}x "
              f"{r['overhead_vs_base']:>7.2f}x", flush=True)


def main() -> None:
    require_cuda("bench/lora_gpu.py")
    import triton

    gpu = torch.cuda.get_device_name()
    rows = run(gpu_timer(), "cuda")
    print_table(rows)
    path = results_path("lora_gpu", gpu)
    payload = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "dtype": "float16",
        "rank": RANK, "scale": SCALE,
        "note": "ms per call from triton.testing.do_bench; speedup = unfused_ms / fused_ms, "
                "overhead = fused_ms / base_ms (the bare fp16 matmul)",
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
