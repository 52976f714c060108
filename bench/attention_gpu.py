"""GPU benchmark of fxforge's attention Triton kernels against torch SDPA.

Times, in one run on one GPU with triton.testing.do_bench:
  forward   fxforge flash-attention kernel vs torch SDPA forced to its flash backend, fp16,
            sequence length 512..16k (batch · length = 16k tokens, 2048 / head_dim heads),
            head dim 64 and 128, causal and not; TFLOP/s of each and their ratio.
  decode    fxforge split-KV decode kernel vs torch SDPA (default backend choice, GQA), batch 1,
            one query, 32 query heads on 8 KV heads, head dim 128, KV length 4k..32k;
            microseconds and the KV-cache read bandwidth (GB/s) each reaches.
Each kernel's output is checked against SDPA's first, so a fast wrong kernel cannot produce a
number. Prints a table and writes bench/results/attention_gpu_<gpu name>.json. bench/gpu_suite.py
runs the same measurements through `bench_forward` and `bench_decode`.

    python bench/attention_gpu.py            # needs a CUDA GPU (written for an H100)
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from _gpu import check_close, gpu_timer, require_cuda, results_path  # bench/ is on sys.path when a script runs

FORWARD_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_FORWARD_LENGTHS = (1024, 4096)
FORWARD_TOKENS = 16384
HIDDEN = 2048
HEAD_DIMS = (64, 128)
QUICK_HEAD_DIMS = (128,)  # half the kernel variants to compile
DECODE_LENGTHS = (4096, 8192, 16384, 32768)
QUICK_DECODE_LENGTHS = (4096, 32768)
DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM = 32, 8, 128
# --smoke (CPU, TRITON_INTERPRET=1): a few tiny shapes in float32, no timing claim
SMOKE = {"lengths": (48, 96), "tokens": 96, "hidden": 128, "head_dims": (64,),
         "decode_lengths": (200,), "decode_heads": (4, 2, 64)}


def _checked(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    check_close("bench/attention_gpu.py", name, got, expected, atol=2e-2, reference="torch SDPA")


def _sdpa_flash(q, k, v, is_causal):
    if q.device.type != "cuda":  # smoke mode: the CPU's default SDPA
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def bench_forward(do_bench, device: str = "cuda", *, quick: bool = False, smoke: bool = False) -> list[dict]:
    """Flash forward vs SDPA flash, TFLOP/s of each; fp16 (float32 in smoke mode)."""
    from fxforge.kernels.flash_attention import attention_flops, flash_attention_forward

    lengths = SMOKE["lengths"] if smoke else QUICK_FORWARD_LENGTHS if quick else FORWARD_LENGTHS
    tokens, hidden = (SMOKE["tokens"], SMOKE["hidden"]) if smoke else (FORWARD_TOKENS, HIDDEN)
    dtype = torch.float32 if smoke else torch.float16
    torch.manual_seed(0)
    rows = []
    for head_dim in SMOKE["head_dims"] if smoke else QUICK_HEAD_DIMS if quick else HEAD_DIMS:
        heads = hidden // head_dim
        for length in lengths:
            batch = max(1, tokens // length)
            q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
            for is_causal in (False, True):
                name = f"forward d={head_dim} L={length} causal={is_causal}"
                # The first call autotunes; its result is checked before anything is timed.
                _checked(name, flash_attention_forward(q, k, v, None, is_causal, None, 1), _sdpa_flash(q, k, v, is_causal))
                triton_ms = do_bench(lambda: flash_attention_forward(q, k, v, None, is_causal, None, 1))
                sdpa_ms = do_bench(lambda: _sdpa_flash(q, k, v, is_causal))
                flops = attention_flops(batch, heads, length, length, head_dim, is_causal)
                rows.append({
                    "batch": batch, "heads": heads, "length": length, "head_dim": head_dim, "causal": is_causal,
                    "triton_ms": triton_ms, "sdpa_flash_ms": sdpa_ms,
                    "triton_tflops": flops / triton_ms / 1e9, "sdpa_flash_tflops": flops / sdpa_ms / 1e9,
                    "speedup_vs_sdpa": sdpa_ms / triton_ms,
                })
            del q, k, v
    return rows


def bench_decode(do_bench, device: str = "cuda", *, quick: bool = False, smoke: bool = False) -> list[dict]:
    """Split-KV decode vs SDPA (GQA), µs and KV-cache GB/s; fp16 (float32 in smoke mode)."""
    from fxforge.kernels.decode_attention import decode_attention

    lengths = SMOKE["decode_lengths"] if smoke else QUICK_DECODE_LENGTHS if quick else DECODE_LENGTHS
    q_heads, kv_heads, head_dim = SMOKE["decode_heads"] if smoke else (DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM)
    dtype = torch.float32 if smoke else torch.float16
    groups = q_heads // kv_heads
    torch.manual_seed(0)
    rows = []
    for length in lengths:
        q = torch.randn(1, q_heads, 1, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype) for _ in range(2))
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        _checked(f"decode L={length}", decode_attention(q, k, v, None, None, groups), expected)
        triton_ms = do_bench(lambda: decode_attention(q, k, v, None, None, groups))
        sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        kv_bytes = 2 * k.numel() * k.element_size()
        rows.append({
            "batch": 1, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "kv_length": length, "triton_us": triton_ms * 1e3, "sdpa_us": sdpa_ms * 1e3,
            "triton_gbps": kv_bytes / triton_ms / 1e6, "sdpa_gbps": kv_bytes / sdpa_ms / 1e6,
            "speedup_vs_sdpa": sdpa_ms / triton_ms,
        })
    return rows


def print_forward_table(forward: list[dict]) -> None:
    print(f"{'D':>4} {'L':>6} {'B':>3} {'causal':>6} | {'triton TF/s':>11} {'SDPA flash TF/s':>15} {'ratio':>6}")
    for r in forward:
        print(f"{r['head_dim']:>4} {r['length']:>6} {r['batch']:>3} {str(r['causal']):>6} | "
              f"{r['triton_tflops']:>11.1f} {r['sdpa_flash_tflops']:>15.1f} {r['speedup_vs_sdpa']:>6.2f}")


def print_decode_table(decode: list[dict]) -> None:
    print(f"{'KV len':>7} | {'triton us':>9} {'SDPA us':>8} {'triton GB/s':>11} {'SDPA GB/s':>9} {'ratio':>6}")
    for r in decode:
        print(f"{r['kv_length']:>7} | {r['triton_us']:>9.1f} {r['sdpa_us']:>8.1f} "
              f"{r['triton_gbps']:>11.0f} {r['sdpa_gbps']:>9.0f} {r['speedup_vs_sdpa']:>6.2f}")


def main() -> None:
    require_cuda("bench/attention_gpu.py")
    import triton

    gpu = torch.cuda.get_device_name()
    forward = bench_forward(gpu_timer())
    decode = bench_decode(gpu_timer())
    print_forward_table(forward)
    print()
    print_decode_table(decode)
    path = results_path("attention_gpu", gpu)
    payload = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "dtype": "float16",
        "forward": forward, "decode": decode,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
