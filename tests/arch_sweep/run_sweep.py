"""Run the architecture sweep outside pytest and record every cell in a JSON file.

    python tests/arch_sweep/run_sweep.py --out tests/arch_sweep/results.json [--shard 0/2]
    python tests/arch_sweep/run_sweep.py --merge a.json b.json --out tests/arch_sweep/results.json

The JSON is the sweep's expectation file: `test_architecture_sweep.py` turns every "fail" cell
into a strict xfail with the recorded reason (so a fix flips it to a failure until the file is
regenerated) and `render_docs.py` writes docs/architectures.md from it. Results are written after
every family, atomically, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (for `arch_sweep`)

# step order for a run: the cheap steps first, the ONNX export (the slowest) last
RUN_ORDER = ("trace", "fuse_attention", "add_kv_cache", "quantize", "add_adapters", "prune",
             "sparsify", "onnx")


def write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def sweep_family(family, steps=RUN_ORDER, entry: dict | None = None) -> dict:
    from arch_sweep.cells import new_traced, run_cell
    from arch_sweep.zoo import build

    start = time.perf_counter()
    built = build(family.model_type, family.kind)
    entry = entry or {"kind": family.kind, "class": family.class_name, "skip": built.skip,
                      "cells": {}, "seconds": {}}
    todo = [s for s in steps if s not in entry["cells"]]
    if built.skip is None and todo:
        traced = new_traced(built)
        # trace always (every step needs the graph); fuse_attention too when the cache goes on it
        needed = {"trace"} | ({"fuse_attention"} if "add_kv_cache" in todo else set())
        for step in [s for s in RUN_ORDER if s in todo or s in needed]:
            t0 = time.perf_counter()
            status, text = run_cell(traced, step)
            entry["cells"][step] = [status, text]
            entry["seconds"][step] = round(time.perf_counter() - t0, 2)
    entry["seconds"]["total"] = round(time.perf_counter() - start + entry["seconds"].get("total", 0), 2)
    return entry


def fill(out: Path) -> None:
    """Make the results file list every enumerated family, so none is dropped silently."""
    warnings.filterwarnings("ignore")
    from arch_sweep.zoo import build, families

    results = json.loads(out.read_text()) if out.exists() else {}
    for family in families():
        key = f"{family.kind}:{family.model_type}"
        if key not in results:
            built = build(family.model_type, family.kind)
            results[key] = {"kind": family.kind, "class": family.class_name, "skip": built.skip,
                            "cells": {}, "seconds": {}}
            build.cache_clear()  # one tiny model at a time in memory
    write_json(out, results)


def claim(folder: Path, key: str) -> bool:
    """Whether this process is the first to claim `key` in `folder` (an exclusive create)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / key.replace(":", "_"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th family starting at i")
    parser.add_argument("--only", nargs="*", help="model_types to run")
    parser.add_argument("--fill", action="store_true",
                        help="record every family not in --out as not buildable (with the reason) "
                             "or as pending (buildable, not swept yet), without running any step")
    parser.add_argument("--steps", nargs="*", default=list(RUN_ORDER), help="steps to record")
    parser.add_argument("--base", type=Path,
                        help="read the recorded cells from this file (not --out), and write only the "
                             "families this process runs to --out (merge them back with --merge)")
    parser.add_argument("--claims", type=Path,
                        help="a folder shared by several processes: each family is run by the first "
                             "process to claim it there (a file per family), so they split the work")
    parser.add_argument("--merge", nargs="*", type=Path, help="merge these result files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        merged: dict = {}
        for path in args.merge:  # cell by cell: shards may have recorded different steps
            for key, entry in json.loads(path.read_text()).items():
                if key not in merged:
                    merged[key] = entry
                else:
                    merged[key]["cells"].update(entry["cells"])
                    merged[key]["seconds"].update(entry["seconds"])
        write_json(args.out, merged)
        return
    if args.fill:
        fill(args.out)
        return
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from arch_sweep.zoo import families

    index, count = (int(x) for x in args.shard.split("/"))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    recorded = json.loads(args.base.read_text()) if args.base else results
    for i, family in enumerate(families()):
        key = f"{family.kind}:{family.model_type}"
        if i % count != index or (args.only and family.model_type not in args.only):
            continue
        entry = results.get(key) or recorded.get(key)
        if entry and (entry["skip"] or all(s in entry["cells"] for s in args.steps)):
            continue
        if args.claims and not claim(args.claims, key):
            continue
        results[key] = sweep_family(family, tuple(args.steps), entry)
        write_json(args.out, results)
        print(key, results[key]["seconds"]["total"], flush=True)


if __name__ == "__main__":
    main()
