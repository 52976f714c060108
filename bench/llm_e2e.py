"""HF directory → int4 ONNX decoder, end to end: fxforge vs onnxruntime-genai's builder vs ORT's quantizer.

One saved Llama directory (TinyLlama shapes: hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
vocab 32000; `--layers` of them, random weights seeded, a `tokenizers` BPE tokenizer) goes through:

  fxforge_int4   `fxforge compile DIR --task text-generation-with-past --backend onnx
                 --passes "quantize(bits=4)"` (the CLI, group size 128 by default)
  builder_int4   `python -m onnxruntime_genai.models.builder -i DIR -o OUT -p int4 -e cpu`, run in its
                 own venv (~/.cache/fxforge-bench/genai-venv, reused when present)
  ort_int4       an optimum-style fp32 export (fxforge's fp32 decoder artifact: the same conventional
                 names optimum writes) + onnxruntime's `MatMulNBitsQuantizer` (block 32, symmetric,
                 accuracy level 4, as the builder's CPU int4); its compile time is export + quantize

Each compile runs in a fresh subprocess: wall time, and peak RSS from `os.wait4`'s ru_maxrss; then
`--compile-rounds` more fxforge int4 and builder compiles alternate, and the compile target is the
median of their per-round ratios (one compile each swings +-15% with the machine's load). Then
every ONNX file is driven by plain `onnxruntime` sessions (1 intra-op thread) through its own I/O
names: decode ms/token at past 128 and prefill ms at 128 tokens (interleaved rounds over the models,
medians), and top-1 agreement with fp32 `transformers` over 32 teacher-forced steps (the fp32
model's greedy continuation of a prompt is fed back; the fp32 fxforge artifact is listed as a check).
File size, node count, I/O names and the op-type histogram (domain:op) of each file go in the JSON
(bench/results/llm_e2e_cpu.json, or llm_e2e_cpu_quick.json with --quick: 2 layers, fewer rounds).
A peer that fails to install or compile is recorded as `"failed: ..."` and the others go on.

    python bench/llm_e2e.py [--layers 4] [--rounds 5] [--compile-rounds 3] [--quick] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GENAI_VENV = Path.home() / ".cache" / "fxforge-bench" / "genai-venv"
GENAI_PIN = "onnxruntime-genai==0.18.0"
PAST = 128            # decode timing: past length
PREFILL = 128         # prefill timing: prompt length
STEPS = 32            # teacher-forced agreement steps
INT4 = ("fxforge_int4", "builder_int4", "ort_int4")


# ---------------------------------------------------------------- the model directory
def save_llama_dir(directory: Path, layers: int) -> dict[str, Any]:
    """TinyLlama-shaped Llama with `layers` layers, seeded random weights, and a real tokenizer."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_dirs import _decoder_tokenizer  # the tests' BPE tokenizer, trained on a few sentences

    tokenizer = _decoder_tokenizer()
    config = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    assert len(tokenizer) <= config.vocab_size, "the model's vocab must cover the tokenizer"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    # HF's init (std 0.02) gives near-uniform logits; a larger embedding/head spread makes top-1 meaningful.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return config.to_dict()


