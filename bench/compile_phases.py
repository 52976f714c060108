"""CPU seconds per phase of one `fxforge compile DIR --task text-generation-with-past` (issue 16).

Runs the CLI in this process with no profiler (cProfile doubles the Python-heavy phases) and adds
up the process CPU time spent inside a set of pipeline and backend functions (inclusive; a function
re-entered inside itself counts once). CPU time, not wall time, so that it stays comparable on a
loaded machine; run it with OMP_NUM_THREADS=1 there, since 2 OpenMP threads competing for a
loaded core spin and multiply the CPU time of small tensor ops (the clip search took 10x).

    OMP_NUM_THREADS=1 python bench/compile_phases.py --hf DIR            # quantize(bits=4)
    OMP_NUM_THREADS=1 python bench/compile_phases.py --hf DIR --passes ""  # fp32
    python bench/compile_phases.py                  # builds llm_e2e's 4-layer directory first (~1.2 GB)

Prints the phases, largest first, then the per-call CPU of each graph run and shape propagation
in order; writes bench/results/compile_phases.json.
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# (module, function or Class.method): where a decoder compile spends its time
PHASES = [
    ("fxforge.models.hf", "from_pretrained"), ("fxforge.ir.trace", "trace"),
    ("fxforge.ir.canonicalize", "canonicalize"), ("fxforge.ir.graph", "refresh_meta"),
    ("fxforge.passes.pipeline", "run_pass"), ("fxforge.passes.cow", "structural_copy"),
    ("fxforge.passes.verification", "verify_pass"), ("fxforge.passes.verification", "verify_chain"),
    ("fxforge.passes.verification", "_check_shape"), ("fxforge.ir.verify", "run_graph"),
    ("fxforge.ir.lockstep", "run_graph_many"),
    ("fxforge.passes.kv_cache.add_kv_cache", "AddKvCache.verify"),
    ("fxforge.passes.quantize", "Quantize.run"), ("fxforge.passes.quantize.rtn", "mse_clip"),
    ("fxforge.passes.quantize.rtn", "quantize_matrix"), ("fxforge.passes.quantize", "claimed_weight"),
    ("fxforge.ir.ops.linear_wq", "dequantize_wq"),
    ("fxforge.api", "compile"), ("fxforge.decoder_artifact", "export_decoder"),
    ("fxforge.decoder_artifact", "write_decoder_onnx"), ("fxforge.decoder_artifact", "check_decoder_onnx"),
    ("fxforge.decoder_artifact", "fuse_for_ort"), ("fxforge.backends.onnx.backend", "export_model"),
    ("fxforge.backends.onnx.backend", "write_model"),
]
SEQUENCE = {"run_graph", "run_graph_many", "refresh_meta"}  # also listed call by call
CLOCK = [time.process_time]  # --wall: time.perf_counter (on an idle machine, with every thread)


def instrument(totals: dict, counts: collections.Counter, sequence: list) -> None:
    """Wrap each PHASES function in place (and where another fxforge module imported it by name)."""
    wrapped = {}
    for module_name, attr in PHASES:
        module = importlib.import_module(module_name)
        owner, name = module, attr
        if "." in attr:
            cls, name = attr.split(".")
            owner = getattr(module, cls)
        original = getattr(owner, name)
        label = f"{module_name.rsplit('.', 1)[-1]}.{attr}"
        setattr(owner, name, _timed(original, label, name in SEQUENCE, totals, counts, sequence))
        if owner is module:
            wrapped[id(original)] = (original, getattr(owner, name))
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fxforge"):
            for key, value in list(vars(module).items()):
                if id(value) in wrapped and wrapped[id(value)][0] is value:
                    setattr(module, key, wrapped[id(value)][1])


def _timed(fn, label, listed, totals, counts, sequence):
    depth = [0]

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        start = CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            spent = CLOCK[0]() - start
            totals[label] += spent
            counts[label] += 1
            if listed:
                sequence.append((label.rsplit(".", 1)[-1], round(spent, 3)))
    return timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, help="a saved HF directory (default: build llm_e2e's, 4 layers)")
    parser.add_argument("--passes", default="quantize(bits=4)")
    parser.add_argument("--wall", action="store_true",
                        help="wall seconds per phase instead of CPU seconds (meaningful only on an idle machine)")
    ns = parser.parse_args()
    if ns.wall:
        CLOCK[0] = time.perf_counter
    import torch

    totals, counts, sequence = collections.defaultdict(float), collections.Counter(), []
    with tempfile.TemporaryDirectory(prefix="fxforge-compile-phases-") as work:
        hf = ns.hf
        if hf is None:
            from llm_e2e import save_llama_dir

            hf = Path(work) / "hf"
            save_llama_dir(hf, 4)
        instrument(totals, counts, sequence)
        from fxforge.cli import main as cli

        argv = ["compile", str(hf), "--task", "text-generation-with-past", "--backend", "onnx",
                "-o", str(Path(work) / "out")] + (["--passes", ns.passes] if ns.passes else [])
        start, wall = time.process_time(), time.perf_counter()
        cli(argv)
        total, wall = time.process_time() - start, time.perf_counter() - wall
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ncompile: {total:.2f} CPU s, {wall:.1f} wall s, {torch.get_num_threads()} thread(s), "
          f"peak RSS {rss:.0f} MiB")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:45s} {seconds:7.2f}  x{counts[label]}")
    print("in order:", ", ".join(f"{name} {s:.2f}" for name, s in sequence))
    out = ROOT / "bench" / "results" / "compile_phases.json"
    from fxforge.atomic import atomic_file

    with atomic_file(out) as path:
        path.write_text(json.dumps({"passes": ns.passes, "cpu_s": round(total, 2), "wall_s": round(wall, 1),
                                    "threads": torch.get_num_threads(), "peak_rss_mib": round(rss),
                                    "phases": {k: round(v, 2) for k, v in totals.items()},
                                    "calls": dict(counts), "sequence": sequence}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
