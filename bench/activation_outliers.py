"""How uneven are the input channels of code-lm's linear layers? (Why Wanda does not beat magnitude.)

Wanda scores a weight by |W_ij|·‖X_j‖₂; it beats magnitude pruning on LLMs because a few input
channels carry activations 100x larger than the rest (emergent outlier features, arXiv
2208.07339), so their small weights still matter. This script measures, for every linear layer
of code-lm, max_j ‖X_j‖ / median_j ‖X_j‖ over the same calibration windows `bench/prune.py`
uses. Prints a table; writes bench/results/activation_outliers_<variant>.json.

    python bench/activation_outliers.py [--variant small|tiny]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from _host import host_info  # bench/ is on sys.path when a script runs

from fxforge.ir.graph import linear_sites
from fxforge.ir.trace import trace
from fxforge.models.code_lm import load_code_lm
from fxforge.models.code_lm_data import token_stream, windows_evenly_spaced
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.prune.capture import capture_input_stats

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=["small", "tiny"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    lm = load_code_lm(args.variant)
    seq = lm.variant.context
    stream = token_stream(lm.tokenizer, lm.train_texts()[:200])
    calibration = [(w,) for w in windows_evenly_spaced(stream, seq, 64).split(4)]
    gm = trace(lm.model, (calibration[0][0],), {}, dynamic_shapes="auto")
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    sites = linear_sites(gm, None, None, False)
    stats = capture_input_stats(gm, [s.node for s in sites], calibration)

    rows = []
    for site in sites:
        norm = stats[site.node.name].norm
        rows.append({"layer": site.module_path, "max_over_median": float(norm.max() / norm.median())})
        print(f"{site.module_path:<40} max/median ||X_j|| = {rows[-1]['max_over_median']:6.1f}")
    ratios = [r["max_over_median"] for r in rows]
    summary = {"median": statistics.median(ratios), "max": max(ratios)}
    print(f"over {len(rows)} layers: median {summary['median']:.1f}, max {summary['max']:.1f} "
          "(LLMs with outlier features: ~100)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"activation_outliers_{args.variant}.json"
    path.write_text(json.dumps({"bench": "activation_outliers", "model": f"code-lm-{args.variant}",
                                "host": host_info(threads=1), "summary": summary, "layers": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
