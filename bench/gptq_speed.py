"""Benchmark: fast GPTQ (fxforge/passes/quantize/gptq.py) against the per-column implementation
it replaced (tests/gptq_reference.py), issue 15 item 3.

The 7 linears of one TinyLlama-shaped decoder layer (hidden 2048, intermediate 5632, 32 heads /
4 KV heads, fp32): q 2048×2048, k/v 256×2048, o 2048×2048, gate/up 5632×2048, down 2048×5632.
Each input gets a Hessian H = XᵀX/n from random *correlated* activations (per-feature scales
from 0.1 to 3, mixed by I + G/√K; q/k/v share one, gate/up another, as in the model). Both
implementations quantize every linear in each round, alternating which goes first, and the
median over rounds is reported, so machine load hits both alike. Each call is timed by wall
clock and by the process's CPU time (`time.process_time`); with --threads 1 the CPU time is
the work itself, unaffected by how many other jobs share the cores, and the speedup is taken
from it (wall-clock ratios on a loaded 2-core machine measured 3.6x where CPU time says more). Reconstruction error is the
layer output error ‖WX − ŴX‖² / ‖WX‖² (computed through H). Peak RSS (getrusage) is read after
the data is built, after the first pass of the new implementation and after the first pass of
the reference, so each step's growth shows.

    python bench/gptq_speed.py                        # 4096 tokens, 4-bit g128, 3 rounds
    python bench/gptq_speed.py --quick                # hidden sizes / 4, a smoke run
Prints a table and writes bench/results/gptq_speed_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from _host import host_info  # bench/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gptq_reference import quantize_weight_gptq_reference  # noqa: E402  (the oracle lives with the tests)

from fxforge.passes.quantize.gptq import quantize_weights_gptq  # noqa: E402
from fxforge.passes.quantize.rtn import QuantSpec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 2048, 5632, 32, 4
Quantizer = Callable[..., object]


def layer_linears(hidden: int, intermediate: int, heads: int, kv_heads: int) -> list[tuple[str, int, int, str]]:
    """(name, out_features, in_features, which Hessian) of one Llama decoder layer."""
    kv = hidden // heads * kv_heads
    return [("q_proj", hidden, hidden, "attn_in"), ("k_proj", kv, hidden, "attn_in"), ("v_proj", kv, hidden, "attn_in"),
            ("o_proj", hidden, hidden, "attn_out"), ("gate_proj", intermediate, hidden, "mlp_in"),
            ("up_proj", intermediate, hidden, "mlp_in"), ("down_proj", hidden, intermediate, "mlp_out")]


def correlated_hessian(k: int, tokens: int, generator: torch.Generator) -> Tensor:
    """H = XᵀX/n of activations with uneven feature scales and cross-feature correlation."""
    mix = torch.randn(k, k, generator=generator) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=generator) * torch.linspace(0.1, 3.0, k)) @ mix
    return x.T @ x / tokens


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖², both as traces through H = XᵀX/n."""
    delta = w - w_hat
    return float(((delta @ h) * delta).sum() / ((w @ h) * w).sum())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden and intermediate sizes / 4 (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gptq_speed_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    linears = layer_linears(HIDDEN // scale, INTERMEDIATE // scale, HEADS // scale, KV_HEADS)
    generator = torch.Generator().manual_seed(0)
    dims = {"attn_in": HIDDEN // scale, "attn_out": HIDDEN // scale, "mlp_in": HIDDEN // scale,
            "mlp_out": INTERMEDIATE // scale}
    hessians = {name: correlated_hessian(k, args.tokens, generator) for name, k in dims.items()}
    weights = {name: torch.randn(n, k, generator=generator) * 0.02 for name, n, k, _ in linears}
    spec_of = {name: QuantSpec(args.bits, k if args.group_size == -1 else args.group_size) for name, _, k, _ in linears}
    impls: dict[str, Quantizer] = {"reference": quantize_weight_gptq_reference, "fast": quantize_weights_gptq}
    rss = {"data_built_mib": peak_rss_mib()}
    inputs = list(dict.fromkeys(hname for *_, hname in linears))  # q/k/v, o, gate/up, down: as the pass groups them
    members = {hname: [lin for lin in linears if lin[3] == hname] for hname in inputs}
    times: dict[str, dict[str, list[float]]] = {impl: {h: [] for h in inputs} for impl in impls}
    cpu_times: dict[str, dict[str, list[float]]] = {impl: {h: [] for h in inputs} for impl in impls}
    errors: dict[str, dict[str, float]] = {impl: {} for impl in impls}
    for round_index in range(args.rounds):
        order = ["fast", "reference"] if round_index % 2 == 0 else ["reference", "fast"]
        for impl in order:
            for hname in inputs:
                names = [name for name, *_ in members[hname]]
                start, cpu_start = time.perf_counter(), time.process_time()
                if impl == "fast":  # the layers reading one input at once, as the pass hands them to GPTQ
                    results = quantize_weights_gptq([weights[name] for name in names], spec_of[names[0]],
                                                    hessians[hname], block_size=args.block_size)
                else:
                    results = [impls[impl](weights[name], spec_of[name], hessians[hname], block_size=args.block_size)
                               for name in names]
                times[impl][hname].append(time.perf_counter() - start)
                cpu_times[impl][hname].append(time.process_time() - cpu_start)
                if round_index == 0:
                    for name, qm in zip(names, results):
                        errors[impl][name] = output_error(weights[name], qm.dequantize(), hessians[hname])
                del results
                print(f"round {round_index} {impl:9s} {'/'.join(names):20s} {times[impl][hname][-1]:8.2f} s wall "
                      f"{cpu_times[impl][hname][-1]:8.2f} s cpu", flush=True)
            if round_index == 0:
                rss[f"after_{impl}_mib"] = peak_rss_mib()
    rows = []
    for hname in inputs:
        old, new = (statistics.median(cpu_times[impl][hname]) for impl in ("reference", "fast"))
        old_wall, new_wall = (statistics.median(times[impl][hname]) for impl in ("reference", "fast"))
        linear_rows = [{"linear": name, "shape": [n, k], "reference_error": errors["reference"][name],
                        "fast_error": errors["fast"][name],
                        "error_ratio": errors["fast"][name] / errors["reference"][name]}
                       for name, n, k, _ in members[hname]]
        rows.append({"input": hname, "linears": linear_rows, "reference_s": old, "fast_s": new, "speedup": old / new,
                     "reference_wall_s": old_wall, "fast_wall_s": new_wall, "wall_speedup": old_wall / new_wall,
                     "reference_runs_s": cpu_times["reference"][hname], "fast_runs_s": cpu_times["fast"][hname]})
    per_layer = {impl: [sum(runs[r] for runs in cpu_times[impl].values()) for r in range(args.rounds)] for impl in impls}
    wall_layer = {impl: [sum(runs[r] for runs in times[impl].values()) for r in range(args.rounds)] for impl in impls}
    layer = {"reference_s": statistics.median(per_layer["reference"]), "fast_s": statistics.median(per_layer["fast"]),
             "reference_runs_s": per_layer["reference"], "fast_runs_s": per_layer["fast"],
             "reference_wall_runs_s": wall_layer["reference"], "fast_wall_runs_s": wall_layer["fast"],
             "worst_error_ratio": max(lr["error_ratio"] for r in rows for lr in r["linears"])}
    layer["speedup"] = layer["reference_s"] / layer["fast_s"]
    layer["wall_speedup"] = statistics.median(wall_layer["reference"]) / statistics.median(wall_layer["fast"])
    print(f"\n{'linears':22s} {'ref cpu':>8s} {'fast cpu':>8s} {'speedup':>8s}   {'linear':10s} {'shape':>11s} "
          f"{'ref err':>10s} {'fast err':>10s} {'err ratio':>9s}")
    for r in rows:
        for i, lr in enumerate(r["linears"]):
            head = (f"{'/'.join(x['linear'] for x in r['linears']):22s} {r['reference_s']:8.2f} {r['fast_s']:8.2f} "
                    f"{r['speedup']:7.1f}x" if i == 0 else " " * 49)
            print(f"{head}   {lr['linear']:10s} {lr['shape'][0]:>5d}×{lr['shape'][1]:<5d} "
                  f"{lr['reference_error']:10.3e} {lr['fast_error']:10.3e} {lr['error_ratio']:9.4f}")
    print(f"{'layer':22s} {layer['reference_s']:8.2f} {layer['fast_s']:8.2f} {layer['speedup']:7.1f}x   "
          f"worst error ratio {layer['worst_error_ratio']:.4f}")
    print("peak RSS (MiB): " + ", ".join(f"{key} {value:.0f}" for key, value in rss.items()))
    result = {"host": host_info(threads=args.threads),
              "config": {"tokens": args.tokens, "rounds": args.rounds, "bits": args.bits, "group_size": args.group_size,
                         "block_size": args.block_size, "quick": args.quick, "dtype": "float32",
                         "timing": "CPU seconds (time.process_time), median over rounds; implementations alternate "
                                   "which goes first; *_wall_* fields: wall clock; timed per input: the linears "
                                   "reading one input (q/k/v, gate/up) in one call for fast (as the pass does), "
                                   "one call each for reference"},
              "linears": rows, "layer": layer, "peak_rss_mib": rss}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
