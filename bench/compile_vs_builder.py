"""Compile time of `fxforge compile` vs onnxruntime-genai's builder, interleaved (issue 16).

`bench/llm_e2e.py` compiles each model once; compile time on a shared machine swings ±15% from
one minute to the next, so this runs the two commands alternately, round after round, on the
same saved directory (TinyLlama-shaped, random weights, a real tokenizer), and reports wall
seconds, CPU seconds (user + sys of the child) and peak RSS per round, and the median wall ratio.

    python bench/compile_vs_builder.py [--layers 4] [--rounds 3] [--hf DIR]

Needs onnxruntime-genai in its own venv (built by llm_e2e's `ensure_genai_venv`, or
FXFORGE_GENAI_PYTHON). Writes bench/results/compile_vs_builder.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from llm_e2e import ensure_genai_venv, repo_env, run_measured, save_llama_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf", type=Path, help="a saved HF directory (default: build one)")
    parser.add_argument("--passes", default="quantize(bits=4)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxforge-compile-vs-builder-") as tmp:
        work = Path(tmp)
        hf = args.hf or work / "hf"
        if args.hf is None:
            save_llama_dir(hf, args.layers)
        ours = [sys.executable, "-m", "fxforge.cli", "compile", str(hf), "--task", "text-generation-with-past",
                "--backend", "onnx", "-o", str(work / "ours"), "--passes", args.passes]
        theirs = [str(ensure_genai_venv()), "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                  "-o", str(work / "builder"), "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")]
        for r in range(args.rounds):
            mine, peer = run_measured(ours, repo_env()), run_measured(theirs)
            shutil.rmtree(work / "ours", ignore_errors=True)
            shutil.rmtree(work / "builder", ignore_errors=True)
            ratio = mine["wall_s"] / peer["wall_s"]
            rows.append({"fxforge": mine, "builder": peer, "wall_ratio": round(ratio, 3)})
            print(f"round {r}: fxforge {mine['wall_s']:.2f} s ({mine['cpu_s']:.2f} CPU s, "
                  f"{mine['peak_rss_mib']:.0f} MiB) | builder {peer['wall_s']:.2f} s ({peer['cpu_s']:.2f} CPU s, "
                  f"{peer['peak_rss_mib']:.0f} MiB) | ratio {ratio:.2f}", flush=True)
    median = statistics.median(r["wall_ratio"] for r in rows)
    print(f"median wall ratio {median:.2f} (issue 16's limit: 1.5)")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = ROOT / "bench" / "results" / "compile_vs_builder.json"
    from fxforge.atomic import atomic_file

    with atomic_file(out) as path:
        path.write_text(json.dumps({"commit": commit, "layers": args.layers, "passes": args.passes,
                                    "rounds": rows, "median_wall_ratio": median}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
