"""Benchmark: accuracy and ONNX Runtime speed of fxforge's quantization passes (issue 3).

Accuracy, one row per pass configuration:
* minilm (pretrained all-MiniLM-L6-v2): mean and minimum cosine of sentence embeddings against
  fp32, on sentences not used for calibration (first 16 sample sentences calibrate, the rest
  evaluate);
* code-lm (trained by fxforge; `--variant small` by default, `tiny` for a quick run): held-out
  perplexity; calibration windows come from the training split.
Rows: rtn/awq/gptq/easyquant at 8, 4 and 3 bits (same group size within a model), llm_int8,
w8a8 (quantize_dynamic), fp8 and fp4 (quantize_fp, when that pass is present); parameter bytes
of each quantized graph ("size").

Speed: a Llama-shaped model with hidden 2048 (linears dominate) exported to ONNX fp32, int4 g128
(MatMulNBits) and W8A8, timed in one run with 2 ORT threads, interleaved, median of repeats:
single-token and 128-token forwards; ONNX file sizes; weight bytes streamed per second during
the single-token forward as a fraction of this machine's measured memory read bandwidth.

    python bench/quantize.py                    # everything (about 15-25 min on 2 busy cores)
    python bench/quantize.py --variant tiny --skip-speed
Prints tables and writes bench/results/quantize_<host>.json (CPU named inside).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import linear_sites, summarize
from fxforge.ir.trace import trace
from fxforge.ir.verify import run_graph
from fxforge.passes.base import Pass
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.registry import get_pass_class, registered_passes
from _host import cpu_name  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"
METHODS = ("rtn", "awq", "gptq", "easyquant")


def _quiet(iterable=None, **_: Any):
    return iterable


def pass_rows(group_size: int) -> list[tuple[str, Callable[[], Pass]]]:
    """(label, pass factory) for every accuracy row; fp rows only if quantize_fp is registered."""
    quantize = get_pass_class("quantize")
    rows: list[tuple[str, Callable[[], Pass]]] = []
    for bits in (8, 4, 3):
        for method in METHODS:
            rows.append((f"{method} w{bits} g{group_size}",
                         lambda b=bits, m=method: quantize(bits=b, group_size=group_size, method=m)))
    rows.append(("llm_int8 (t=6)", lambda: get_pass_class("llm_int8")()))
    rows.append(("w8a8 dynamic", lambda: get_pass_class("quantize_dynamic")()))
    if "quantize_fp" in registered_passes():
        fp = get_pass_class("quantize_fp")
        rows.append(("fp8 e4m3 per-channel", lambda: fp(fmt="e4m3")))
        rows.append((f"fp4 e2m1 g{group_size}", lambda: fp(fmt="e2m1", group_size=group_size)))
        rows.append(("fp8 e4m3 w8a8 (fp8 act)", lambda: fp(fmt="e4m3", act_fmt="e4m3")))
    return rows


def run_rows(gm, ctx: PassContext, rows, metric: Callable[[Any], dict]) -> list[dict]:
    results = [{"config": "fp32", "size_bytes": summarize(gm).total_param_bytes, **metric(gm)}]
    print(_row_text(results[-1]), flush=True)
    for label, make in rows:
        start = time.perf_counter()
        try:
            quantized = run_pass(make(), gm, ctx, verify=False)
            record = {"config": label, "size_bytes": summarize(quantized).total_param_bytes, **metric(quantized)}
        except Exception as exc:  # a failing row is reported, not fatal to the table
            record = {"config": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
            traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - start, 1)
        results.append(record)
        print(_row_text(record), flush=True)
    return results


def _row_text(r: dict) -> str:
    if "error" in r:
        return f"  {r['config']:<28} ERROR {r['error'][:90]}"
    metrics = "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                        if k not in ("config", "size_bytes", "seconds"))
    return f"  {r['config']:<28} size={r['size_bytes'] / 2**20:7.2f} MiB  {metrics}"


# --------------------------------------------------------------------------- accuracy


def accuracy_minilm() -> dict:
    from fxforge.models import get_model
    from fxforge.models.minilm import minilm_sentences, tokenize

    zoo = get_model("minilm")
    gm = trace(zoo.model, zoo.args, zoo.kwargs)
    canonicalize(gm)
    sentences = minilm_sentences()
    calib_sentences, eval_sentences = sentences[:16], sentences[16:]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    calibration = [tokenize(calib_sentences[i:i + 4]) for i in range(0, len(calib_sentences), 4)]
    eval_inputs = tokenize(eval_sentences)
    flat = [eval_inputs[n] for n in names]
    reference = run_graph(gm, flat)[0]

    def metric(g) -> dict:
        emb = run_graph(g, flat)[0]
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}

    ctx = PassContext(example_inputs=tuple(flat), calibration=calibration, progress=_quiet)
    print(f"minilm: {len(calib_sentences)} calibration sentences, {len(eval_sentences)} evaluation sentences")
    rows = run_rows(gm, ctx, pass_rows(128), metric)
    return {"model": "minilm (all-MiniLM-L6-v2)", "group_size": 128, "calibration_sentences": len(calib_sentences),
            "eval_sentences": len(eval_sentences), "rows": rows}


def accuracy_code_lm(variant: str, eval_batches: int | None = None) -> dict:
    from fxforge.models.code_lm import load_code_lm, perplexity
    from fxforge.models.code_lm_data import token_stream, windows_evenly_spaced

    lm = load_code_lm(variant)
    batches = lm.heldout_batches(max_batches=eval_batches)
    gm = trace(lm.model, (batches[0],), {})
    canonicalize(gm)
    seq = batches[0].shape[1]
    stream = token_stream(lm.tokenizer, lm.train_texts()[:200])
    calibration = [(w,) for w in windows_evenly_spaced(stream, seq, 16).split(4)]
    # the largest of 128/64/32 dividing every layer's input width (small's MLP is 704 = 11·64 wide)
    group = next(g for g in (128, 64, 32) if all(s.in_features % g == 0 for s in linear_sites(gm)))

    def metric(g) -> dict:
        return {"heldout_ppl": perplexity(lambda ids: run_graph(g, (ids,))[0], batches)}

    ctx = PassContext(example_inputs=(batches[0],), calibration=calibration, progress=_quiet)
    print(f"code-lm ({variant}): {lm.info.get('parameters')} parameters, {len(batches)} held-out batches of "
          f"{tuple(batches[0].shape)}, {len(calibration)} calibration batches, group size {group}")
    rows = run_rows(gm, ctx, pass_rows(group), metric)
    return {"model": f"code-lm ({variant})", "group_size": group, "heldout_batches": len(batches),
            "heldout_batch_shape": list(batches[0].shape), "rows": rows}


# --------------------------------------------------------------------------- speed


def memory_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second numpy sums a buffer larger than the caches (best of `repeats`)."""
    buffer = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def speed_table(hidden: int, layers: int, repeats: int, threads: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fxforge.backends.onnx.backend import OnnxRunner, export_onnx

    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 128 * 128,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 256,
                         max_position_embeddings=512, use_cache=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    example = torch.randint(0, 256, (1, 8))
    gm = trace(model, (example,), {})
    canonicalize(gm)
    ctx = PassContext(example_inputs=(example,), progress=_quiet)
    linear_params = sum(s.in_features * s.out_features for s in linear_sites(gm))
    variants = {"fp32": gm,
                "int4 g128 (rtn, MatMulNBits)": run_pass(get_pass_class("quantize")(bits=4, group_size=128), gm, ctx, verify=False),
                "w8a8 dynamic (DynamicQuantizeMatMul)": run_pass(get_pass_class("quantize_dynamic")(), gm, ctx, verify=False)}
    workdir = Path(tempfile.mkdtemp(prefix="fxforge_qbench_"))
    runners, info = {}, {}
    for name, g in variants.items():
        path = export_onnx(g, (example,), workdir / f"{name.split()[0]}.onnx")
        linear_bytes = sum(t.numel() * t.element_size() for n, t in list(g.named_parameters()) + list(g.named_buffers())
                           if any(n.startswith(s.module_path + ".") for s in linear_sites(gm)))
        info[name] = {"onnx_bytes": path.stat().st_size + sum(p.stat().st_size for p in workdir.glob(path.name + "*.data")),
                      "linear_weight_bytes": linear_bytes}
        runners[name] = OnnxRunner(path, threads=threads)
        del g
    shutil.rmtree(workdir, ignore_errors=True)  # the sessions hold the models: leave nothing in the temp dir
    inputs = {"1 token": torch.randint(0, 256, (1, 1)), "128 tokens": torch.randint(0, 256, (1, 128))}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):  # interleaved, so load from other users hits every variant alike
        for shape, ids in inputs.items():
            for name, runner in runners.items():
                start = time.perf_counter()
                runner(ids)
                times.setdefault((name, shape), []).append(time.perf_counter() - start)
    bandwidth = memory_read_bandwidth()
    rows = []
    for name in runners:
        row = {"config": name, **info[name]}
        for shape in inputs:
            row[f"{shape} ms"] = 1000 * statistics.median(times[(name, shape)])
            row[f"{shape} speedup"] = statistics.median(times[("fp32", shape)]) / statistics.median(times[(name, shape)])
        streamed = info[name]["linear_weight_bytes"] / (row["1 token ms"] / 1000)
        row["1 token weight GB/s"] = streamed / 1e9
        row["fraction of read bandwidth"] = streamed / bandwidth
        rows.append(row)
    return {"model": f"Llama-shaped, hidden {hidden}, intermediate {config.intermediate_size}, {layers} layers, "
                     f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, vocab 256",
            "linear_parameters": linear_params, "threads": threads, "repeats": repeats,
            "memory_read_bandwidth_GBps": bandwidth / 1e9, "rows": rows}


