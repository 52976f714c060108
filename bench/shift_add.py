"""Benchmark of the `shift_add` pass (ShiftAddLLM) against RTN and GPTQ at the same bits.

In one run, on two trained models:
  code-lm (small, ~4M parameters)  held-out perplexity (lower is better)
  minilm  (all-MiniLM-L6-v2)       cosine of each held-out sentence embedding to the float
                                   model's (mean and worst; higher is better)
for: the float model; `quantize` with method rtn and gptq at 2, 3 and 4 bits; `shift_add` with
bcq and bcq_calibrated at 2, 3 and 4 bits and with an average budget of 2.5 bits. All methods
use group_size 64 (divides every layer of both models). Calibration data never overlaps the
evaluation data: code-lm calibrates on windows of its *training* sources, minilm on the first
24 sample sentences and is evaluated on the other 24.
"Bytes/row" is the storage of the rewritten linear layers (packed weights + scales/zeros or
exponents/signs, no bias) divided by their total number of output rows; "bits/w" the same per
weight. Prints a table; writes bench/results/shift_add_<host>.json.

    python bench/shift_add.py              # ~10-20 min on 2 CPU cores
    python bench/shift_add.py --quick      # code-lm-tiny only, 2 eval batches (a smoke run)
    python bench/shift_add.py --models minilm   # one model; its rows replace that model's in the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch

from fxforge.ir.graph import get_attr, linear_sites
from fxforge.ir.ops.registry import op_name_of
from fxforge.ir.trace import flatten_inputs, trace
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, run_pass
from fxforge.passes.registry import get_pass_class
from _host import host_info  # bench/ is on sys.path when a script runs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GROUP = 64
QUICK_GROUP = 16  # code-lm-tiny's MLP has 176 inputs
BITS = (2, 3, 4)


def configs(group: int) -> list[tuple[str, str]]:
    """(label, pipeline spec) rows of the table, in order."""
    rows = [("float", "")]
    for bits in BITS:
        rows += [
            (f"rtn {bits}b", f"quantize(bits={bits},group_size={group},method='rtn')"),
            (f"gptq {bits}b", f"quantize(bits={bits},group_size={group},method='gptq')"),
            (f"shift_add bcq {bits}b", f"shift_add(bits={bits},group_size={group},method='bcq')"),
            (f"shift_add bcq_calibrated {bits}b", f"shift_add(bits={bits},group_size={group},method='bcq_calibrated')"),
        ]
    rows += [
        ("shift_add bcq budget 2.5b", f"shift_add(group_size={group},method='bcq',bit_budget=2.5)"),
        ("shift_add bcq_calibrated budget 2.5b",
         f"shift_add(group_size={group},method='bcq_calibrated',bit_budget=2.5)"),
    ]
    return rows


def canonical_graph(model, args, kwargs):
    gm = trace(model, args, kwargs)
    return run_pass(get_pass_class("canonicalize")(), gm, PassContext())


def linear_storage(gm) -> tuple[int, int, int]:
    """(bytes, output rows, weights) of the linear layers: float linears and fxforge weight-only ops."""
    total = rows = weights = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name_of(node.target)
        if node.target == torch.ops.aten.linear.default and node.args[1].op == "get_attr":
            w = get_attr(gm, node.args[1].target)
            if any(s.node is node for s in linear_sites(gm)):
                total, rows, weights = total + w.numel() * w.element_size(), rows + w.shape[0], weights + w.numel()
        elif name in ("shift_add_linear", "linear_wq", "linear_wq_ic"):
            tensors = [get_attr(gm, a.target) for a in node.args[1:4] if hasattr(a, "op") and a.op == "get_attr"]
            x = node.args[0].meta["val"]
            out_rows = node.meta["val"].shape[-1]
            total += sum(t.numel() * t.element_size() for t in tensors)
            rows += int(out_rows)
            weights += int(out_rows) * int(x.shape[-1])
    return total, rows, weights


def apply(gm, spec: str, example, calibration):
    if not spec:
        return gm, 0.0, ""
    start = time.perf_counter()
    ctx = PassContext(example_inputs=example, calibration=calibration,
                      progress=lambda it=None, **kw: it)
    try:
        out, report = Pipeline(spec).run(gm, ctx, verify=False)
    except Exception as exc:  # a baseline that is not available yet must not stop the bench
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc)[:160]}"
    note = report.records[-1].notes.get("bits", "")
    return out, time.perf_counter() - start, note


def bench_code_lm(variant: str, eval_batches: int, group: int, only: str, done=lambda rows: None) -> list[dict]:
    from fxforge.models.code_lm import load_code_lm, perplexity

    lm = load_code_lm(variant)
    seq = 128
    batches = lm.heldout_batches(seq_len=seq, max_batches=eval_batches, batch_size=4)
    ids = torch.cat([lm.encode(t)[0] for t in lm.train_texts()[:40]])
    windows = ids[: (ids.numel() // seq) * seq].reshape(-1, seq)
    step = max(1, windows.shape[0] // 32)
    calibration = [(windows[i:i + 2 * step:step],) for i in range(0, min(windows.shape[0], 32 * step), 2 * step)][:16]
    gm = canonical_graph(lm.model, (batches[0][:2, :64],), {})
    example = tuple(flatten_inputs(gm, (batches[0][:2, :64],), {}))
    rows = []
    for label, spec in configs(group):
        if only not in label:
            continue
        out, seconds, note = apply(gm, spec, example, calibration)
        if out is None:
            rows.append({"model": f"code-lm-{variant}", "method": label, "error": note})
            print(f"  {label:<40} unavailable: {note}", flush=True)
            continue
        ppl = perplexity(lambda x, g=out: run_graph(g, [x])[0], batches)
        size, n_rows, n_weights = linear_storage(out)
        rows.append({"model": f"code-lm-{variant}", "method": label, "spec": spec, "perplexity": ppl,
                     "bytes_per_row": size / n_rows, "bits_per_weight": 8 * size / n_weights,
                     "linear_bytes": size, "pass_seconds": seconds, "allocation": note})
        done(rows)
        print(f"  {label:<40} ppl {ppl:8.3f}  {size / n_rows:8.1f} B/row  {8 * size / n_weights:5.2f} bits/w"
              f"  ({seconds:.0f}s)", flush=True)
    return rows


def bench_minilm(only: str, done=lambda rows: None) -> list[dict]:
    from fxforge.models.minilm import load_minilm_encoder, minilm_sentences, tokenize

    encoder = load_minilm_encoder()
    sentences = minilm_sentences()
    calibration = [((), tokenize(sentences[i:i + 4], max_length=32, pad_to_max_length=True)) for i in range(0, 24, 4)]
    held_out = tokenize(sentences[24:], max_length=32, pad_to_max_length=True)
    gm = canonical_graph(encoder, (), calibration[0][1])
    example = tuple(flatten_inputs(gm, (), calibration[0][1]))
    flat = flatten_inputs(gm, (), held_out)
    reference = run_graph(gm, flat)[0]
    rows = []
    for label, spec in configs(GROUP):
        if only not in label:
            continue
        out, seconds, note = apply(gm, spec, example, calibration)
        if out is None:
            rows.append({"model": "minilm", "method": label, "error": note})
            print(f"  {label:<40} unavailable: {note}", flush=True)
            continue
        emb = run_graph(out, flat)[0]
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        size, n_rows, n_weights = linear_storage(out)
        rows.append({"model": "minilm", "method": label, "spec": spec, "cosine_mean": float(cos.mean()),
                     "cosine_min": float(cos.min()), "bytes_per_row": size / n_rows,
                     "bits_per_weight": 8 * size / n_weights, "linear_bytes": size, "pass_seconds": seconds,
                     "allocation": note})
        done(rows)
        print(f"  {label:<40} cos {float(cos.mean()):.5f} (min {float(cos.min()):.5f})  {size / n_rows:8.1f} B/row"
              f"  {8 * size / n_weights:5.2f} bits/w  ({seconds:.0f}s)", flush=True)
    return rows


def host() -> dict:
    return host_info(torch_threads=torch.get_num_threads())


def save(path: Path, rows: list[dict], group: int, seconds: float) -> None:
    """Write rows into `path`, replacing earlier rows of the same model and method (runs can be split)."""
    keys = {(r["model"], r["method"]) for r in rows}
    kept = []
    if path.exists():
        kept = [r for r in json.loads(path.read_text()).get("rows", []) if (r["model"], r["method"]) not in keys]
    payload = {"host": host(), "group_size": group, "seconds_last_run": seconds, "rows": kept + rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="code-lm-tiny only, 2 eval batches")
    parser.add_argument("--models", default="code-lm,minilm", help="comma-separated subset of code-lm,minilm")
    parser.add_argument("--only", default="", help="run only the rows whose label contains this text")
    options = parser.parse_args()
    os.environ.setdefault("FXFORGE_PROGRESS", "0")
    torch.manual_seed(0)
    group = QUICK_GROUP if options.quick else GROUP
    models = ["code-lm"] if options.quick else options.models.split(",")
    name = "shift_add_quick" if options.quick else "shift_add"
    path = RESULTS_DIR / f"{name}_{socket.gethostname().split('.')[0]}.json"
    start = time.perf_counter()
    rows: list[dict] = []
    if "code-lm" in models:
        print(f"code-lm ({'tiny' if options.quick else 'small'}): held-out perplexity", flush=True)
        rows += bench_code_lm("tiny" if options.quick else "small", 2 if options.quick else 8, group, options.only,
                              lambda r: save(path, rows + r, group, time.perf_counter() - start))
    if "minilm" in models:
        print("minilm: held-out embedding cosine to the float model", flush=True)
        rows += bench_minilm(options.only, lambda r: save(path, rows + r, group, time.perf_counter() - start))
    print(f"wrote {path} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
