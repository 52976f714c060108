"""CPU benchmark of Medusa decoding against plain KV-cached greedy decoding on code-lm.

In one run: compiles the code-lm zoo model (fuse_attention + add_medusa_heads), trains the heads
(Medusa-1, self-distillation by default), reports their top-1/top-5 accuracy on held-out stdlib
files, builds a tree from the measured accuracies, then decodes prompts cut from held-out stdlib
files with plain greedy and with greedy Medusa on the eager and ONNX backends: mean accepted
tokens per step and wall-clock tokens/second of each. Every Medusa output is checked against
plain greedy's (they must be identical). Typical acceptance (temperature > 0) is run too and its
acceptance rate reported. Prints a table; writes bench/results/medusa_cpu_<host>[_own_heads].json.

    python bench/medusa.py                      # code-lm small, 4 heads sharing the LM head, eager + onnx
    python bench/medusa.py --own-projections --head-layers 1 --train-steps 600   # Medusa-1's own heads
    python bench/medusa.py --variant tiny --train-steps 60 --prompts 4   # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path

import torch
from _host import cpu_name  # bench/ is on sys.path when a script runs

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="small", choices=("small", "tiny"))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-layers", type=int, default=2, help="ResBlocks per head")
    p.add_argument("--own-projections", action="store_true",
                   help="each head gets its own vocab projection (a trained copy of the LM head) instead of "
                        "sharing the frozen LM head; reads 4x more weights per step")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--train-seq-len", type=int, default=96)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--distill-sequences", type=int, default=1024)
    p.add_argument("--distill-prompt-len", type=int, default=32)
    p.add_argument("--data", choices=("distill", "self", "train"), default="distill",
                   help="distill: greedy continuations of prompts cut from the code-lm's train split "
                        "(default); self: of prompts sampled from the model; train: the train texts")
    p.add_argument("--tree-nodes", type=int, nargs="+", default=[5, 7, 11],
                   help="guesses per tree (the root comes on top) to build from measured accuracies; the best "
                        "is reported")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--backends", default="eager,onnx")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--typical-tree-nodes", type=int, default=11)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def run_interleaved(methods: dict, prompts, new_tokens: int) -> dict:
    """Each method on each prompt, methods interleaved per prompt so that load from other
    processes on a shared machine hits all of them alike. Totals per method."""
    stats = {name: {"outputs": [], "tokens": 0, "seconds": 0.0, "steps": 0} for name in methods}
    for prompt in prompts:
        for name, fn in methods.items():
            start = time.perf_counter()
            result = fn(prompt, new_tokens)
            st = stats[name]
            st["seconds"] += time.perf_counter() - start
            st["outputs"].append(result)
            st["tokens"] += len(result.tokens)
            st["steps"] += len(result.accepted_per_step)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FXFORGE_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import fxforge
    import fxforge.medusa as medusa
    from fxforge.models.code_lm import load_code_lm
    from fxforge.passes.kv_cache.add_kv_cache import with_kv_cache
    from fxforge.runtime.decoding import CachedLM, greedy_generate

    lm = load_code_lm(args.variant)
    example = lm.heldout_batches(seq_len=16, max_batches=1, batch_size=2)[0]
    t0 = time.perf_counter()
    heads = f"num_heads={args.heads},num_layers={args.head_layers},share_lm_head={not args.own_projections}"
    compiled = fxforge.compile(lm.model, (example,), passes=f"fuse_attention,add_medusa_heads({heads})")
    compile_seconds = time.perf_counter() - t0
    # The baseline runs the model without heads: plain decoding should not pay for them.
    plain_graph = with_kv_cache(fxforge.compile(lm.model, (example,), passes="fuse_attention").graph_module)

    data = None if args.data == "self" else lm.train_texts()
    distill = {"self_distill": args.data != "train", "self_distill_sequences": args.distill_sequences}
    if args.data == "distill":
        distill["prompt_len"] = args.distill_prompt_len
    report = medusa.train_heads(compiled, data, tokenizer=lm.tokenizer, steps=args.train_steps,
                                seq_len=args.train_seq_len, batch_size=args.train_batch, lr=2e-3, **distill)
    print(report)
    heldout = lm.heldout_batches(seq_len=128, max_batches=4, batch_size=4)
    stdlib_acc = [medusa.head_accuracy(compiled.graph_module, b) for b in heldout]
    top1 = [sum(a[0][k] for a in stdlib_acc) / len(stdlib_acc) for k in range(args.heads)]
    top5 = [sum(a[1][k] for a in stdlib_acc) / len(stdlib_acc) for k in range(args.heads)]
    print("held-out stdlib files (next tokens of real code):")
    for k in range(args.heads):
        print(f"  head {k + 1}: top-1 {top1[k]:.3f}  top-5 {top5[k]:.3f}")

    prompts = lm.heldout_batches(seq_len=args.prompt_len, max_batches=1, batch_size=args.prompts)[0]
    rows, results = [], {}
    for backend in [b for b in args.backends.split(",") if b]:
        options = {"threads": args.threads} if backend == "onnx" else {}
        t0 = time.perf_counter()
        # greedy: the graph verifies the tree and runs the heads itself; typical: heads apart
        dec = medusa.decoder(compiled, backend, greedy_in_graph=True, **options)
        typical_dec = medusa.decoder(compiled, backend, **options)
        prepare_seconds = time.perf_counter() - t0
        base = CachedLM.prepare(plain_graph, backend, **options)
        greedy_generate(base, prompts[0], 8)  # warm-up (ORT session, allocator)
        medusa.generate(compiled, prompts[0], 8, lm=dec)
        medusa.generate(compiled, prompts[0], 8, lm=typical_dec, mode="typical", temperature=args.temperature)
        trees = {n: medusa.tree_from_report(report, n) for n in args.tree_nodes}
        typical_tree = trees[args.typical_tree_nodes] if args.typical_tree_nodes in trees else \
            medusa.tree_from_report(report, args.typical_tree_nodes)
        methods = {"greedy": lambda p, n: greedy_generate(base, p, n)}
        for nodes, tree in trees.items():
            methods[f"tree{nodes}"] = lambda p, n, tree=tree: medusa.generate(compiled, p, n, tree=tree, lm=dec)
        methods["typical"] = lambda p, n: medusa.generate(compiled, p, n, tree=typical_tree, lm=typical_dec,
                                                          mode="typical", temperature=args.temperature, seed=0)
        stats = run_interleaved(methods, prompts, args.new_tokens)
        plain = stats["greedy"]
        plain_tps = plain["tokens"] / plain["seconds"]
        rows.append((backend, "greedy (no heads)", "-", 1.0, plain_tps, 1.0, "-"))
        per_tree = []
        for nodes, tree in trees.items():
            st = stats[f"tree{nodes}"]
            mismatches = sum(a.tokens != b.tokens for a, b in zip(st["outputs"], plain["outputs"]))
            mean_acc, tps = st["tokens"] / st["steps"], st["tokens"] / st["seconds"]
            per_tree.append({"tree_nodes": tree.num_nodes, "mean_accepted": mean_acc, "tokens_per_second": tps,
                             "speedup": tps / plain_tps, "mismatches_vs_greedy": mismatches})
            rows.append((backend, "medusa greedy", tree.num_nodes, mean_acc, tps, tps / plain_tps, mismatches))
        best = max(per_tree, key=lambda r: r["tokens_per_second"])
        st = stats["typical"]
        rate = sum(r.acceptance_rate for r in st["outputs"]) / len(st["outputs"])
        typ_acc, typ_tps = st["tokens"] / st["steps"], st["tokens"] / st["seconds"]
        rows.append((backend, f"medusa typical T={args.temperature}", typical_tree.num_nodes, typ_acc, typ_tps,
                     typ_tps / plain_tps, f"acc.rate {rate:.2f}"))
        results[backend] = {
            "prepare_seconds": prepare_seconds,
            "plain_greedy": {"tokens_per_second": plain_tps, "tokens": plain["tokens"], "seconds": plain["seconds"]},
            "medusa_greedy": per_tree, "best": best,
            "medusa_typical": {"temperature": args.temperature, "tree_nodes": typical_tree.num_nodes,
                               "mean_accepted": typ_acc, "tokens_per_second": typ_tps, "acceptance_rate": rate},
        }

    header = f"{'backend':<8}{'decoding':<24}{'tree':>6}{'tok/step':>10}{'tok/s':>10}{'speedup':>9}  check"
    print(header)
    print("-" * len(header))
    for backend, mode, nodes, acc, tps, speed, check in rows:
        print(f"{backend:<8}{mode:<24}{nodes!s:>6}{acc:>10.2f}{tps:>10.1f}{speed:>8.2f}x  {check}")

    host = {"hostname": socket.gethostname(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__}
    record = {
        "benchmark": "medusa", "host": host, "variant": args.variant, "heads": args.heads,
        "head_layers": args.head_layers, "share_lm_head": not args.own_projections,
        "compile_seconds": compile_seconds,
        "training": {"steps": report.steps, "seconds": report.seconds, "source": report.source,
                     "first_loss": report.losses[0] if report.losses else None,
                     "last_loss": report.losses[-1] if report.losses else None,
                     "distill_heldout_top1": report.top1, "distill_heldout_top5": report.top5},
        "heldout_stdlib_accuracy": {"top1": top1, "top5": top5},
        "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    safe_host = re.sub(r"[^A-Za-z0-9_.-]", "_", host["hostname"])
    suffix = "_own_heads" if args.own_projections else ""
    path = Path(args.out) if args.out else RESULTS_DIR / f"medusa_cpu_{safe_host}{suffix}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
