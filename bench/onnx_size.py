"""Benchmark: the ONNX backend's file before and after post-export optimization (issue 16, item 4).

For zoo tiny-llama, tiny-gpt2, tiny-bert, minilm and a 2-layer TinyLlama-shaped Llama (hidden
2048, 32 heads, 4 KV heads, intermediate 5632, vocab 32000, random weights), exported with
`export_onnx(optimize=False)` (the exporter's raw graph, what the backend wrote before) and
`export_onnx()` (optimized):

* node count, Constant / Cast / Transpose counts, top op types, file size, export seconds
  (trace excluded; the optimized export includes the optimization);
* ORT CPU latency of one forward on the example inputs: both sessions open in this process,
  timed in interleaved rounds (2 threads, no spinning), median;
* whether ORT's `MatMulNBitsQuantizer` (int4, block 32) can quantize the fp32 file: the
  number of MatMulNBits nodes it produces.

ORT's graph fusions are not applied to the files (ORT applies them at session creation, here
at its default level in both sessions).

    python bench/onnx_size.py                  # all models (~5-10 min on 2 busy cores)
    python bench/onnx_size.py --models tiny-llama tiny-gpt2 --rounds 20
Prints a table and writes bench/results/onnx_size.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from _host import host_info  # bench/ is on sys.path when a script runs
from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import flatten_inputs, trace

RESULTS = Path(__file__).parent / "results"
ZOO = ("tiny-llama", "tiny-gpt2", "tiny-bert", "minilm")
LLAMA = "llama-2048x2"


def traced(name: str) -> tuple[torch.fx.GraphModule, list[Any]]:
    """(canonical graph, flat example inputs) of a zoo model or the TinyLlama-shaped Llama."""
    if name == LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                             use_cache=False, attn_implementation="eager")
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        args, kwargs = (torch.randint(0, 32000, (1, 16)),), {}
    else:
        from fxforge.models import get_model

        zoo = get_model(name)
        model, args, kwargs = zoo.model, zoo.args, zoo.kwargs
    gm = trace(model, args, kwargs)
    canonicalize(gm)
    return gm, flatten_inputs(gm, args, kwargs)


def describe(path: Path, export_s: float) -> dict[str, Any]:
    """Node counts, op histogram and size of an ONNX file (external data included)."""
    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
    return {"nodes": len(model.graph.node), "Constant": ops["Constant"], "Cast": ops["Cast"],
            "Transpose": ops["Transpose"], "top_ops": ops.most_common(6), "bytes": size,
            "export_s": round(export_s, 2)}


def nbits_quantizable(path: Path) -> int:
    """How many MatMulNBits nodes ORT's MatMulNBitsQuantizer makes of the file (int4, block 32)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.WARNING)  # the quantizer's module sets the root logger to INFO
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    return sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)


def latencies(paths: dict[str, Path], inputs: list[Any], rounds: int) -> dict[str, float]:
    """Median ms of one forward per file, sessions timed in interleaved rounds."""
    runners = {k: OnnxRunner(p, threads=2, spinning=False) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for runner in runners.values():  # warm-up
        runner(*inputs)
    for _ in range(rounds):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner(*inputs)
            times[key].append((time.perf_counter() - start) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def bench(name: str, rounds: int, workdir: Path) -> dict[str, Any]:
    gm, inputs = traced(name)
    paths, row = {}, {"model": name}
    for variant, optimize in (("before", False), ("after", True)):
        path = workdir / name / variant / "model.onnx"
        start = time.perf_counter()
        export_onnx(gm, inputs, path, optimize=optimize)
        row[variant] = describe(path, time.perf_counter() - start)
        row[variant]["matmulnbits_from_ort_quantizer"] = nbits_quantizable(path)
        paths[variant] = path
    for variant, ms in latencies(paths, inputs, rounds).items():
        row[variant]["ort_ms"] = ms
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("nodes", "Constant", "Cast", "Transpose", "bytes", "export_s", "ort_ms", "matmulnbits_from_ort_quantizer")
    heads = ("nodes", "Const", "Cast", "Transp", "MB", "export s", "ORT ms", "ORT int4 nodes")
    print(f"{'model':<14}{'':<7}" + "".join(f"{h:>15}" for h in heads))
    for row in rows:
        for variant in ("before", "after"):
            values = [row[variant][c] / 2**20 if c == "bytes" else row[variant][c] for c in cols]
            print(f"{row['model'] if variant == 'before' else '':<14}{variant:<7}"
                  + "".join(f"{v:>15.2f}" if isinstance(v, float) else f"{v:>15}" for v in values))
        print(f"{'':<21}top ops after: {row['after']['top_ops']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[*ZOO, LLAMA])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxforge-onnx-size-") as tmp:
        for name in args.models:
            rows.append(bench(name, args.rounds, Path(tmp)))
            print(f"done {name}", flush=True)
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "onnx_size.json"
    out.write_text(json.dumps({"host": host_info(ort_threads=2, rounds=args.rounds), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