def print_speed(result: dict) -> None:
    print(f"\nSpeed: {result['model']}; ORT threads={result['threads']}; median of {result['repeats']}; "
          f"memory read bandwidth {result['memory_read_bandwidth_GBps']:.1f} GB/s")
    print(f"  {'config':<32}{'onnx MiB':>10}{'1 tok ms':>10}{'x fp32':>8}{'128 tok ms':>12}{'x fp32':>8}"
          f"{'GB/s':>7}{'of bw':>7}")
    for r in result["rows"]:
        print(f"  {r['config']:<32}{r['onnx_bytes'] / 2**20:>10.1f}{r['1 token ms']:>10.2f}{r['1 token speedup']:>8.2f}"
              f"{r['128 tokens ms']:>12.1f}{r['128 tokens speedup']:>8.2f}{r['1 token weight GB/s']:>7.1f}"
              f"{r['fraction of read bandwidth']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="small", choices=("small", "tiny"), help="code-lm variant")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--only", choices=("minilm", "code-lm"), help="one accuracy model only")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="code-lm held-out batches (default: the variant's, 16 for small)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("FXFORGE_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    host = platform.node() or "host"
    out = args.out or RESULTS / f"quantize_{host}.json"
    result: dict[str, Any] = {"host": host, "cpu": cpu_name(), "cores": os.cpu_count(),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if out.exists():  # keep the parts of an earlier run this one skips
        result = {**json.loads(out.read_text()), **result}
    if not args.skip_accuracy:
        if args.only in (None, "minilm"):
            print("\nAccuracy: minilm")
            result["minilm"] = accuracy_minilm()
        if args.only in (None, "code-lm"):
            print(f"\nAccuracy: code-lm ({args.variant})")
            result["code_lm"] = accuracy_code_lm(args.variant, args.eval_batches)
    if not args.skip_speed:
        result["speed"] = speed_table(args.hidden, args.layers, args.repeats, args.threads)
        print_speed(result["speed"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
