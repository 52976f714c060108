"""Decoder export phases, the export's shortcuts on vs off, interleaved in one process.

On one compiled graph (the 4-layer TinyLlama-shaped HF directory of bench/llm_e2e.py, compiled as
`fxforge compile DIR --task text-generation-with-past` compiles it), `write_decoder_onnx` +
`check_decoder_onnx` run in alternating rounds with

  new  torch.onnx is handed an ExportedProgram built from the graph's metadata
       (backends/onnx/exported_program.py) and onnxscript's optimizer runs with its multi-output
       rule guarded (optimize.optimize_ir_once);
  old  the GraphModule (torch.export re-traces it) and `onnxscript.optimizer.optimize_ir`.

Prints per-phase medians (torch.onnx.export, optimize_model, write_model, fuse_for_ort, totals),
whether the two decoder files are the same graph (node structure, weights, I/O; value names
aside) and the peak RSS, and writes bench/results/onnx_export_phases.json.

    python bench/onnx_export_phases.py [--passes "quantize(bits=4)"] [--layers 4] [--rounds 2]
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def graph_signature(path: Path) -> tuple:
    """(sorted node hashes, output hashes, weights) of an ONNX file: each node hashed by its op,
    attributes and the hashes of what feeds it, so value names and node order do not count."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: (node, i) for node in graph.node for i, out in enumerate(node.output)}
    weights = {}
    for t in graph.initializer:
        key = "" if t.name.startswith("val_") else t.name  # generated constant names follow node numbering
        weights.setdefault(t.name, hashlib.sha1(key.encode() + str(t.data_type).encode() + str(list(t.dims)).encode()
                                                + numpy_helper.to_array(t).tobytes()).hexdigest())
    inputs = {v.name for v in graph.input}
    memo: dict[int, str] = {}

    def value(name: str) -> str:
        if not name:
            return "none"
        if name in weights:
            return "w:" + weights[name]
        if name in inputs:
            return "in:" + name
        node, index = producer[name]
        if id(node) not in memo:
            parts = [node.domain, node.op_type, *sorted(a.SerializeToString().hex() for a in node.attribute),
                     *(value(i) for i in node.input)]
            memo[id(node)] = hashlib.sha1("|".join(parts).encode()).hexdigest()
        return f"{memo[id(node)]}:{index}"

    nodes = sorted(value(node.output[0]) for node in graph.node)
    io = [(v.name, v.type.tensor_type.elem_type) for v in (*graph.input, *graph.output)]
    return nodes, [value(o.name) for o in graph.output], sorted(weights.values()), io


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import onnxscript.optimizer
    import torch.onnx

    import fxforge
    from fxforge import decoder_artifact as da
    from fxforge.backends.onnx import backend, optimize
    from fxforge.cli import with_task_passes
    from fxforge.text_generation import dynamic_batch_example
    from llm_e2e import save_llama_dir

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(label, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - start
        return inner

    torch.onnx.export = timed("torch.onnx.export", torch.onnx.export)
    optimize.optimize_model = timed("optimize_model", optimize.optimize_model)
    backend.write_model = timed("write_model", backend.write_model)
    da.fuse_for_ort = timed("fuse_for_ort", da.fuse_for_ort)
    new_program, new_optimize = backend.program_for_export, optimize.optimize_ir_once

    def old_optimize(model, should_fold):
        onnxscript.optimizer.optimize_ir(model, num_iterations=1, should_fold=should_fold)

    with tempfile.TemporaryDirectory(prefix="fxforge-onnx-phases-") as tmp:
        work = Path(tmp)
        save_llama_dir(work / "hf", args.layers)
        loaded = fxforge.from_pretrained(work / "hf", task="text-generation-with-past", seq=16, batch=2)
        kwargs, _ = dynamic_batch_example(loaded.kwargs)
        compiled = fxforge.compile(loaded.model, loaded.args, kwargs, backend="eager",
                                   passes=with_task_passes(args.passes, loaded.task_passes))
        rows: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for rnd in range(args.rounds):
            for mode in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                backend.program_for_export = new_program if mode == "new" else (lambda gm, inputs: gm)
                optimize.optimize_ir_once = new_optimize if mode == "new" else old_optimize
                (work / mode).mkdir(exist_ok=True)
                path = work / mode / "model.onnx"
                spent.clear()
                start = time.perf_counter()
                da.write_decoder_onnx(compiled, path, rotary_length=2048)
                spent["write_decoder_onnx"] = time.perf_counter() - start
                start = time.perf_counter()
                da.check_decoder_onnx(compiled, path)
                spent["check_decoder_onnx"] = time.perf_counter() - start
                rows[mode].append(dict(spent))
        same = graph_signature(work / "old" / "model.onnx") == graph_signature(work / "new" / "model.onnx")
        nodes = len(graph_signature(work / "new" / "model.onnx")[0])

    medians = {mode: {k: statistics.median(r[k] for r in rows[mode]) for k in rows[mode][0]} for mode in rows}
    print(f"{'phase':<22}{'old s':>9}{'new s':>9}{'new/old':>9}")
    for phase in medians["old"]:
        old, new = medians["old"][phase], medians["new"][phase]
        print(f"{phase:<22}{old:9.2f}{new:9.2f}{new / old if old else float('nan'):9.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"same decoder graph: {same} ({nodes} nodes); peak RSS {peak:.0f} MiB")
    out = ROOT / "bench" / "results" / "onnx_export_phases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"passes": args.passes, "layers": args.layers, "rounds": rows, "medians": medians,
                               "same_graph": same, "nodes": nodes, "peak_rss_mib": round(peak)}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
