"""Every GPU benchmark of fxforge in one run (issue 17, item 7): one JSON, one table per section.

Sections (each isolated: a failure is recorded with its traceback tail and the suite goes on;
each kernel is checked against its reference before it is timed):
  quantize          int4 (linear_wq) and W8A8 GEMV/GEMM vs fp16 cuBLAS      bench/quantize_gpu.py
  shift_add         LUT shift-add GEMV vs fp16 and int4 at batch 1          bench/shift_add_gpu.py
  lora              fused LoRA kernel vs unfused torch fp16 (rank 16)       bench/lora_gpu.py
  decode_attention  split-KV decode kernel vs SDPA (GQA)                    bench/attention_gpu.py
  flash_attention   flash-attention forward vs SDPA's flash backend         bench/attention_gpu.py
  medusa            Medusa vs plain greedy decoding, code-lm tiny, eager and triton backends
                                                                            bench/medusa_gpu.py
Writes bench/results/gpu_<gpu name>.json (and DIR/gpu_<gpu name>.json with --out DIR) after
every section, so an interrupted run keeps what it measured: device, versions, and per section
its rows, wall time and status ("ok", "failed: <error>" or "skipped: <why>").

    python bench/gpu_suite.py                  # full run on a CUDA GPU, < 8 minutes on an H100
    python bench/gpu_suite.py --quick          # smaller size sets, for a first try
    python bench/gpu_suite.py --out $OUT       # also write the JSON into $OUT
    python bench/gpu_suite.py --only lora,medusa
    TRITON_INTERPRET=1 python bench/gpu_suite.py --smoke   # CPU: every section, tiny shapes, one
                                                            # call instead of do_bench, no timing claims
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(BENCH.parent) not in sys.path:  # the repository root: fxforge is not installed on the GPU machine
    sys.path.insert(0, str(BENCH.parent))

DEFAULT_BUDGET_S = 450.0  # no new section starts after this (the issue asks for < 8 minutes in all)
TRACEBACK_TAIL = 3000


def _sections() -> list[tuple[str, str, Callable[..., Any], Callable[[Any], None]]]:
    """(name, what it compares, run(timer, device, quick=, smoke=), print_table(result))."""
    import attention_gpu
    import lora_gpu
    import medusa_gpu
    import quantize_gpu
    import shift_add_gpu

    return [
        ("quantize", "int4 / W8A8 Triton GEMV+GEMM vs fp16 cuBLAS", quantize_gpu.run, quantize_gpu.print_table),
        ("shift_add", "LUT shift-add GEMV vs fp16 cuBLAS and int4, batch 1", shift_add_gpu.run,
         shift_add_gpu.print_table),
        ("lora", "fused LoRA Triton kernel vs unfused torch fp16, rank 16", lora_gpu.run, lora_gpu.print_table),
        ("decode_attention", "split-KV decode kernel vs torch SDPA (GQA)", attention_gpu.bench_decode,
         attention_gpu.print_decode_table),
        ("flash_attention", "flash-attention forward vs SDPA flash backend", attention_gpu.bench_forward,
         attention_gpu.print_forward_table),
        ("medusa", "Medusa vs plain greedy decoding (code-lm tiny, eager + triton backends)", medusa_gpu.run,
         medusa_gpu.print_table),
    ]


SECTION_NAMES = ("quantize", "shift_add", "lora", "decode_attention", "flash_attention", "medusa")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller size sets (a fast first try)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU under TRITON_INTERPRET=1: tiny shapes, one call per kernel instead of do_bench, "
                        "no timing claims; results are written only with --out")
    p.add_argument("--out", default=None, help="also write the JSON into this folder")
    p.add_argument("--only", default=None, help=f"comma-separated sections, of {', '.join(SECTION_NAMES)}")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="start no section after this many seconds (later ones are recorded as skipped)")
    return p.parse_args(argv)


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None if done.returncode == 0 else None
    except Exception:
        return None


def environment(device: str) -> dict:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "host": platform.node(), "fxforge_commit": _git_commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # the sections that need it fail on their own
        info["triton"] = f"unavailable: {e}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                     "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                     "cuda": torch.version.cuda})
    else:
        info.update({"device": f"cpu ({platform.processor() or platform.machine()}), TRITON_INTERPRET=1",
                     "cuda": None})
    return info


def autotune_choices() -> dict:
    """Per autotuned fxforge kernel, the config chosen for each key it was tuned on."""
    choices: dict[str, dict] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("fxforge.kernels.") or module is None:
            continue
        for attr, obj in vars(module).items():
            cache = getattr(obj, "cache", None)
            if isinstance(cache, dict) and cache and hasattr(obj, "configs"):
                choices[f"{name.rsplit('.', 1)[-1]}.{attr}"] = {str(k): str(v) for k, v in cache.items()}
    return choices


def _write(record: dict, paths: list[Path]) -> None:
    text = json.dumps(record, indent=2, default=str) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _status_line(name: str, section: dict) -> str:
    return f"== {name}: {section['status'].splitlines()[0][:200]} ({section['wall_s']:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            # must be set before triton compiles anything (the kernels read it at import)
            if any(m == "triton" or m.startswith("fxforge.kernels") for m in sys.modules):
                sys.exit("bench/gpu_suite.py --smoke: run it with TRITON_INTERPRET=1 set in the environment.")
            os.environ["TRITON_INTERPRET"] = "1"
        device = "cpu"
    else:
        from _gpu import require_cuda

        require_cuda("bench/gpu_suite.py")
        device = "cuda"
    import torch
    from _gpu import RESULTS_DIR, gpu_timer, single_call_ms

    wanted = [s.strip() for s in args.only.split(",")] if args.only else list(SECTION_NAMES)
    unknown = [s for s in wanted if s not in SECTION_NAMES]
    if unknown:
        sys.exit(f"bench/gpu_suite.py: unknown section(s) {unknown}; choose from {', '.join(SECTION_NAMES)}")

    suite_start = time.perf_counter()
    env = environment(device)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    record: dict[str, Any] = {
        "benchmark": "gpu_suite", "mode": mode, **env,
        "timing": ("none: --smoke runs each kernel once on the CPU interpreter; its *_ms fields are no measurement"
                   if args.smoke else "ms per call from triton.testing.do_bench (mean), unless a section says"),
        "sections": {},
    }
    safe = re.sub(r"[^A-Za-z0-9]+", "_", env["device"] if device == "cuda" else "smoke_cpu").strip("_")
    filename = f"gpu_{safe}.json" if mode != "quick" else f"gpu_{safe}_quick.json"
    paths = [] if args.smoke else [RESULTS_DIR / filename]
    if args.out:
        paths.append(Path(args.out) / filename)
    print(f"gpu_suite ({mode}) on {env['device']}: torch {env['torch']}, triton {env['triton']}", flush=True)

    try:
        sections = _sections()
    except Exception:  # an import failed: record it for every section
        tail = traceback.format_exc()[-TRACEBACK_TAIL:]
        for name in wanted:
            record["sections"][name] = {"status": "failed: importing the benchmark scripts", "wall_s": 0.0,
                                        "rows": [], "traceback": tail}
        _write(record, paths)
        print(tail)
        return 1

    if "medusa" in wanted and not args.smoke:
        try:  # code-lm tiny trains on one CPU thread while the kernel sections use the GPU
            import medusa_gpu

            if medusa_gpu.start_model_in_background():
                print("(medusa: training code-lm tiny in a background process meanwhile)", flush=True)
        except Exception as e:  # the medusa section then trains it itself
            print(f"(medusa: background training not started: {type(e).__name__}: {e})", flush=True)
    timer = single_call_ms if args.smoke else gpu_timer()
    for name, what, run, print_table in sections:
        if name not in wanted:
            continue
        elapsed = time.perf_counter() - suite_start
        section: dict[str, Any] = {"what": what}
        if elapsed > args.budget_s:
            section.update(status=f"skipped: the suite's time budget ({args.budget_s:.0f} s) was spent "
                                  f"({elapsed:.0f} s elapsed)", wall_s=0.0, rows=[])
            record["sections"][name] = section
            print(_status_line(name, section), flush=True)
            _write(record, paths)
            continue
        print(f"\n== {name}: {what}", flush=True)
        start = time.perf_counter()
        try:
            result = run(timer, device, quick=args.quick, smoke=args.smoke)
            if device == "cuda":
                torch.cuda.synchronize()
            section["status"] = "ok"
            section.update(result if isinstance(result, dict) else {"rows": result})
        except (Exception, SystemExit) as e:  # check_close exits with SystemExit naming the kernel
            message = str(e) or type(e).__name__
            section.update(status=f"failed: {type(e).__name__}: {message}"[:1000], rows=[],
                           traceback=traceback.format_exc()[-TRACEBACK_TAIL:])
        section["wall_s"] = round(time.perf_counter() - start, 2)
        record["sections"][name] = section
        if section["status"] == "ok":
            try:
                print_table(result)
            except Exception as e:  # a table bug must not lose the measured rows
                print(f"(table failed: {type(e).__name__}: {e})")
        else:
            print(section["traceback"])
        print(_status_line(name, section), flush=True)
        record["wall_s"] = round(time.perf_counter() - suite_start, 2)
        _write(record, paths)
        result = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    if "medusa_gpu" in sys.modules:
        sys.modules["medusa_gpu"].stop_background()
    record["autotune"] = autotune_choices()
    record["wall_s"] = round(time.perf_counter() - suite_start, 2)
    _write(record, paths)
    print(f"\nsummary ({mode}, {record['wall_s']:.0f} s):")
    for name, section in record["sections"].items():
        print(f"  {name:<17} {section['status'].splitlines()[0][:150]:<60} {section['wall_s']:>7.1f} s")
    for path in paths:
        print(f"wrote {path}")
    failed = [n for n, s in record["sections"].items() if s["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
