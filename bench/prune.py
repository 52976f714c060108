"""Benchmark: structured pruning and sparsity on code-lm, and Torch-Pruning on the same model.

One run measures, on the trained code-lm (Llama architecture with grouped-query attention):

* `prune` with FLAP, magnitude and Wanda-sp at 20% and 50%: held-out perplexity, parameters
  before/after, and for 20% FLAP the ONNX Runtime latency of the dense and the pruned model
  (same inputs, interleaved runs, median) and their ratio;
* `sparsify` with magnitude, Wanda and DSnoT at 50%, 60% and 2:4: held-out perplexity;
* Torch-Pruning (DepGraph, `torch_pruning`) at the same ratio on the same model: whether it
  runs, parameters removed, output error and perplexity.

Prints a table and writes bench/results/prune_<host>.json (CPU named inside).

    python bench/prune.py                  # code-lm small (cached after its first training)
    python bench/prune.py --variant tiny   # a quick run
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.ir.trace import trace
from fxforge.models.code_lm import load_code_lm, perplexity
from fxforge.models.code_lm_data import token_stream, windows_evenly_spaced
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.prune.prune import Prune
from fxforge.passes.prune.sparsify import Sparsify
from _host import cpu_name  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"


def _quiet(iterable, **_):
    return iterable


def _progress(row: dict) -> None:
    print(f"  {row['what']}: perplexity {row['ppl']:.3f}", flush=True)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


def onnx_latency(graphs: dict, inputs: tuple, repeats: int, threads: int) -> dict[str, float]:
    """Median seconds per run of each graph in ONNX Runtime, runs interleaved to share noise."""
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, gm in graphs.items():
            runners[name] = OnnxRunner(export_onnx(gm, inputs, Path(tmp) / f"{name}.onnx"), threads=threads)
        for runner in runners.values():
            for _ in range(3):
                runner(*inputs)  # warm-up
        times = {name: [] for name in runners}
        for _ in range(repeats):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner(*inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torch_pruning_llama(model: torch.nn.Module, ids: torch.Tensor, ratio: float) -> dict:
    """Prune a copy of the HF Llama with Torch-Pruning (magnitude, heads + channels, GQA-aware
    options as its LLM example sets them). Returns the pruned model or the error."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        output_transform=lambda out: _logits(out),
    )
    pruner.step()
    # HF attention reads these attributes; Torch-Pruning does not know them
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            q_heads = module.q_proj.out_features // module.head_dim
            kv_heads = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = max(q_heads // max(kv_heads, 1), 1)
    return {"model": model}


def _torch_pruning_row(model: torch.nn.Module, heldout: list[torch.Tensor], ratio: float) -> dict:
    try:
        pruned = torch_pruning_llama(model, heldout[0], ratio)["model"]
        with torch.no_grad():
            ref, got = _logits(model(heldout[0])), _logits(pruned(heldout[0]))
        return dict(runs=True, params_before=_params(model), params_after=_params(pruned),
                    rel_output_error=float((got - ref).norm() / ref.norm()), ppl=perplexity(pruned, heldout))
    except Exception as exc:  # report, do not hide: the comparison is whether it works at all
        return dict(runs=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))


