"""Decode with and without the decoder artifact's ONNX Runtime fusions (GroupQueryAttention, skip norms).

One TinyLlama-shaped Llama directory (`bench/llm_e2e.py`'s, `--layers` of them) is compiled once
per precision in this process (fp32, and `quantize(bits=4)` with its defaults) with the task's
passes, then written twice by `export_decoder`: `ort_fusions=False` (standard ONNX: Attention +
Concat cache, the model's RMSNorm spelling) and `ort_fusions=True` (`decoder_artifact.fuse_for_ort`).
Each precision's two files are timed by plain onnxruntime sessions (1 intra-op thread) in interleaved
rounds (one precision at a time, so at most two sessions are loaded):
decode ms/token at past 128 and prefill ms at 128 tokens (medians), plus node counts, the op
histogram's fused ops, the largest |logit| difference fused vs unfused on a decode step, and the
process's peak RSS. JSON: bench/results/ort_decode_fusions.json.

    python bench/ort_decode_fusions.py [--layers 4] [--rounds 3] [--calls 10]
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_e2e import PAST, RESULTS, Decoder, describe, save_llama_dir, time_all  # noqa: E402

PRECISIONS = {"int4": "quantize(bits=4)", "fp32": ""}


def build(hf: Path, work: Path, passes: str, name: str) -> dict[str, Path]:
    import fxforge
    from fxforge.text_generation import TASK, with_passes

    loaded = fxforge.from_pretrained(hf, task=TASK, seq=8, batch=2)
    compiled = fxforge.compile(loaded.model, loaded.args, loaded.kwargs,
                               passes=with_passes(passes, loaded.task_passes), backend="eager")
    paths = {}
    for fused in (False, True):
        out = work / f"{name}_{'fused' if fused else 'plain'}"
        fxforge.export_decoder(compiled, out, tokenizer=loaded.tokenizer, config=loaded.model.config,
                               ort_fusions=fused)
        paths[out.name] = out / "model.onnx"
    del compiled, loaded
    gc.collect()
    return paths


def logit_gap(plain: Decoder, fused: Decoder) -> float:
    rng = np.random.default_rng(1)
    past = plain.empty_past(PAST, rng)
    ids = np.array([[17]])
    return float(np.abs(plain.step(ids, past)[0] - fused.step(ids, past)[0]).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10, help="decode calls per model per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fxforge-ortfusions-") as tmp:
        work = Path(tmp)
        config = save_llama_dir(work / "hf", args.layers)
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        rows = {}
        for name, passes in PRECISIONS.items():
            paths = build(work / "hf", work, passes, name)
            decoders = {k: Decoder(str(p), config["num_key_value_heads"], head_dim) for k, p in paths.items()}
            rows.update(time_all(decoders, args.rounds, args.calls))
            rows[f"{name}_fused"]["max_abs_logit_diff_vs_plain"] = logit_gap(decoders[f"{name}_plain"],
                                                                             decoders[f"{name}_fused"])
            for key, path in paths.items():
                facts = describe(path)
                fused_ops = {op: n for op, n in facts["op_types"].items() if op.startswith("com.microsoft:")
                             or "LayerNormalization" in op or op.endswith(":Attention")}
                rows[key].update(nodes=facts["nodes"], file_bytes=facts["file_bytes"], ops=fused_ops)
            print(name, {k: rows[k] for k in paths}, flush=True)
            del decoders
            gc.collect()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'model':<12} {'nodes':>6} {'decode ms/tok':>14} {'prefill ms':>11}  fused ops")
    for key, row in rows.items():
        print(f"{key:<12} {row['nodes']:>6} {row['decode_ms_per_token']:>14} {row['prefill_ms_128']:>11}  {row['ops']}")
    for name in PRECISIONS:
        plain, fused = rows[f"{name}_plain"], rows[f"{name}_fused"]
        print(f"{name}: fused/plain decode {fused['decode_ms_per_token'] / plain['decode_ms_per_token']:.3f}, "
              f"prefill {fused['prefill_ms_128'] / plain['prefill_ms_128']:.3f}, "
              f"max |logit diff| {fused['max_abs_logit_diff_vs_plain']:.2e}")
    print(f"peak RSS {peak_mib:.0f} MiB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"layers": args.layers, "rounds": args.rounds, "past": PAST, "threads": 1, "rows": rows,
              "peak_rss_mib": round(peak_mib)}
    (RESULTS / "ort_decode_fusions.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
