"""int4 decode variants against onnxruntime-genai's builder model, in interleaved rounds (issue 17, item 5).

Where does fxforge's int4 decode step lose to the bandwidth limit, and which ONNX Runtime knob or
graph change buys it back? Every variant below is a decoder file plus ONNX Runtime session config
entries, timed in the same process, in interleaved rounds (each round runs every variant's decode
`--decode-calls` times at past 128, then one 128-token prefill; the order rotates each round),
against the builder's int4 model. Each round gives a ratio builder_ms / variant_ms; the table
reports the median ratio and its spread (min-max over rounds): wall times on a shared machine are
not comparable across runs, ratios from one round are.

Files come from `bench/cpu_llm.py --keep DIR` (the same TinyLlama-shaped Llama, 4 layers):
  DIR/fxforge_fp32, fxforge_int4 (default `quantize(bits=4)`), builder_int4, and any
  fxforge_int4_NAME that cpu_llm's `--variant NAME=PASSES` compiled (g32, g128, sym, ...).
This script derives the rest: accuracy-level copies (MatMulNBits' `accuracy_level` rewritten) of
fxforge_int4 and of the builder's file, and fx_nobias / fx_nobias_only / fx_noposids
(fxforge_int4 whose GroupQueryAttention takes no attention_bias and/or position_ids, as the
builder's: exact only without padding). `--replicas N` times N sessions of each variant.

Session variants (config keys read out of ONNX Runtime 1.32's binary, `strings`):
  nospin              session.intra_op.allow_spinning=0
  force_fp32          mlas.qnbit.force_fp32=1 (MatMulNBits computes in float whatever its level)
  lut                 mlas.use_lut_gemm=1 (MLAS' table-lookup GEMM)
  dispatch_<policy>   session.kernel_dispatch_policy=<latency|memory>
  noprepack           session.disable_prepacking=1 (expected slower: MatMulNBits then repacks per call)

Accuracy of each variant: the relative L2 error of 32 teacher-forced steps' logits against
fxforge_fp32's, and top-1 agreement with fp32 transformers' greedy tokens (bench/cpu_llm.py's
measures). "% of limit" divides the weight bytes one decode step reads by the read bandwidth
`cpu_llm.read_bandwidth` measures at that thread count. `--profile` adds ORT's per-op-type
profile of one decode step (1 thread) of fxforge_int4 and of the builder's model.

    python bench/cpu_llm.py --layers 4 --threads 1 --rounds 1 --skip ort_int4,fxforge_w8a8,ort_w8a8 \\
        --variant g32="quantize(bits=4,group_size=32)" --variant g128="quantize(bits=4,group_size=128)" \\
        --variant sym="quantize(bits=4,sym=True)" --keep out/c17
    python bench/int4_decode_variants.py --work out/c17 [--threads 1,2] [--rounds 7] [--profile] [--only a,b]
    python bench/int4_decode_variants.py --kernels 40 --out int4_kernel_ceiling.json   # MatMulNBits alone

Writes bench/results/int4_decode_variants.json (`--out` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_llm  # noqa: E402  (bandwidth probe, weight bytes, accuracy, profile)
import llm_e2e as e2e  # noqa: E402  (Decoder, reference tokens)

PEER = "builder"

# name -> (file key under --work, session config entries)
SESSION_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "fx_nospin": ("fxforge_int4", {"session.intra_op.allow_spinning": "0"}),
    "fx_force_fp32": ("fxforge_int4", {"mlas.qnbit.force_fp32": "1"}),
    "fx_lut": ("fxforge_int4", {"mlas.use_lut_gemm": "1"}),
    "fx_dispatch_latency": ("fxforge_int4", {"session.kernel_dispatch_policy": "latency"}),
    "fx_dispatch_memory": ("fxforge_int4", {"session.kernel_dispatch_policy": "memory"}),
    "fx_noprepack": ("fxforge_int4", {"session.disable_prepacking": "1"}),
    "builder_nospin": ("builder_int4", {"session.intra_op.allow_spinning": "0"}),
}
FILE_VARIANTS = {"builder": "builder_int4", "fx": "fxforge_int4", "fx_g32": "fxforge_int4_g32",
                 "fx_g128": "fxforge_int4_g128", "fx_sym": "fxforge_int4_sym", "fx_sym_g32": "fxforge_int4_sym_g32",
                 "fx_fp32head": "fxforge_int4_fp32head"}
ACC_LEVELS = {"fx_acc0": ("fxforge_int4", 0), "fx_acc1": ("fxforge_int4", 1), "fx_acc2": ("fxforge_int4", 2),
              "builder_acc1": ("builder_int4", 1)}


def matmul_nbits_attrs(path: str) -> dict[str, Any]:
    """Block sizes, accuracy levels, zero points and node count of a file's MatMulNBits."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    return {"matmulnbits": len(nodes), "nodes": len(model.graph.node),
            "block_sizes": sorted({a.get("block_size") for a in attrs}),
            "accuracy_levels": sorted({a.get("accuracy_level", 0) for a in attrs}),
            "with_zero_points": sum(len(n.input) > 3 and bool(n.input[3]) for n in nodes)}