def run_with_timeout(fn, timeout: float) -> dict:
    """fn() -> dict in a forked child; {"runs": False, "error": ...} if it fails or times out."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(fn()))
    start = time.perf_counter()
    child.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = dict(runs=False, error=f"did not finish within {timeout:.0f} s (killed)")
    child.join(timeout=5)
    if child.is_alive():
        child.kill()
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=["small", "tiny"])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tp-timeout", type=float, default=300, help="seconds for Torch-Pruning")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    lm = load_code_lm(args.variant)
    seq = min(args.seq, lm.variant.context)
    heldout = lm.heldout_batches(seq_len=seq, max_batches=args.eval_batches, batch_size=4)
    stream = token_stream(lm.tokenizer, lm.train_texts()[:200])
    calibration = [(w,) for w in windows_evenly_spaced(stream, seq, 64).split(4)]
    gm = trace(lm.model, (heldout[0],), {}, dynamic_shapes="auto")
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    ctx = PassContext(example_inputs=(heldout[0],), calibration=calibration, progress=_quiet)

    def ppl(graph) -> float:
        return perplexity(lambda ids: graph(ids), heldout)

    dense_params = _params(gm)
    rows = [{"what": "dense", "ppl": ppl(gm), "params": dense_params, "seconds": 0.0}]
    _progress(rows[-1])
    pruned_graphs = {}
    for ratio in (0.2, 0.5):
        for method in ("flap", "wanda_sp", "magnitude"):
            report = PipelineReport()
            start = time.perf_counter()
            out = run_pass(Prune(method=method, ratio=ratio), gm, ctx, report=report, verify=False)
            seconds = time.perf_counter() - start
            pruned_graphs[(method, ratio)] = out
            rows.append({"what": f"prune {method} {ratio:.0%}", "ppl": ppl(out), "params": _params(out),
                         "seconds": seconds, "widths": report.records[-1].notes["widths"]})
            _progress(rows[-1])
    for spec in (dict(method="magnitude", sparsity=0.5), dict(method="wanda", sparsity=0.5),
                 dict(method="magnitude", pattern="2:4"), dict(method="wanda", pattern="2:4"),
                 dict(method="dsnot", pattern="2:4"),
                 dict(method="magnitude", sparsity=0.6), dict(method="wanda", sparsity=0.6),
                 dict(method="dsnot", sparsity=0.6)):
        start = time.perf_counter()
        out = run_pass(Sparsify(**spec), gm, ctx, verify=False)
        seconds = time.perf_counter() - start
        label = spec.get("pattern", f"{spec.get('sparsity', 0):.0%}")
        rows.append({"what": f"sparsify {spec['method']} {label}", "ppl": ppl(out), "params": dense_params,
                     "seconds": seconds})
        _progress(rows[-1])

    # ONNX Runtime latency, dense vs 20% FLAP, batch 4 x seq tokens
    try:
        latency = onnx_latency({"dense": gm, "flap20": pruned_graphs[("flap", 0.2)]}, (heldout[0],),
                               args.repeats, args.threads)
    except Exception as exc:  # keep the rows measured so far; say why latency is missing
        print(f"  onnx latency failed: {type(exc).__name__}: {exc}", flush=True)
        latency = {"dense": float("nan"), "flap20": float("nan"), "error": f"{type(exc).__name__}: {exc}"}

    print(f"  onnx latency: {latency}", flush=True)

    # Torch-Pruning on the same model and ratio, in a child process: it can hang on HF models
    tp_result = run_with_timeout(lambda: _torch_pruning_row(lm.model, heldout, 0.2), args.tp_timeout)
    tp_result["ratio"] = 0.2
    flap20 = pruned_graphs[("flap", 0.2)]
    with torch.no_grad():
        ref, got = _logits(gm(heldout[0])), _logits(flap20(heldout[0]))
    fx_error = float((got - ref).norm() / ref.norm())

    print(f"\ncode-lm {args.variant}: {dense_params:,} parameters, held-out {len(heldout)}x4x{seq} tokens, "
          f"CPU {cpu_name()}, {args.threads} thread(s)")
    print(f"{'configuration':<28}{'perplexity':>12}{'parameters':>13}{'removed':>9}{'time':>8}")
    for r in rows:
        removed = 1 - r["params"] / dense_params
        print(f"{r['what']:<28}{r['ppl']:>12.3f}{r['params']:>13,}{removed:>9.1%}{r['seconds']:>7.1f}s")
    speedup = latency["dense"] / latency["flap20"]
    print(f"\nONNX Runtime, batch 4 x {seq}: dense {latency['dense'] * 1e3:.2f} ms, FLAP 20% "
          f"{latency['flap20'] * 1e3:.2f} ms -> {speedup:.2f}x faster")
    if tp_result["runs"]:
        print(f"Torch-Pruning 20%: runs; parameters {tp_result['params_before']:,} -> "
              f"{tp_result['params_after']:,}; relative output error {tp_result['rel_output_error']:.3f}; "
              f"perplexity {tp_result['ppl']:.3f}  (fxforge FLAP 20%: error {fx_error:.3f})")
    else:
        print(f"Torch-Pruning 20%: fails: {tp_result['error']}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    host = platform.node() or "host"
    result = {
        "bench": "prune", "model": f"code-lm-{args.variant}", "host": host, "cpu": cpu_name(),
        "threads": args.threads, "torch": torch.__version__, "heldout_tokens": len(heldout) * 4 * seq,
        "rows": rows, "onnx_latency_s": latency, "onnx_speedup_flap20": speedup,
        "fxforge_flap20_rel_output_error": fx_error,
        "torch_pruning": {k: v for k, v in tp_result.items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    path = RESULTS / f"prune_cpu_{args.variant}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
