"""ONNX clean-up of the int4 KV decoder, step by step: node count and seconds after each step.

    python bench/onnx_cleanup.py [--layers 4] [--hidden 256] [--optimizer-iterations 1 2]

Builds a TinyLlama-shaped Llama (32 heads, 4 KV heads, `--layers` layers; `--hidden` scales the
widths, which changes no node count, so the default keeps it quick), compiles it the way
`fxforge compile --task text-generation-with-past --passes "quantize(bits=4)"` does (eager, the
task's passes), exports the cached graph once without optimization, then applies
`fxforge.backends.onnx.optimize`'s steps one at a time, counting nodes (by op type) after each.
Each `--optimizer-iterations` value runs the steps on a fresh raw export. Writes
bench/results/onnx_cleanup.json; peak RSS is printed next to the times.
"""
from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_decoder(layers: int, hidden: int):
    import torch
    import transformers as tf

    import fxforge
    from fxforge.text_generation import with_passes

    config = tf.LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 3,
                            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                            max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    passes = with_passes("quantize(bits=4)", ("fuse_attention", "add_kv_cache(attention_mask=True)"))
    model.config.use_cache = False
    return fxforge.compile(model, (), {"input_ids": ids, "use_cache": False, "return_dict": False},
                           passes=passes, backend="eager", verify=False)


def op_counts(model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.all_nodes()).most_common())


def steps(iterations: int):
    import onnx_ir.passes.common as ir_passes
    import onnxscript.optimizer

    from fxforge.backends.onnx import optimize as o

    return [
        ("fold_weight_layouts", lambda m: o.fold_weight_layouts(m.graph)),
        (f"onnxscript optimize_ir (num_iterations={iterations})",
         lambda m: onnxscript.optimizer.optimize_ir(m, num_iterations=iterations, should_fold=o.keeps_storage_compact)),
        ("fold_weight_layouts again", lambda m: o.fold_weight_layouts(m.graph)),
        ("gemm_weights_to_matmul", lambda m: o.gemm_weights_to_matmul(m.graph)),
        ("RemoveUnusedNodesPass", lambda m: ir_passes.RemoveUnusedNodesPass()(m)),
        ("strip_debug_metadata", o.strip_debug_metadata),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--optimizer-iterations", type=int, nargs="+", default=[1, 2])
    ns = parser.parse_args()

    from fxforge.backends.onnx.backend import export_model
    from fxforge.runtime.decoding import example_cached_inputs

    compiled = build_decoder(ns.layers, ns.hidden)
    gm = compiled.graph_module
    start = time.perf_counter()
    raw = export_model(gm, example_cached_inputs(gm, batch=2), optimize=False)
    export_s = time.perf_counter() - start
    rows = {"layers": ns.layers, "hidden": ns.hidden, "export_s": round(export_s, 2),
            "raw_nodes": sum(1 for _ in raw.graph.all_nodes()), "raw_ops": op_counts(raw), "runs": {}}
    print(f"raw export: {rows['raw_nodes']} nodes in {export_s:.2f}s")
    for iterations in ns.optimizer_iterations:
        model = raw if iterations == ns.optimizer_iterations[0] else \
            export_model(gm, example_cached_inputs(gm, batch=2), optimize=False)  # a fresh raw export
        table = []
        for name, step in steps(iterations):
            start = time.perf_counter()
            step(model)
            table.append({"step": name, "seconds": round(time.perf_counter() - start, 3),
                          "nodes": sum(1 for _ in model.graph.all_nodes())})
            print(f"  {name:<45} {table[-1]['seconds']:>7.3f}s  {table[-1]['nodes']:>5} nodes")
        rows["runs"][str(iterations)] = {"steps": table, "ops": op_counts(model)}
        print(f"  final ops: {op_counts(model)}")
    rows["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS {rows['peak_rss_mib']} MiB")
    out = ROOT / "bench" / "results" / "onnx_cleanup.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
