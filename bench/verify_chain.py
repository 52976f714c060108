"""Benchmark: verifying the exact passes of the decoder pipeline one by one vs as one chain (issue 16).

On the graph `fxforge compile DIR --task text-generation-with-past --passes "quantize(bits=4)"`
has after canonicalize and quantize (a 4-layer TinyLlama-shaped Llama, bench/llm_e2e.py's
directory), the rest of that pipeline (fuse_projections, fuse_attention,
add_kv_cache(attention_mask=True)) runs with verification on, in one process, in interleaved
rounds:

  old   each exact pass verified alone (PassChain.joins forced off: the behaviour before)
  new   the three verified as one chain (passes/chained_verification.py)

The graph before the tail has its outputs kept, as quantize's check leaves them in the CLI.
Reports wall and CPU seconds per round, their medians, the new/old ratio, and the process's
peak RSS (both modes share the process; the chain holds no more graphs than a pass's check).

    python bench/verify_chain.py                 # builds the directory in a temp dir (~1.2 GB)
    python bench/verify_chain.py --hf DIR --rounds 3
Prints a table and writes bench/results/verify_chain.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", type=Path, help="a saved HF directory (default: build llm_e2e's, 4 layers)")
    parser.add_argument("--rounds", type=int, default=2)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fxforge-verify-chain-") as work:
        hf = ns.hf
        if hf is None:
            from llm_e2e import save_llama_dir

            hf = Path(work) / "hf"
            save_llama_dir(hf, 4)
        rows = measure(hf, ns.rounds)
    table(rows)
    out = ROOT / "bench" / "results" / "verify_chain.json"
    from fxforge.atomic import atomic_file

    with atomic_file(out) as path:
        path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


def measure(hf: Path, rounds: int) -> dict:
    import fxforge
    from fxforge.cli import with_task_passes
    from fxforge.ir.shapes import second_shape_inputs
    from fxforge.ir.verify import run_graph
    from fxforge.passes.chained_verification import PassChain
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import Pipeline
    from fxforge.passes.verification import _RESULT_OUTPUTS, _tensor_state
    from fxforge.text_generation import dynamic_batch_example

    loaded = fxforge.from_pretrained(hf, task="text-generation-with-past", seq=16, batch=2)
    specs = [p.spec() for p in Pipeline(with_task_passes("quantize(bits=4)", loaded.task_passes)).passes]
    head = [s for s in specs if s.split("(")[0] in ("canonicalize", "quantize")]
    tail = ",".join(s for s in specs if s not in head)
    kwargs, _ = dynamic_batch_example(loaded.kwargs)
    compiled = fxforge.compile(loaded.model, loaded.args, kwargs, passes=",".join(head), backend="eager")
    gm, inputs = compiled.graph_module, tuple(compiled.example_inputs)
    del loaded, compiled
    gc.collect()
    kept = [(tuple(s), run_graph(gm, s), _tensor_state(gm)) for s in (inputs, second_shape_inputs(gm, inputs))]
    joins = PassChain.joins

    def run(mode: str) -> dict:
        PassChain.joins = joins if mode == "new" else (lambda self, *a, **k: False)
        _RESULT_OUTPUTS[gm] = list(kept)  # as quantize's check leaves them
        ctx = PassContext(example_inputs=inputs)
        wall, cpu = time.perf_counter(), time.process_time()
        out, report = Pipeline(tail).run(gm, ctx)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
               "verify_s": round(sum(r.verify_seconds for r in report.records), 2),
               "max_error": [r.max_error for r in report.records]}
        del out, report
        gc.collect()
        return row

    runs: dict[str, list] = {"old": [], "new": []}
    try:
        for i in range(rounds):
            for mode in ("old", "new") if i % 2 == 0 else ("new", "old"):
                runs[mode].append(run(mode))
                print(f"round {i} {mode}: {runs[mode][-1]}", flush=True)
    finally:
        PassChain.joins = joins
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("wall_s", "cpu_s", "verify_s")} for m in runs}
    ratio = {k: statistics.median(n[k] / o[k] for n, o in zip(runs["new"], runs["old"])) for k in ("wall_s", "cpu_s")}
    return {"tail": tail, "rounds": runs, "median": med, "new_over_old": ratio,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def table(rows: dict) -> None:
    print(f"tail: {rows['tail']}")
    print(f"{'mode':<6}{'wall s':>10}{'cpu s':>10}{'verify s':>10}")
    for mode, m in rows["median"].items():
        print(f"{mode:<6}{m['wall_s']:>10.2f}{m['cpu_s']:>10.2f}{m['verify_s']:>10.2f}")
    r = rows["new_over_old"]
    print(f"new/old: wall {r['wall_s']:.3f}, cpu {r['cpu_s']:.3f}; peak RSS {rows['peak_rss_mib']} MiB")


if __name__ == "__main__":
    sys.exit(main())
