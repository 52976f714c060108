"""Benchmark: GPTQ's working set per linear, the in-place inverse-Hessian factor against the
copying chain it replaced (issue 15: 7B-shaped blocks streamed in bounded memory).

For one linear of in-features K (down_proj: K = 11008 at 7B, 5632 at TinyLlama) the factor
used to take H = gram / rows (one K×K), a damped clone (two), its flip (three), the Cholesky
factor (four), the identity and L⁻¹ (five, six) and the flipped result; now H is formed in one
buffer, factorized and inverted in place (quantize/hessian.py). Each variant runs in a fresh
interpreter, so its peak RSS (getrusage) above the Gram matrix it starts from is its own; it
is printed in units of one K×K float32 matrix, with the full `quantize_weight_gptq` call
(W of N = 4096 outputs, the 7B down_proj's) next to it.

    python bench/gptq_memory.py                  # K = 2048, 5632, 11008
    python bench/gptq_memory.py --k 2048         # a smoke run
Prints a table and writes bench/results/gptq_memory_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _host import host_info  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("copying_factor", "in_place_factor", "gptq_call")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, k: int, n: int) -> dict:
    import torch

    from fxforge.passes.quantize.gptq import quantize_weight_gptq
    from fxforge.passes.quantize.hessian import damped_hessian, inverse_hessian_factor
    from fxforge.passes.quantize.rtn import QuantSpec

    torch.set_num_threads(1)
    rows = k + 64
    gram = torch.empty(k, k)
    for start in range(0, rows, 512):  # the Gram matrix as the observer builds it, chunk by chunk
        x = torch.randn(min(512, rows - start), k)
        gram.addmm_(x.T, x)
    del x
    w = torch.randn(n, k) * 0.02 if variant == "gptq_call" else None
    base = _peak_bytes()
    start = time.perf_counter()
    if variant == "copying_factor":  # the chain before: from stats.hessian, out of place
        h, _ = damped_hessian(gram / rows, 0.01)
        lower = torch.linalg.cholesky(h.flip(0, 1))
        del h
        inverse = torch.linalg.solve_triangular(lower, torch.eye(k), upper=False)
        del lower
        upper = inverse.flip(0, 1)
        del inverse, upper
    elif variant == "in_place_factor":
        upper, _ = inverse_hessian_factor(gram, 0.01, rows=rows)
        del upper
    else:
        quantize_weight_gptq(w, QuantSpec(4, 128), gram, rows=rows)
    seconds = time.perf_counter() - start
    matrix = k * k * 4
    return {"variant": variant, "k": k, "n": n, "seconds": round(seconds, 2),
            "peak_above_gram_gib": round((_peak_bytes() - base) / 2**30, 3),
            "peak_above_gram_kxk": round((_peak_bytes() - base) / matrix, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="2048,5632,11008", help="in-features of the linears")
    parser.add_argument("--n", type=int, default=4096, help="out-features of the gptq_call variant")
    parser.add_argument("--out", type=Path, default=RESULTS / "gptq_memory_cpu.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.n)))
        return
    rows = []
    print(f"{'K':>6} {'variant':<16} {'peak above gram':>16} {'in K×K':>7} {'s':>7}")
    for k in (int(v) for v in args.k.split(",")):
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--child", variant, str(k), "--n", str(args.n)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{k:>6} {variant:<16} {row['peak_above_gram_gib']:>12.3f} GiB {row['peak_above_gram_kxk']:>7.2f} "
                  f"{row['seconds']:>7.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"host": host_info(threads=1), "rows": rows}, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
