"""What the GPU benchmarks share: refusing to run without a GPU, checking a kernel against its
reference before timing it (a fast wrong kernel must not produce a number), test operands, the
timer, and where results go.

Each GPU script exposes `run(timer, device, quick=..., smoke=...)` functions that
bench/gpu_suite.py imports: `timer` is triton.testing.do_bench on a GPU (`gpu_timer()`), or
`single_call_ms` in the suite's CPU smoke mode (TRITON_INTERPRET=1, one call, no timing claim).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def require_cuda(script: str) -> None:
    """Exit with a clear message unless a real CUDA device is usable."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(f"{script}: TRITON_INTERPRET=1 is set; unset it to time real GPU kernels.")
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device found (torch.cuda.is_available() is False). "
                 "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")


def gpu_timer() -> Callable[[Callable[[], object]], float]:
    """triton.testing.do_bench: mean milliseconds per call on the GPU."""
    import triton.testing

    return triton.testing.do_bench


def single_call_ms(fn: Callable[[], object]) -> float:
    """The smoke mode's stand-in for do_bench: calls fn once; the milliseconds it returns are no measurement."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def check_close(script: str, name: str, got: torch.Tensor, expected: torch.Tensor, *,
                atol: float, rtol: float = 0.0, reference: str = "its reference") -> None:
    """Exit naming the kernel if max|got - expected| > atol + rtol·max|expected| (or either is non-finite)."""
    if got.shape != expected.shape:
        raise SystemExit(f"{script}: {name} returned shape {tuple(got.shape)}, {reference} {tuple(expected.shape)}.")
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    if not err <= atol + rtol * scale:
        raise SystemExit(f"{script}: {name} disagrees with {reference} (max abs error {err:.3g}).")


def int4_operands(n: int, k: int, group_size: int, device: str):
    """Random packed int4 weights, fp16 scales and uint8 zero points in fxforge::linear_wq's layout."""
    from fxforge.ir.ops.linear_wq import pack_bits

    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // group_size, device=device) * 0.01).to(torch.float16)
    zeros = torch.randint(0, 16, (n, k // group_size), dtype=torch.uint8, device=device)
    return pack_bits(q, 4), scales, zeros


def results_path(bench: str, gpu: str) -> Path:
    """bench/results/<bench>_<gpu name>.json (the folder is created)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{bench}_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_')}.json"