# ---------------------------------------------------------------- compiles, each in a fresh process
def run_measured(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, Any]:
    """Run `cmd` as a child; its wall seconds, CPU seconds (user + system) and peak RSS (MiB,
    ru_maxrss of that process)."""
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    if proc.returncode != 0:
        # the last lines that are not progress bars: where the child says what went wrong
        lines = [ln for ln in log.read_text().replace("\r", "\n").splitlines() if "it/s]" not in ln] if log else []
        tail = "\n".join(lines[-6:])[-1500:]
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {tail}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def repo_env() -> dict[str, str]:
    """The environment with this checkout's fxforge first on the path."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def compile_fxforge(hf: Path, out: Path, passes: str, log: Path) -> dict[str, Any]:
    """`fxforge compile` through the CLI, as a user would run it."""
    cmd = [sys.executable, "-m", "fxforge.cli", "compile", str(hf), "--task", "text-generation-with-past",
           "--backend", "onnx", "-o", str(out)] + (["--passes", passes] if passes else [])
    return {**run_measured(cmd, env=repo_env(), log=log), "onnx": str(out / "model.onnx")}


def ensure_genai_venv() -> Path:
    """The venv the builder runs in: onnxruntime-genai without deps, the main venv's packages after it.

    The builder needs torch/transformers/onnx, which this venv already has; installing genai's own
    onnxruntime next to ours could replace it, so genai comes in alone and a .pth file appends the
    main venv's site-packages (the bench venv's own packages still win).
    """
    python = GENAI_VENV / "bin" / "python"
    probe = [str(python), "-c", "import onnxruntime_genai, onnxruntime, torch, transformers"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(GENAI_VENV)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", GENAI_PIN],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install {GENAI_PIN} failed: {pip.stderr[-800:]}")
    import site
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "zz_fxforge_main_venv.pth").write_text(site.getsitepackages()[0] + "\n")
    check = subprocess.run(probe, capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai venv cannot import its needs: {check.stderr[-800:]}")
    return python


def compile_builder(hf: Path, out: Path, work: Path, log: Path) -> dict[str, Any]:
    """onnxruntime-genai's model builder, int4 for the CPU, in its own venv."""
    python = ensure_genai_venv()
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")]
    return {**run_measured(cmd, log=log), "onnx": str(out / "model.onnx")}


def interleaved_compiles(hf: Path, work: Path, passes: str, rounds: int) -> list[dict[str, Any]]:
    """`fxforge compile` then the builder on `hf`, round after round (compile time on a shared
    machine swings +-15% from one minute to the next: a ratio of two compiles minutes apart says
    little). Each round: both children's wall, CPU seconds and peak RSS, and the wall ratio."""
    import shutil

    results = []
    for r in range(rounds):
        mine = compile_fxforge(hf, work / "round-fxforge", passes, work / "round-fxforge.log")
        peer = compile_builder(hf, work / "round-builder", work, work / "round-builder.log")
        for side in (mine, peer):
            side.pop("onnx")
        shutil.rmtree(work / "round-fxforge", ignore_errors=True)
        shutil.rmtree(work / "round-builder", ignore_errors=True)
        ratio = mine["wall_s"] / peer["wall_s"]
        results.append({"fxforge": mine, "builder": peer, "wall_ratio": round(ratio, 3)})
        print(f"compile round {r}: fxforge {mine['wall_s']:.2f} s ({mine['cpu_s']:.2f} CPU s, "
              f"{mine['peak_rss_mib']:.0f} MiB) | builder {peer['wall_s']:.2f} s ({peer['cpu_s']:.2f} CPU s, "
              f"{peer['peak_rss_mib']:.0f} MiB) | ratio {ratio:.2f}", flush=True)
    return results


def compile_ort(fp32_onnx: Path, fp32_compile: dict[str, Any], out: Path, log: Path) -> dict[str, Any]:
    """ORT's MatMulNBitsQuantizer on the fp32 export; time and RSS add the export's."""
    if fp32_compile is None:
        raise RuntimeError("ORT's quantizer needs the fp32 export (row fxforge_fp32), which failed")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_ort-quantize", str(fp32_onnx), str(out / "model.onnx")]
    quant = run_measured(cmd, log=log)
    return {"wall_s": round(fp32_compile["wall_s"] + quant["wall_s"], 2),
            "peak_rss_mib": max(fp32_compile["peak_rss_mib"], quant["peak_rss_mib"]),
            "quantize_wall_s": quant["wall_s"], "export_wall_s": fp32_compile["wall_s"],
            "onnx": str(out / "model.onnx")}