def without_attention_bias(src: str, dst: Path, inputs: tuple[int, ...] = (9, 10)) -> str:
    """A copy of `src` whose GroupQueryAttention nodes get no attention_bias (input 10) nor
    position_ids (input 9): the builder's form. Exact only without padding (the bench feeds none);
    it measures what fxforge's padding support costs the decode step."""
    import onnx

    model = onnx.load(src, load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            for i in inputs:
                if len(node.input) > i:
                    node.input[i] = ""
    onnx.save_model(model, str(dst))  # next to `src`: the same external data file, not a copy
    return str(dst)


def variants(work: Path, only: set[str]) -> dict[str, dict[str, Any]]:
    """name -> {"onnx", "config"} for every variant whose file exists (or can be derived)."""
    out: dict[str, dict[str, Any]] = {}
    for name, key in FILE_VARIANTS.items():
        if (work / key / "model.onnx").exists():
            out[name] = {"onnx": str(work / key / "model.onnx"), "config": {}}
    for name, (key, level) in ACC_LEVELS.items():
        if (work / key / "model.onnx").exists() and (not only or name in only):
            dst = work / f"{key}_acc{level}" / "model.onnx"
            if not dst.exists():
                cpu_llm.with_accuracy_level(str(work / key / "model.onnx"), dst.parent, level)  # weights inline
            out[name] = {"onnx": str(dst), "config": {}}
    # GroupQueryAttention inputs dropped: both, attention_bias (10) only, position_ids (9) only
    for name, dropped in (("fx_nobias", (9, 10)), ("fx_nobias_only", (10,)), ("fx_noposids", (9,))):
        if (work / "fxforge_int4" / "model.onnx").exists() and (not only or name in only):
            dst = work / "fxforge_int4" / f"model_{name[3:]}.onnx"
            if not dst.exists():
                without_attention_bias(str(work / "fxforge_int4" / "model.onnx"), dst, dropped)
            out[name] = {"onnx": str(dst), "config": {}}
    for name, (key, config) in SESSION_VARIANTS.items():
        if (work / key / "model.onnx").exists():
            out[name] = {"onnx": str(work / key / "model.onnx"), "config": config}
    if only:
        out = {k: v for k, v in out.items() if k in only or k == PEER}
    return out


def replicate(found: dict[str, dict[str, Any]], copies: int) -> dict[str, dict[str, Any]]:
    """Each variant `copies` times (NAME, NAME#2, ...): separate sessions, separate weight buffers.
    On this VM one session of a file can run ~10% faster than another of the same file for the
    whole run (builder vs builder_nospin at 1 thread, where spinning does nothing), so a ratio
    between two single sessions carries that placement luck; several copies average it out."""
    return {f"{name}#{i}" if i > 1 else name: v for name, v in found.items() for i in range(1, copies + 1)}


def _cpu_clock(threads: int):
    """The CPU clock that measures a call's own work on a loaded machine: at 1 thread ORT runs the
    kernels on the calling thread (time.thread_time: preemption excluded); with a pool, the
    process's CPU time (all threads; spinning workers count, so read it with spinning off)."""
    return time.thread_time if threads == 1 else time.process_time


def time_rounds(decoders: dict[str, e2e.Decoder], rounds: int, decode_calls: int,
                threads: int, prefill_calls: bool = True) -> dict[str, dict[str, Any]]:
    """Interleaved rounds (rotating order). Per round, a variant's decode time is the fastest of its
    `decode_calls` calls (on a loaded machine the least disturbed one) and its ratio the builder's
    time in that round over it; reported: the median over rounds of time and ratio, the ratio's
    spread (min-max over rounds), and the ratio of the fastest calls of the whole run; the same for
    CPU time (`_cpu_clock`), the measure that survives a loaded machine."""
    rng = np.random.default_rng(0)
    names = list(decoders)
    cpu = _cpu_clock(threads)
    decode_feeds = {k: d.feed(np.array([[17]]), d.empty_past(e2e.PAST, rng)) for k, d in decoders.items()}
    prefill_feeds = {k: d.feed(rng.integers(3, 300, (1, e2e.PREFILL)), d.empty_past()) for k, d in decoders.items()}
    for k, d in decoders.items():  # warm-up: first runs allocate and pick kernels
        d.time_call(decode_feeds[k])
        d.time_call(prefill_feeds[k])

    def call(k: str, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
        wall, c = time.perf_counter(), cpu()
        decoders[k].session.run(None, feeds)
        return (time.perf_counter() - wall) * 1e3, (cpu() - c) * 1e3

    samples: dict[str, dict[str, list[float]]] = {k: {m: [] for m in ("decode", "decode_cpu", "prefill", "prefill_cpu")}
                                                  for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            calls = [call(k, decode_feeds[k]) for _ in range(decode_calls)]
            samples[k]["decode"].append(min(w for w, _ in calls))
            samples[k]["decode_cpu"].append(min(c for _, c in calls))
            if prefill_calls:
                wall, c = call(k, prefill_feeds[k])
                samples[k]["prefill"].append(wall)
                samples[k]["prefill_cpu"].append(c)
    out: dict[str, dict[str, Any]] = {k: {} for k in names}
    for k in names:
        for m, values in samples[k].items():
            if not values:
                continue
            ratios = [p / v for p, v in zip(samples[PEER][m], values)]
            out[k].update({f"{m}_ms": round(statistics.median(values), 2), f"{m}_ms_min": round(min(values), 2),
                           f"{m}_speedup": round(statistics.median(ratios), 3),
                           f"{m}_speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)],
                           f"{m}_speedup_of_mins": round(min(samples[PEER][m]) / min(values), 3)})
    return out


# One decoder layer of fxforge's int4 graph (K, N): q/k/v fused, o, gate/up fused, down; and the LM head.
FUSED_LAYER = [(2048, 2560), (2048, 2048), (2048, 11264), (5632, 2048)]
KERNELS = [(b, sym, 4) for b in (32, 64, 128, 256) for sym in (True, False)] + [(64, False, 1)]


def fp32_matmul_model(shapes: list[tuple[int, int]]) -> tuple[bytes, list[int], int]:
    """The same products as plain fp32 MatMul (the kernel the fp32 decoder streams with)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    widths = sorted({k for k, _ in shapes})
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k])
                                           for k in widths], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return model.SerializeToString(), widths, sum(4 * k * n for k, n in shapes)


def kernel_ceiling(rounds: int) -> dict[str, dict[str, float]]:
    """MatMulNBits alone at the decoder's shapes (one fused layer + the LM head, batch 1, 1 thread)
    per (block, symmetric, accuracy level), and fp32 MatMul at the same shapes: the fastest call's
    CPU time (thread_time: ORT runs one thread's kernels on the caller) and the bytes it read per
    CPU second. The ceiling any int4 decoder on these kernels can reach, whatever the graph."""
    import onnxruntime as ort

    shapes = FUSED_LAYER + cpu_llm.HEAD_SHAPE
    builds = {f"int4 g{b} {'sym' if sym else 'asym'} acc{level}": cpu_llm.matmul_nbits_model(shapes, b, sym, level)
              for b, sym, level in KERNELS}
    builds["fp32 MatMul"] = fp32_matmul_model(shapes)
    sessions = {}
    for key, (data, widths, nbytes) in builds.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        feeds = {f"x{k}": np.random.default_rng(1).standard_normal((1, k), dtype=np.float32) for k in widths}
        session.run(None, feeds)
        sessions[key] = (session, feeds, nbytes)
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, (session, feeds, _) in sessions.items():
            start = time.thread_time()
            session.run(None, feeds)
            cpu[key].append(time.thread_time() - start)
    return {k: {"cpu_ms_min": round(min(v) * 1e3, 3), "cpu_ms_median": round(statistics.median(v) * 1e3, 3),
                "MB": round(sessions[k][2] / 1e6, 1), "GB_per_cpu_s": round(sessions[k][2] / min(v) / 1e9, 2)}
            for k, v in cpu.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="a bench/cpu_llm.py --keep directory")
    parser.add_argument("--kernels", type=int, metavar="ROUNDS", default=0,
                        help="only the MatMulNBits kernel ceiling (kernel_ceiling), this many rounds")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode-calls", type=int, default=5)
    parser.add_argument("--only", default="", help="variants to run (the builder always runs), comma-separated")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--no-prefill", action="store_true", help="time decode only")
    parser.add_argument("--replicas", type=int, default=1, help="sessions per variant (see `replicate`)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--bandwidth", default="", metavar="T=GB_S,...",
                        help="read bandwidth measured idle (cpu_llm.py's probe), e.g. 1=16.35,2=31.94: on a loaded "
                             "machine the probe reads low and would overstate %% of limit; the higher one is used")
    parser.add_argument("--out", default="int4_decode_variants.json")
    args = parser.parse_args()
    if args.kernels:
        table = kernel_ceiling(args.kernels)
        for key, v in table.items():
            print(f"{key:22s} {v['MB']:6.1f} MB  cpu min {v['cpu_ms_min']:7.3f} ms  median {v['cpu_ms_median']:7.3f} ms"
                  f"  {v['GB_per_cpu_s']:5.2f} GB per CPU second")
        e2e.write_results(cpu_llm.RESULTS / args.out, {"load_avg": os.getloadavg(), "rounds": args.kernels,
                                                       "kernels": table})
        return 0
    only = set(filter(None, args.only.split(",")))
    work = args.work.resolve()
    config = json.loads((work / "hf-llama" / "config.json").read_text())
    cfg = {"kv_heads": config["num_key_value_heads"], "head_dim": config["hidden_size"] // config["num_attention_heads"]}
    found = variants(work, only)
    found = replicate(found, args.replicas)
    report: dict[str, Any] = {"load_avg_start": os.getloadavg(), "rounds": args.rounds,
                              "decode_calls": args.decode_calls, "past": e2e.PAST, "prefill": e2e.PREFILL}
    rows: dict[str, dict[str, Any]] = {}
    for name, v in found.items():
        rows[name] = {"config": v["config"], **matmul_nbits_attrs(v["onnx"]),
                      "decode_weight_bytes": cpu_llm.decode_weight_bytes(v["onnx"])}

    if not args.skip_accuracy:
        prompt, reference = e2e.reference_tokens(work / "hf-llama", prompt_len=8)
        fp32 = e2e.Decoder(str(work / "fxforge_fp32" / "model.onnx"), cfg["kv_heads"], cfg["head_dim"], threads=1)
        fp32_logits = cpu_llm.teacher_forced_logits(fp32, prompt, reference)
        del fp32
        for name, v in found.items():
            try:
                d = e2e.Decoder(v["onnx"], cfg["kv_heads"], cfg["head_dim"], threads=1, session_config=v["config"])
                rows[name].update(cpu_llm.accuracy(cpu_llm.teacher_forced_logits(d, prompt, reference), reference,
                                                   fp32_logits))
                del d
            except Exception as exc:  # a config ORT refuses is a result, not a crash
                rows[name]["status"] = e2e.failure(exc)
            print(name, rows[name].get("logits_rel_err"), rows[name].get("top1_agreement"),
                  rows[name].get("status", ""), flush=True)

    report["bandwidth_gb_s"] = {}
    for t in [int(x) for x in args.threads.split(",")]:
        probe = cpu_llm.read_bandwidth(t)["best"]
        given = dict(b.split("=") for b in filter(None, args.bandwidth.split(",")))
        bandwidth = max(probe, float(given.get(str(t), 0)))  # the limit stays a bound no reader beat
        report["bandwidth_gb_s"][str(t)] = {"probe_now": probe, "given": given.get(str(t)), "used": bandwidth}
        decoders = {}
        for name, v in found.items():
            if "status" in rows[name]:
                continue
            try:
                decoders[name] = e2e.Decoder(v["onnx"], cfg["kv_heads"], cfg["head_dim"], threads=t,
                                             session_config=v["config"])
            except Exception as exc:
                rows[name]["status"] = e2e.failure(exc)
        print(f"timing {list(decoders)} at {t} thread(s), {args.rounds} rounds", flush=True)
        for name, timing in time_rounds(decoders, args.rounds, args.decode_calls, t, not args.no_prefill).items():
            limit_ms = rows[name]["decode_weight_bytes"] / (bandwidth * 1e9) * 1e3
            timing["limit_ms"] = round(limit_ms, 2)
            for m in ("decode", "decode_cpu"):
                timing[f"pct_of_limit_{m}"] = round(100 * limit_ms / timing[f"{m}_ms"], 1)
            rows[name].setdefault("timing", {})[str(t)] = timing
        del decoders

    if args.profile:
        report["profiles"] = {}
        for name in ("fx", PEER):
            if name in found:
                report["profiles"][name] = cpu_llm.profile_decode(found[name]["onnx"], cfg, work)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["load_avg_end"] = os.getloadavg()
    report["rows"] = rows
    threads = list(report["bandwidth_gb_s"])
    head = ["variant", "MMNB", "block", "acc", "zp", "MB/token"] + [
        c for t in threads for c in (f"decode ms wall/cpu @{t}t", f"vs builder wall @{t}t [spread]",
                                     f"vs builder cpu @{t}t [spread]", f"% limit wall/cpu @{t}t",
                                     f"prefill vs builder wall/cpu @{t}t")] + ["logit err", "top-1"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for name, row in rows.items():
        cells = [name, str(row["matmulnbits"]), str(row["block_sizes"]), str(row["accuracy_levels"]),
                 str(row["with_zero_points"]), f"{row['decode_weight_bytes'] / 1e6:.0f}"]
        for t in threads:
            tm = row.get("timing", {}).get(t)
            cells += [f"{tm['decode_ms']}/{tm['decode_cpu_ms']}",
                      f"{tm['decode_speedup']} {tm['decode_speedup_spread']}",
                      f"{tm['decode_cpu_speedup']} {tm['decode_cpu_speedup_spread']}",
                      f"{tm['pct_of_limit_decode']}/{tm['pct_of_limit_decode_cpu']}",
                      f"{tm.get('prefill_speedup', '-')}/{tm.get('prefill_cpu_speedup', '-')}"] if tm else ["-"] * 5
        cells += [str(row.get("logits_rel_err", "-")), str(row.get("top1_agreement", "-"))]
        print("| " + " | ".join(cells) + " |" + (f" {row['status']}" if "status" in row else ""))
    for name, prof in report.get("profiles", {}).items():
        top = ", ".join(f"{k} {v['ms']}ms ({v['share']:.0%}, {v['nodes']})" for k, v in list(prof["by_op_type"].items())[:8])
        print(f"profile {name}: {prof['kernel_ms_per_step']} ms/step in kernels: {top}")
    e2e.write_results(cpu_llm.RESULTS / args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
