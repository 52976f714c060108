"""Compile time of `fxforge compile` vs onnxruntime-genai's builder, interleaved (issue 16).

Only the compile part of `bench/llm_e2e.py` (its `interleaved_compiles`): compile time on a
shared machine swings ±15% from one minute to the next, so the two commands run alternately,
round after round, on the same saved directory (TinyLlama-shaped, random weights, a real
tokenizer); wall seconds, CPU seconds (user + sys of the child) and peak RSS per round, and the
median wall ratio.

    python bench/compile_vs_builder.py [--layers 4] [--rounds 3] [--hf DIR]

Needs onnxruntime-genai in its own venv (built by llm_e2e's `ensure_genai_venv`, or
FXFORGE_GENAI_PYTHON). Writes bench/results/compile_vs_builder.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from llm_e2e import interleaved_compiles, save_llama_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf", type=Path, help="a saved HF directory (default: build one)")
    parser.add_argument("--passes", default="quantize(bits=4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fxforge-compile-vs-builder-") as tmp:
        work = Path(tmp)
        hf = args.hf or work / "hf"
        if args.hf is None:
            save_llama_dir(hf, args.layers)
        rows = interleaved_compiles(hf, work, args.passes, args.rounds)
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
