"""Run the composition matrix outside pytest and record every cell in tests/composition/results.json.

    python tests/composition/run_matrix.py                       # every model, pair and backend
    python tests/composition/run_matrix.py --models gpt2 --rows quantize --cols sparsify   # re-run some

or in parts (how the committed results were made, three models in parallel):

    python tests/composition/run_matrix.py --backends eager --models gpt2 --out gpt2.json   # passes only
    python tests/composition/run_matrix.py --out gpt2.json --backends-phase kinds.json      # one export per kind
    python tests/composition/run_matrix.py --merge gpt2.json llama.json bert.json --kinds kinds.json

The JSON is the matrix's expectation file: `test_composition.py` checks that every pair of every
model has a cell, that no cell is silent, and re-runs a sample against it (all of it under
FXFORGE_COMPOSE=all); `render_docs.py` writes docs/composition.md from it. Results are written
after every cell, atomically, so an interrupted run keeps what it measured.

Backends cost more than the passes (an ONNX export is ~10 s on a quiet machine), so the full run
lowers each distinct graph *kind* once per model: the first cell whose graph has a given set of
fxforge ops (and inputs) runs on ONNX and Triton; later cells of that kind record its outcome as
"as <pair>: ..." (docs/composition.md says so). FXFORGE_COMPOSE_EVERY_BACKEND=1 lowers them all.
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
os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: before triton is imported; no GPU here

from arch_sweep.run_sweep import write_json  # noqa: E402  (one atomic JSON writer for both matrices)

RESULTS = Path(__file__).with_name("results.json")


def backend_key(model_name: str, stage) -> tuple:
    from composition.cells import graph_kind

    return (model_name, graph_kind(stage))


def run(models, rows, cols, out: Path, every_backend: bool, backends=None) -> dict:
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

                cell = cells.run_cell(model_name, a, b, backends=backends or cells.BACKENDS, backend_runner=runner)
                entry[f"{a},{b}"] = cell.as_json()
                print(f"{model_name:6} {a:>17} → {b:<17} {cell.status:9} {cell.seconds:6.1f}s  {cell.text[:90]}",
                      flush=True)
                write_json(out, results)
        cells.first.cache_clear()  # one model's graphs in memory at a time
        cells.canonical.cache_clear()
    return results


def run_backends(models, source: Path, kinds_path: Path, backends=("onnx", "triton")) -> dict:
    """Lower one representative cell per model and graph kind (its fxforge ops and inputs) of the
    eager-only results in `source`; outcomes go to `kinds_path` ({model: {kind: {"pair", backend:
    [status, text]}}}), which `merge` applies to every cell of that kind."""
    from composition import cells
    from composition.models import MODELS

    warnings.filterwarnings("ignore")
    os.environ.setdefault("FXFORGE_PROGRESS", "0")
    results = json.loads(source.read_text())
    kinds = json.loads(kinds_path.read_text()) if kinds_path.exists() else {}
    for model_name in models or MODELS:
        entry = results["models"].get(model_name, {})
        done = kinds.setdefault(model_name, {})
        for pair, cell in entry.items():
            kind = cell.get("graph")
            if cell["status"] not in ("composes", "skips") or not kind or all(b in done.get(kind, {}) for b in backends):
                continue
            a, b = pair.split(",")
            start = time.perf_counter()
            after, _ = cells.run_after(cells.first(model_name, a), b, model_name)
            done[kind] = {**done.get(kind, {}), "pair": pair,
                          **{backend: cells.run_backend(after, backend) for backend in backends}}
            print(f"{model_name:6} {kind:40} {pair:35} {time.perf_counter() - start:6.1f}s "
                  f"{[done[kind][b][0] for b in backends]}", flush=True)
            write_json(kinds_path, kinds)
        cells.first.cache_clear()
        cells.canonical.cache_clear()
    return kinds


def merge(paths: list[Path], out: Path, kinds_paths: list[Path] | None, strip: dict | None = None) -> None:
    """Merge per-model result files (run in parallel) into `out`; with `kinds_path`, give every
    cell of a lowered graph kind its backends ("as <pair>" for all but the one lowered); `strip`
    {backend: [kinds files]} ignores that backend's outcomes in those files."""
    strip = strip or {}
    results = json.loads(out.read_text()) if out.exists() else {}
    for path in paths:
        part = json.loads(path.read_text())
        results["passes"], results["options"] = part["passes"], part["options"]
        for model, entry in part["models"].items():
            results.setdefault("models", {}).setdefault(model, {}).update(entry)
    lowered_by: dict = {}  # model -> kind -> backend -> (pair lowered, outcome); later files win
    for kinds_path in kinds_paths or ():
        for model, kinds in json.loads(kinds_path.read_text()).items():
            for kind, lowered in kinds.items():
                for backend, outcome in lowered.items():
                    if backend != "pair" and (backend not in strip or kinds_path not in strip[backend]):
                        lowered_by.setdefault(model, {}).setdefault(kind, {})[backend] = (lowered["pair"], outcome)
    for model, entry in results.get("models", {}).items():
        for pair, cell in entry.items():
            for backend, (lowered_pair, outcome) in lowered_by.get(model, {}).get(cell.get("graph", ""), {}).items():
                cell["backends"][backend] = outcome if lowered_pair == pair else \
                    [outcome[0], f"as {lowered_pair}: {outcome[1]}"]
    write_json(out, results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--rows", nargs="*", help="first passes (default: all)")
    parser.add_argument("--cols", nargs="*", help="second passes (default: all)")
    parser.add_argument("--backends", nargs="*", help="default: eager onnx triton")
    parser.add_argument("--backends-phase", type=Path, metavar="KINDS_JSON",
                        help="lower one cell per graph kind of --out (eager-only results) into KINDS_JSON")
    parser.add_argument("--merge", nargs="*", type=Path, help="merge these result files into --out")
    parser.add_argument("--kinds", nargs="*", type=Path, help="with --merge: the lowered kinds to apply")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.merge:
        return merge(args.merge, args.out, args.kinds)
    if args.backends_phase:
        run_backends(args.models, args.out, args.backends_phase, tuple(args.backends or ("onnx", "triton")))
        return print(f"done in {time.perf_counter() - start:.0f}s")
    run(args.models, args.rows, args.cols, args.out, os.environ.get("FXFORGE_COMPOSE_EVERY_BACKEND") == "1",
        args.backends)
    print(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
