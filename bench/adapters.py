"""CPU benchmark of adapters: what an unmerged adapter costs at inference, and what merging buys.

On code-lm (small by default) with LoRA rank 8 on every attention and MLP projection, times
the forward pass of: the base model, the adapted model (adapter branches as fxforge::lora_linear,
or as MatMuls in ONNX), and the merged model, on the eager backend and in ONNX Runtime, plus one
training step (forward + backward + AdamW) of the adapted graph. Outputs are checked first
(merged vs adapted) so a wrong model cannot produce a number. Prints a table and writes
bench/results/adapters_cpu.json with the host's CPU named.

    python bench/adapters.py [--variant tiny] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxforge
from fxforge.api import CompiledModel
from fxforge.models.code_lm import load_code_lm
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from _host import cpu_name  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).resolve().parent / "results" / "adapters_cpu.json"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=["small", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = load_code_lm(args.variant)
    ids = lm.heldout_batches(seq_len=args.seq, max_batches=1, batch_size=args.batch)[0]
    spec = f"add_adapters(rank={args.rank},targets={PROJECTIONS})"
    base = fxforge.compile(lm.model, (ids,))
    adapted = fxforge.compile(lm.model, (ids,), passes=spec)
    with torch.no_grad():  # trained-looking adapters: B = 0 would let a wrong merge pass
        for p in adapted.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    merged_gm = run_pass(MergeAdapters(), adapted.graph_module, PassContext(example_inputs=adapted.example_inputs))
    merged = CompiledModel(merged_gm, "eager", example_inputs=adapted.example_inputs)
    with torch.no_grad():
        reference = adapted(ids)
        error = (merged(ids) - reference).abs().max().item()
    if error > 1e-3:
        raise SystemExit(f"merged model disagrees with the adapted one (max |Δ| {error:.2e}); not timing")
    workdir = Path(tempfile.mkdtemp(prefix="fxforge-bench-adapters-"))
    onnx_models = {}
    for name, gm in (("base", base.graph_module), ("adapted", adapted.graph_module), ("merged", merged_gm)):
        onnx_models[name] = CompiledModel(gm, "onnx", example_inputs=adapted.example_inputs,
                                          backend_options={"path": str(workdir / f"{name}.onnx"),
                                                           "threads": args.threads})
    shutil.rmtree(workdir, ignore_errors=True)  # the sessions hold the models: leave nothing in the temp dir
    # Interleaved: every round times each model once, so load from other processes on a shared
    # machine hits all of them alike; the median over rounds is reported.
    candidates = [("base", "eager", base), ("adapted", "eager", adapted), ("merged", "eager", merged)]
    candidates += [(name, "onnxruntime", model) for name, model in onnx_models.items()]
    samples: dict[tuple[str, str], list[float]] = {(n, b): [] for n, b, _ in candidates}
    with torch.no_grad():
        for _, _, model in candidates:
            model(ids)  # warm-up
        for _ in range(args.repeats):
            for name, backend, model in candidates:
                start = time.perf_counter()
                model(ids)
                samples[(name, backend)].append((time.perf_counter() - start) * 1e3)
    rows = [{"model": n, "backend": b, "ms": statistics.median(v)} for (n, b), v in samples.items()]
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-3)

    def train_step() -> None:
        logits = adapted(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    rows.append({"model": "adapted", "backend": "eager train step", "ms": median_ms(train_step, args.repeats)})
    print(f"code-lm {args.variant}, LoRA rank {args.rank} on {adapted.report['add_adapters'].sites} layers, "
          f"input {tuple(ids.shape)}, {args.threads} threads, {cpu_name()}")
    print(f"{'model':<10}{'backend':<20}{'median ms':>10}")
    for row in rows:
        print(f"{row['model']:<10}{row['backend']:<20}{row['ms']:>10.2f}")
    print(f"merged vs adapted max |Δlogit|: {error:.2e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "host_cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "variant": args.variant,
        "input_shape": list(ids.shape), "rank": args.rank, "adapted_layers": adapted.report["add_adapters"].sites,
        "merged_vs_adapted_max_abs": error, "rows": rows,
        "note": "shared 2-core machine with other jobs running (load ~8): times interleaved, still noisy",
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
