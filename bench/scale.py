"""Benchmark: how fxforge's time and memory scale with model size (issue 15, item 6).

A Llama with TinyLlama's shapes (hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocab
32000, random weights) at L = 1, 2, 4, 8 decoder layers, in fp32 and bf16. Each pipeline runs in
a fresh subprocess, so every peak is that pipeline's own: wall time, CPU time (user + system)
and peak RSS come from `os.wait4` on the child (its `ru_maxrss`), and P (parameter bytes) from
the child. Peak RSS includes the Python + torch + ORT runtime (about 0.4 GiB) and the user's
model itself (P): the issue's targets at L=8 are eager ≤ 1.3P + 1 GiB, ONNX ≤ 2.2P + 1 GiB.

Pipelines (verification on, as `fxforge.compile` defaults):
    baseline       plain torch.onnx.export(dynamo=True) + an ORT session (no fxforge)
    eager, onnx    fxforge.compile with no passes (canonicalize only)
    quantize4      quantize(bits=4)                                 eager backend
    gptq4          quantize(bits=4,method=gptq), 4 batches × 32 tokens  eager backend
    fuse_kv        fuse_attention,add_kv_cache                       eager backend
    flap           prune(method=flap,ratio=0.2), 4 batches × 32 tokens  eager backend

    python bench/scale.py                      # L in 1,2,4,8; fp32 and bf16; every pipeline
    python bench/scale.py --quick              # L in 1,2 (a smoke run)
    python bench/scale.py --layers 1,2,4 --dtypes fp32 --pipelines eager,onnx,quantize4

Streamed from a safetensors directory (`hf.from_pretrained(lazy=True)`: weights mapped, read
block by block, results spilled to disk; random weights written once under
~/.cache/fxforge-bench/scale-dirs, `--keep-dirs` keeps them):
    python bench/scale.py --streamed 7b --blocks 2,4,8          # 7B-shaped blocks, bf16, GPTQ int4, no verify
    python bench/scale.py --streamed tinyllama --blocks 22 --streamed-backend onnx --verify --decode 4
                                                              # the full 1.1B: GPTQ int4 -> ONNX, decodes
Prints a table and writes bench/results/scale_cpu.json (`--out` to change). fxforge is
imported from wherever the parent imports it (PYTHONPATH), so pointing PYTHONPATH at another
checkout measures that one ("before" numbers) with this script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _host import host_info  # bench/ is on sys.path when a script runs

RESULTS = Path(__file__).parent / "results"
GIB = 2 ** 30
PIPELINES: dict[str, tuple[str | None, str]] = {  # name -> (passes, backend); None: no fxforge
    "baseline": (None, "onnx"),
    "eager": ("", "eager"),
    "onnx": ("", "onnx"),
    "quantize4": ("quantize(bits=4)", "eager"),
    "gptq4": ("quantize(bits=4,method=gptq)", "eager"),
    "fuse_kv": ("fuse_attention,add_kv_cache", "eager"),
    "flap": ("prune(method=flap,ratio=0.2)", "eager"),
}
CALIBRATED = {"gptq4", "flap"}
IDS_ONLY = {"fuse_kv"}  # add_kv_cache needs a graph traced on token ids alone (no padding mask)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# Shapes of the streamed runs (Llama configs; random weights).
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512),  # the smoke test's
}
STREAMED_PASSES = {"gptq": "quantize(bits=4,method=gptq)", "rtn": "quantize(bits=4)"}
DIRS = Path(os.environ.get("FXFORGE_BENCH_CACHE", Path.home() / ".cache" / "fxforge-bench")) / "scale-dirs"


# --------------------------------------------------------------------------- child


def build_model(layers: int, dtype: str, seed: int = 0, shrink: int = 1) -> Any:
    """A random-weight LlamaForCausalLM with TinyLlama's shapes (widths / `shrink`, for smoke
    runs) and `layers` decoder layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048 // shrink, intermediate_size=5632 // shrink,
                         num_attention_heads=32 // shrink, num_key_value_heads=max(1, 4 // shrink),
                         num_hidden_layers=layers, vocab_size=32000 // shrink,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Built in its own dtype, as a user's bf16 checkpoint loads: building in fp32 and casting made
    # the fp32 model (2P) the peak of every bf16 run, before fxforge ran at all.
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, DTYPES[dtype]))
    try:
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def run_child(layers: int, dtype: str, pipeline: str, shrink: int = 1) -> dict[str, Any]:
    """Build the model, run one pipeline, and say what it took (printed as one JSON line)."""
    import torch

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    start = time.perf_counter()
    model = build_model(layers, dtype, shrink=shrink)
    vocab = model.config.vocab_size
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, 16), generator=generator)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if pipeline in IDS_ONLY:
        kwargs = {"input_ids": ids}
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    passes, backend = PIPELINES[pipeline]
    if passes is None:
        _baseline(model, kwargs)
        report = ""
    else:
        import fxforge

        calibration = None
        if pipeline in CALIBRATED:
            calibration = [{"input_ids": torch.randint(0, vocab, (1, 32), generator=generator),
                            "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(4)]
        compiled = fxforge.compile(model, (), kwargs, passes=passes or None, backend=backend,
                                   calibration=calibration)
        compiled.run_flat(*compiled.example_inputs)  # add_kv_cache changes the inputs: run it as checked
        report = str(compiled.report)
    return {"param_bytes": param_bytes, "build_s": build_s, "pipeline_s": time.perf_counter() - start,
            "report": report}


def _baseline(model: Any, kwargs: dict[str, Any]) -> None:
    """What a user does without fxforge: torch.onnx.export, then an ORT session, one run."""
    import tempfile
    import warnings

    import onnxruntime as ort
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    with tempfile.TemporaryDirectory(prefix="scale-baseline-") as directory:
        path = os.path.join(directory, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Logits(model), (kwargs["input_ids"], kwargs["attention_mask"]), path,
                              dynamo=True, input_names=["input_ids", "attention_mask"], optimize=False)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        session.run(None, {k: v.numpy() for k, v in kwargs.items()})


def write_random_dir(directory: Path, shape: str, layers: int, dtype: str) -> Path:
    """A save_pretrained-style sharded safetensors directory of a random Llama (`shape`,
    `layers` blocks): one shard per block, written one block at a time (never the model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from fxforge.models.hf import _parameters_on_meta

    if (directory / "model.safetensors.index.json").is_file():
        return directory
    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=2048,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with _parameters_on_meta():
        model = LlamaForCausalLM(config)
    torch_dtype = getattr(torch, DTYPES[dtype])
    shards: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        key = f"layer{int(name.split('.')[2]):03d}" if ".layers." in name else "rest"
        shards.setdefault(key, {})[name] = p
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for key, params in shards.items():
        tensors = {}
        for name, p in params.items():
            if p.dim() == 1:  # norm weights
                tensors[name] = torch.ones(p.shape, dtype=torch_dtype)
            else:
                tensors[name] = (torch.randn(p.shape, generator=generator) * 0.02).to(torch_dtype)
        save_file(tensors, str(tmp / f"{key}.safetensors"))
        weight_map.update({name: f"{key}.safetensors" for name in tensors})
        del tensors
    config.dtype = torch_dtype
    config.save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.replace(tmp, directory)
    return directory


def run_streamed_child(directory: Path, backend: str, verify: bool, decode: int, method: str = "gptq",
                       batches: int = 4, tokens: int = 32) -> dict[str, Any]:
    """int4 (GPTQ or RTN) of a model streamed from `directory`; optionally ONNX and greedy decoding."""
    import torch

    import fxforge
    from fxforge.calibration.streaming import streamed
    from fxforge.models.hf import from_pretrained

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    start = time.perf_counter()
    pretrained = from_pretrained(directory, lazy=True, seq=16, batch=1)
    model = pretrained.model
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, vocab, (1, tokens), generator=generator),
                    "attention_mask": torch.ones(1, tokens, dtype=torch.long)} for _ in range(batches)]
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = fxforge.compile(model, pretrained.args, pretrained.kwargs, passes=STREAMED_PASSES[method],
                               backend=backend, calibration=calibration if method == "gptq" else None, verify=verify)
    compile_s = time.perf_counter() - start
    store = streamed(compiled.graph_module)
    result: dict[str, Any] = {"param_bytes": param_bytes, "build_s": build_s, "pipeline_s": compile_s,
                              "report": str(compiled.report),
                              "spilled_gib": round(store.spilled_bytes / GIB, 3) if store else None,
                              "peak_owned_gib": round(store.peak_owned_bytes / GIB, 3) if store else None}
    if decode:
        ids = pretrained.kwargs["input_ids"][:1, :8]
        start = time.perf_counter()
        for _ in range(decode):  # greedy, re-running the uncached graph: "the result decodes"
            logits = compiled(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        result.update(decoded=ids[0].tolist(), decode_s=time.perf_counter() - start)
    return result


def measure_streamed(shape: str, layers: int, dtype: str, backend: str, verify: bool, decode: int,
                     timeout_s: float, method: str = "gptq") -> dict[str, Any]:
    """One streamed run in a fresh interpreter (the directory is written first, by the parent)."""
    directory = write_random_dir(DIRS / f"{shape}-L{layers}-{dtype}", shape, layers, dtype)
    cmd = [sys.executable, __file__, "--child-streamed", str(directory), "--streamed-backend", backend,
           "--decode", str(decode), "--method", method] + (["--verify"] if verify else [])
    row = _run_child(cmd, timeout_s, {"layers": layers, "dtype": dtype,
                                      "pipeline": f"{method}4-streamed-{shape}-{backend}",
                                      "shape": shape, "verify": verify})
    return row


# --------------------------------------------------------------------------- parent


def measure(layers: int, dtype: str, pipeline: str, timeout_s: float, shrink: int = 1) -> dict[str, Any]:
    """Run one pipeline in a fresh interpreter; wall, CPU and peak RSS from wait4 on it."""
    cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--dtypes", dtype,
           "--pipelines", pipeline, "--shrink", str(shrink)]
    return _run_child(cmd, timeout_s, {"layers": layers, "dtype": dtype, "pipeline": pipeline})


def _run_child(cmd: list[str], timeout_s: float, row: dict[str, Any]) -> dict[str, Any]:
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, "FXFORGE_PROGRESS": "0"})
        timer = threading.Timer(timeout_s, child.kill)  # a hung or swapping run must not stall the bench
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its peak RSS, its CPU
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = usage.ru_maxrss * 1024 / GIB  # KiB on Linux
    row.update({"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "peak_rss_gib": round(peak, 3)})
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if child.returncode == 0 and lines:
        result = json.loads(lines[-1])
        p = result.pop("param_bytes") / GIB
        row.update(status="ok", p_gib=round(p, 3), rss_over_p=round(peak / p, 2),
                   build_s=round(result.pop("build_s"), 2), pipeline_s=round(result.pop("pipeline_s"), 2), **result)
    else:
        tail = [line for line in (stderr or stdout).strip().splitlines() if line.strip()][-3:]
        row.update(status=f"failed (rc {child.returncode}): " + " | ".join(tail)[:400])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="1,2,4,8")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--quick", action="store_true", help="L in 1,2 only (a smoke run)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per pipeline run")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_cpu.json")
    parser.add_argument("--shrink", type=int, default=1, help="divide every width by this (smoke tests only; 4 keeps every width a multiple of 128)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--streamed", choices=sorted(SHAPES), help="stream this shape from a safetensors dir")
    parser.add_argument("--blocks", default="2,4,8", help="block counts of the streamed runs")
    parser.add_argument("--streamed-dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--streamed-backend", default="eager", choices=("eager", "onnx"))
    parser.add_argument("--verify", action="store_true", help="streamed runs: verify every pass (default off)")
    parser.add_argument("--method", default="gptq", choices=sorted(STREAMED_PASSES), help="streamed runs: int4 method")
    parser.add_argument("--decode", type=int, default=0, help="streamed runs: greedy-decode this many tokens")
    parser.add_argument("--keep-dirs", action="store_true", help="keep the random-weight directories")
    parser.add_argument("--append", action="store_true", help="add the rows to --out instead of replacing it")
    parser.add_argument("--child-streamed", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_streamed:
        print(json.dumps(run_streamed_child(args.child_streamed, args.streamed_backend, args.verify, args.decode,
                                            args.method)))
        return 0
    previous = json.loads(args.out.read_text())["rows"] if args.append and args.out.is_file() else []
    if args.streamed:
        rows = list(previous)
        print(_header())
        for n in [int(x) for x in args.blocks.split(",")]:
            row = measure_streamed(args.streamed, n, args.streamed_dtype, args.streamed_backend, args.verify,
                                   args.decode, args.timeout_s, args.method)
            rows.append(row)
            print(_line(row), flush=True)
            _write(args.out, rows)
            if not args.keep_dirs and row["status"] == "ok":
                import shutil

                shutil.rmtree(DIRS / f"{args.streamed}-L{n}-{args.streamed_dtype}", ignore_errors=True)
        return 0 if all(r["status"] == "ok" for r in rows[len(previous):]) else 1
    layers = [1, 2] if args.quick else [int(x) for x in args.layers.split(",")]
    dtypes, pipelines = args.dtypes.split(","), args.pipelines.split(",")
    for name in pipelines:
        if name not in PIPELINES:
            parser.error(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    if args.child:
        print(json.dumps(run_child(layers[0], dtypes[0], pipelines[0], args.shrink)))
        return 0
    rows = list(previous)
    print(_header())
    for dtype in dtypes:
        for n in layers:
            for name in pipelines:
                row = measure(n, dtype, name, args.timeout_s, args.shrink)
                rows.append(row)
                print(_line(row), flush=True)
                _write(args.out, rows, args.shrink)
    return 0 if all(r["status"] == "ok" for r in rows[len(previous):]) else 1


def _header() -> str:
    return (f"{'L':>2} {'dtype':<5} {'pipeline':<10} {'P GiB':>7} {'peak GiB':>9} {'peak/P':>7} "
            f"{'target GiB':>11} {'wall s':>8} {'cpu s':>8}  status")


def target_gib(row: dict[str, Any]) -> float | None:
    """The issue's bound for this row: ONNX ≤ 2.2P + 1 GiB, eager ≤ 1.3P + 1 GiB (None: baseline)."""
    if "p_gib" not in row or row["pipeline"] == "baseline":
        return None
    if row["pipeline"] not in PIPELINES:  # streamed: GPTQ's bound, or ONNX's when it ends in ONNX
        return (2.2 if row["pipeline"].endswith("-onnx") else 1.3) * row["p_gib"] + 1.0
    backend = PIPELINES[row["pipeline"]][1]
    return (2.2 if backend == "onnx" else 1.3) * row["p_gib"] + 1.0


def _line(row: dict[str, Any]) -> str:
    p = f"{row['p_gib']:.3f}" if "p_gib" in row else "-"
    ratio = f"{row['rss_over_p']:.2f}" if "rss_over_p" in row else "-"
    target = target_gib(row)
    target_text = "-" if target is None else f"{target:.2f}" + (" ok" if row["peak_rss_gib"] <= target else " !")
    return (f"{row['layers']:>2} {row['dtype']:<5} {row['pipeline']:<10.30} {p:>7} {row['peak_rss_gib']:>9.3f} "
            f"{ratio:>7} {target_text:>11} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f}  {row['status']}")


def _write(path: Path, rows: list[dict[str, Any]], shrink: int = 1) -> None:
    """Rewritten after every row (atomically), so an interrupted run keeps what it measured."""
    import fxforge

    record = {"host": host_info(threads=int(os.environ.get("SCALE_THREADS", "2"))),
              "fxforge": str(Path(fxforge.__file__).parent), "commit": _commit(), "rows": rows}
    for row in rows:
        row["target_gib"] = target_gib(row)
    record["shrink"] = shrink
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _commit() -> str:
    import fxforge

    try:
        return subprocess.run(["git", "-C", str(Path(fxforge.__file__).parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