def ort_quantize(src: str, dst: str) -> None:
    """Child process of compile_ort: int4 MatMulNBits on every MatMul with a constant weight."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    model = quantizer.model.model
    onnx.save_model(model, dst, save_as_external_data=model.ByteSize() > 1.8e9, location=Path(dst).name + ".data")


# ---------------------------------------------------------------- static facts of each file
def describe(onnx_path: Path) -> dict[str, Any]:
    """Bytes on disk (model + external data), node count, op histogram, I/O names of one ONNX file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = {onnx_path}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(onnx_path.parent / entry.value)
    ops = Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in model.graph.node)
    blocks = sorted({a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                     if a.name == "block_size"})
    return {"file_bytes": sum(f.stat().st_size for f in files), "nodes": len(model.graph.node),
            "matmulnbits_block_sizes": blocks,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


# ---------------------------------------------------------------- driving a file by its names
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


class Decoder:
    """A plain onnxruntime session fed by input names (conventional KV decoder names)."""

    def __init__(self, path: str, kv_heads: int, head_dim: int, threads: int = 1,
                 profile_prefix: str | None = None, session_config: dict[str, str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():  # ORT config keys (bench/int4_decode_variants.py)
            opts.add_session_config_entry(key, value)
        if profile_prefix:  # ORT's per-node profile (bench/cpu_llm.py reads it)
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        known = {"input_ids", "attention_mask", "position_ids"}
        unknown = [n for n in self.inputs if n not in known and not n.startswith("past_key_values.")]
        if unknown or "input_ids" not in self.inputs:
            raise ValueError(f"{path}: inputs {list(self.inputs)} are not a conventional KV decoder's")
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        # (batch, kv_heads, past, head_dim); the builder leaves head_dim symbolic ("kv_cache_dim")
        shape = self.inputs[self.past_names[0]].shape
        self.kv_heads = shape[1] if isinstance(shape[1], int) else kv_heads
        self.head_dim = shape[3] if isinstance(shape[3], int) else head_dim
        self.kv_dtype = _NP[self.inputs[self.past_names[0]].type]

    def empty_past(self, length: int = 0, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        shape = (1, self.kv_heads, length, self.head_dim)
        make = (lambda: rng.standard_normal(shape).astype(self.kv_dtype)) if rng else \
            (lambda: np.zeros(shape, self.kv_dtype))
        return {n: make() for n in self.past_names}

    def feed(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        past_len = next(iter(past.values())).shape[2]
        total = past_len + ids.shape[1]
        values = {"input_ids": ids.astype(_NP[self.inputs["input_ids"].type]),
                  "attention_mask": np.ones((1, total), np.int64),
                  "position_ids": np.arange(past_len, total, dtype=np.int64)[None]}
        feeds = {n: values[n].astype(_NP[self.inputs[n].type]) for n in ("input_ids", "attention_mask", "position_ids")
                 if n in self.inputs}
        return {**feeds, **past}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of the last position and the next past (present.i.* renamed past_key_values.i.*)."""
        results = dict(zip(self.outputs, self.session.run(None, self.feed(ids, past))))
        present = {n.replace("present.", "past_key_values.", 1): v for n, v in results.items()
                   if n.startswith("present.")}
        return results["logits"][0, -1], present

    def time_call(self, feeds: dict[str, np.ndarray]) -> float:
        start = time.perf_counter()
        self.session.run(None, feeds)
        return (time.perf_counter() - start) * 1e3


def reference_tokens(hf: Path, prompt_len: int) -> tuple[np.ndarray, list[int]]:
    """(prompt ids, fp32 transformers' greedy continuation of STEPS tokens)."""
    import torch
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(hf)
    text = "the quick brown fox jumps over the lazy dog and a compiler rewrites a graph"
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, :prompt_len]
    model = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=STEPS, do_sample=False,
                             min_new_tokens=STEPS, pad_token_id=model.config.pad_token_id)
    del model
    return prompt.numpy(), out[0, prompt.shape[1]:].tolist()


def agreement(decoder: Decoder, prompt: np.ndarray, reference: list[int]) -> float:
    """Share of STEPS teacher-forced steps whose argmax equals fp32 transformers' token."""
    logits, past = decoder.step(prompt, decoder.empty_past())
    hits = [int(np.argmax(logits)) == reference[0]]
    for i in range(1, len(reference)):
        logits, past = decoder.step(np.array([[reference[i - 1]]]), past)
        hits.append(int(np.argmax(logits)) == reference[i])
    return sum(hits) / len(hits)


def time_all(decoders: dict[str, Decoder], rounds: int, decode_calls: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds: each round times every model's decode (past PAST) then prefill (PREFILL)."""
    rng = np.random.default_rng(0)
    decode_feeds = {k: d.feed(np.array([[17]]), d.empty_past(PAST, rng)) for k, d in decoders.items()}
    prefill_feeds = {k: d.feed(rng.integers(3, 300, (1, PREFILL)), d.empty_past()) for k, d in decoders.items()}
    samples: dict[str, dict[str, list[float]]] = {k: {"decode": [], "prefill": []} for k in decoders}
    for k, d in decoders.items():  # warm-up: first runs allocate and pick kernels
        d.time_call(decode_feeds[k])
        d.time_call(prefill_feeds[k])
    for _ in range(rounds):
        for k, d in decoders.items():
            samples[k]["decode"] += [d.time_call(decode_feeds[k]) for _ in range(decode_calls)]
            samples[k]["prefill"].append(d.time_call(prefill_feeds[k]))
    return {k: {"decode_ms_per_token": round(statistics.median(s["decode"]), 2),
                "prefill_ms_128": round(statistics.median(s["prefill"]), 1),
                "decode_samples": len(s["decode"]), "prefill_samples": len(s["prefill"])}
            for k, s in samples.items()}


# ---------------------------------------------------------------- the run
def failure(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc)[-600:]}"


def targets(rows: dict[str, dict[str, Any]], compile_rounds: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The issue's targets for fxforge int4 against the builder; None where a side is missing.
    The compile ratio is the median of the interleaved rounds' (`interleaved_compiles`) when there
    are any, else the ratio of the two compiles that made the timed files."""
    ours, theirs = rows.get("fxforge_int4", {}), rows.get("builder_int4", {})

    def ratio(key: str) -> float | None:
        if key == "compile_wall_s" and compile_rounds:
            return round(statistics.median(r["wall_ratio"] for r in compile_rounds), 3)
        if isinstance(ours.get(key), (int, float)) and isinstance(theirs.get(key), (int, float)) and theirs[key]:
            return round(ours[key] / theirs[key], 3)
        return None

    checks = {"decode_ms_per_token": 1.0, "file_bytes": 1.05, "nodes": 2.0, "compile_wall_s": 1.5}
    return {key: {"ratio": ratio(key), "limit": limit,
                  "holds": None if ratio(key) is None else ratio(key) <= limit} for key, limit in checks.items()}


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    cols = [("compile_wall_s", "compile s"), ("compile_peak_rss_mib", "peak RSS MiB"), ("file_bytes", "MB"),
            ("nodes", "nodes"), ("decode_ms_per_token", "decode ms/tok"), ("prefill_ms_128", "prefill ms"),
            ("top1_agreement", "top-1 agree")]
    print("| model | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        cells = []
        for key, _ in cols:
            v = row.get(key)
            cells.append("-" if v is None else f"{v / 1e6:.1f}" if key == "file_bytes" else str(v))
        print(f"| {name} | " + " | ".join(cells) + (f" | {row['status']}" if row.get("status") else "") + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-calls", type=int, default=5, help="decode calls per model per round")
    parser.add_argument("--compile-rounds", type=int, default=3,
                        help="interleaved fxforge/builder compiles after the first ones (the compile target's median)")
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 rounds: a smoke run")
    parser.add_argument("--keep", type=Path, help="work here and keep the files (default: a temp dir, removed)")
    parser.add_argument("--_ort-quantize", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._ort_quantize:
        ort_quantize(*args._ort_quantize)
        return 0
    if args.quick:
        args.layers, args.rounds, args.decode_calls, args.compile_rounds = 2, 2, 3, 1

    import onnxruntime
    import transformers

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="fxforge-llm-e2e-")
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / ("llm_e2e_cpu_quick.json" if args.quick else
                          "llm_e2e_cpu.json" if args.layers == 4 else f"llm_e2e_cpu_layers{args.layers}.json")
    report: dict[str, Any] = {"layers": args.layers, "rounds": args.rounds, "decode_calls": args.decode_calls,
                              "past": PAST, "prefill": PREFILL, "steps": STEPS, "ort_threads": 1,
                              "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
                              "cpu_count": os.cpu_count(),
                              "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                       capture_output=True, text=True).stdout.strip()}
    try:
        hf = work / "hf-llama"
        report["config"] = {k: v for k, v in save_llama_dir(hf, args.layers).items()
                            if k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "vocab_size", "num_hidden_layers")}
        rows: dict[str, dict[str, Any]] = {n: {} for n in (*INT4, "fxforge_fp32")}
        compiles = {
            "fxforge_fp32": lambda: compile_fxforge(hf, work / "fxforge-fp32", "", work / "fxforge_fp32.log"),
            "fxforge_int4": lambda: compile_fxforge(hf, work / "fxforge-int4", "quantize(bits=4)",
                                                    work / "fxforge_int4.log"),
            "builder_int4": lambda: compile_builder(hf, work / "builder-int4", work, work / "builder_int4.log"),
            "ort_int4": lambda: compile_ort(Path(rows["fxforge_fp32"].get("onnx", "")), rows["fxforge_fp32"].get("compile"),
                                            work / "ort-int4", work / "ort_int4.log"),
        }
        for name, run in compiles.items():
            print(f"compiling {name} ...", flush=True)
            try:
                result = run()
                rows[name].update(onnx=result.pop("onnx"), compile=result,
                                  compile_wall_s=result["wall_s"], compile_peak_rss_mib=result["peak_rss_mib"])
                rows[name].update(describe(Path(rows[name]["onnx"])))
            except Exception as exc:  # a peer that fails is reported, the others go on
                rows[name]["status"] = failure(exc)
                traceback.print_exc()
        compile_rounds: list[dict[str, Any]] = []
        if args.compile_rounds and all("onnx" in rows[n] for n in ("fxforge_int4", "builder_int4")):
            print(f"{args.compile_rounds} interleaved compile rounds (fxforge int4, builder) ...", flush=True)
            try:
                compile_rounds = interleaved_compiles(hf, work, "quantize(bits=4)", args.compile_rounds)
            except Exception:  # the single compiles above still give a ratio
                traceback.print_exc()
        report["compile_rounds"] = compile_rounds
        genai = subprocess.run([str(GENAI_VENV / "bin" / "python"), "-c",
                                "import onnxruntime_genai as g; print(g.__version__)"], capture_output=True, text=True)
        report["onnxruntime_genai"] = genai.stdout.strip() or genai.stderr[-300:]

        prompt, reference = reference_tokens(hf, prompt_len=8)
        decoders: dict[str, Decoder] = {}
        for name, row in rows.items():
            if "onnx" not in row:
                continue
            try:
                cfg = report["config"]
                decoder = Decoder(row["onnx"], cfg["num_key_value_heads"],
                                  cfg["hidden_size"] // cfg["num_attention_heads"])
                row["top1_agreement"] = round(agreement(decoder, prompt, reference), 3)
                if name in INT4:
                    decoders[name] = decoder
            except Exception as exc:
                row["status"] = failure(exc)
                traceback.print_exc()
        print(f"timing {list(decoders)}: {args.rounds} interleaved rounds ...", flush=True)
        for name, timing in time_all(decoders, args.rounds, args.decode_calls).items():
            rows[name].update(timing)
        for row in rows.values():
            row.pop("onnx", None)
        report["rows"] = rows
        report["targets_fxforge_vs_builder"] = targets(rows, compile_rounds)
        print_table(rows)
        print(json.dumps(report["targets_fxforge_vs_builder"], indent=1))
    finally:
        write_results(out_path, report)
        if tmp:
            tmp.cleanup()
    return 0



def write_results(out_path: Path, report: dict) -> None:
    """Write the bench's JSON atomically: a killed run leaves the previous results whole."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(report, indent=1))
    os.replace(staging, out_path)
    print(f"wrote {out_path}")

if __name__ == "__main__":
    raise SystemExit(main())
