"""Run the composition matrix outside pytest and record every cell in tests/composition/results.json.

    python tests/composition/run_matrix.py                       # every model, pair and backend
    python tests/composition/run_matrix.py --models gpt2 --rows quantize sparsify   # re-run some

The JSON is the matrix's expectation file: `test_composition.py` checks that every pair of every
model has a cell, that no cell is silent, and re-runs a sample against it (all of it under
FXFORGE_COMPOSE=all); `render_docs.py` writes docs/composition.md from it. Results are written
after every cell, atomically, so an interrupted run keeps what it measured.

Backends cost more than the passes (an ONNX export is ~10 s here), so the full run exports each
distinct graph *kind* once per model: the first cell whose graph has a given set of fxforge ops
(and inputs) runs on ONNX and Triton; later cells with the same set record that cell's outcome
with "as <pair>" (docs/composition.md says so). FXFORGE_COMPOSE_EVERY_BACKEND=1 runs them all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (for `composition`, `arch_sweep`)

from arch_sweep.run_sweep import write_json  # noqa: E402  (one atomic JSON writer for both matrices)

RESULTS = Path(__file__).with_name("results.json")


def backend_key(model_name: str, stage) -> tuple:
    from fxforge.backends import fxforge_ops_in

    return (model_name, tuple(sorted(fxforge_ops_in(stage.gm))), len(stage.example_inputs))


def run(models, rows, cols, out: Path, every_backend: bool) -> dict:
    from composition import cells
    from composition.models import MODELS

    warnings.filterwarnings("ignore")
    os.environ.setdefault("FXFORGE_PROGRESS", "0")
    results = json.loads(out.read_text()) if out.exists() else {}
    passes = cells.all_passes()
    results["passes"] = passes
    results["options"] = {name: cells.PASS_OPTIONS[name] for name in passes}
    table = results.setdefault("models", {})
    seen: dict[tuple, tuple[str, dict]] = {}
    for model_name in models or MODELS:
        entry = table.setdefault(model_name, {})
        for a in rows or passes:
            for b in cols or passes:
                def runner(stage, backend, pair=f"{a},{b}", model_name=model_name):
                    key = backend_key(model_name, stage) + (backend,)
                    if not every_backend and key in seen:
                        first_pair, outcome = seen[key]
                        return [outcome[0], f"as {first_pair}: {outcome[1]}"]
                    outcome = cells.run_backend(stage, backend)
                    seen[key] = (pair, outcome)
                    return outcome

                cell = cells.run_cell(model_name, a, b, backend_runner=runner)
                entry[f"{a},{b}"] = cell.as_json()
                print(f"{model_name:6} {a:>17} → {b:<17} {cell.status:9} {cell.seconds:6.1f}s  {cell.text[:90]}",
                      flush=True)
                write_json(out, results)
        cells.first.cache_clear()  # one model's graphs in memory at a time
        cells.canonical.cache_clear()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--rows", nargs="*", help="first passes (default: all)")
    parser.add_argument("--cols", nargs="*", help="second passes (default: all)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run(args.models, args.rows, args.cols, args.out, os.environ.get("FXFORGE_COMPOSE_EVERY_BACKEND") == "1")
    print(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
