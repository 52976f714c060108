"""GPU benchmark of Medusa decoding against plain KV-cached greedy decoding on the zoo's code-lm.

The model is code-lm tiny (2 layers, 64 wide, float32; loaded from the fxforge cache, or
trained first: a 30-second time-boxed loop on the host CPU). Four Medusa heads sharing the LM
head are trained by self-distillation on the CPU (a few seconds), a tree is built from their
measured accuracies, then held-out prompts are decoded on the GPU with plain greedy and with
greedy Medusa, on the `eager` backend (fxforge ops run their torch references on CUDA) and the
`triton` backend (attention on fxforge's flash / split-KV decode kernels, each with its first
autotune config: see `untuned_attention`). Greedy Medusa must give exactly plain greedy's
tokens (mismatches are counted per row). Reported: mean accepted tokens per step and
wall-clock tokens/s (every step reads its tokens back to the host, so the clock sees finished
GPU work). The model is tiny, so a step costs kernel launches and Python,
not weight reads: this measures the decoding machinery on a GPU, not a large model's speed-up.

The graphs are traced on the CPU and run on the GPU by `on_device`, which moves the runner's
weights, rewrites device constants the trace baked in (HF Llama's rotary `.to(x.device)`
becomes `aten.to.device(..., cpu)`) and moves each call's inputs.

    python bench/medusa_gpu.py             # needs a CUDA GPU
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _gpu import require_cuda, results_path  # bench/ is on sys.path

NUM_HEADS, HEAD_LAYERS, TREE_NODES = 4, 1, 6
HEAD_STEPS, DISTILL_SEQUENCES, SEQ_LEN, PROMPT_LEN = 60, 128, 64, 16
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 32, 64
QUICK = {"prompts": 2}
SMOKE = {"head_steps": 3, "sequences": 8, "seq_len": 16, "prompt_len": 4, "prompts": 1, "prompt_tokens": 8,
         "new_tokens": 6}
BACKENDS = ("eager", "triton")
TRAIN_WAIT_S = 240  # how long `run` waits for a background training started by `start_model_in_background`

_background: dict[str, Any] = {}


def start_model_in_background() -> bool:
    """Train code-lm tiny into the fxforge cache in a child process (one CPU thread), unless cached.

    bench/gpu_suite.py calls this first, so the ~40 s of training overlap the kernel sections;
    `run` waits for it. Returns whether a child was started.
    """
    from fxforge.models.code_lm import cache_dir_for

    if cache_dir_for("tiny").exists() or "process" in _background:
        return False
    log = Path(tempfile.gettempdir()) / "fxforge_gpu_suite_code_lm_tiny.log"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "CUDA_VISIBLE_DEVICES": "", "FXFORGE_PROGRESS": "0"}
    with open(log, "w") as out:
        _background["process"] = subprocess.Popen(
            [sys.executable, "-c", "from fxforge.models.code_lm import load_code_lm; load_code_lm('tiny')"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    _background.update(log=log, start=time.perf_counter())
    return True


def stop_background() -> None:
    """Kill a background training `run` never waited for (the suite skipped the section)."""
    process = _background.pop("process", None)
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def _wait_for_background() -> str | None:
    """Wait for the background training, if any; a note on how it went."""
    process = _background.pop("process", None)
    if process is None:
        return None
    try:
        code = process.wait(timeout=TRAIN_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = "killed after waiting"
    seconds = time.perf_counter() - _background["start"]
    if code == 0:
        _background["log"].unlink(missing_ok=True)
        return f"trained in a background process alongside the kernel sections ({seconds:.0f} s)"
    log = _background["log"]
    tail = log.read_text()[-500:] if log.exists() else ""
    log.unlink(missing_ok=True)  # its tail is in the result; nothing stays in the temp dir
    return f"background training failed ({code}): {tail}; trained in-process instead"


class OnDevice:
    """Calls `runner` with every tensor input moved to `device` (outputs stay there)."""

    def __init__(self, runner: Any, device: torch.device):
        self.runner, self.device = runner, device

    def __call__(self, *args: Any) -> Any:
        return self.runner(*[a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args])


def retarget_graph(gm: Any, device: torch.device) -> int:
    """Replace every torch.device constant in `gm`'s graph (nested ones too) by `device`; count them."""
    replaced = 0

    def swap(value: Any) -> Any:
        nonlocal replaced
        if isinstance(value, torch.device) and value != device:
            replaced += 1
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    for module in gm.modules():
        graph = getattr(module, "graph", None)
        if graph is None or not hasattr(module, "recompile"):
            continue
        count = replaced
        for node in graph.nodes:
            node.args, node.kwargs = swap(node.args), swap(node.kwargs)
        if replaced != count:
            module.recompile()
    return replaced


def _move_tensor_attributes(module: torch.nn.Module, device: torch.device) -> None:
    """Plain tensor attributes (FX constants, not parameters or buffers) moved too."""
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(sub, name, value.to(device))


def on_device(lm: Any, device: torch.device) -> tuple[Any, int]:
    """(a copy of CachedLM `lm` whose runner and heads runner run on `device`, device constants rewritten)."""
    lm = copy.copy(lm)
    rewritten = 0
    for attr in ("runner", "heads_runner"):
        runner = getattr(lm, attr)
        if runner is None:
            continue
        if isinstance(runner, torch.nn.Module):
            runner = copy.deepcopy(runner).to(device)
            _move_tensor_attributes(runner, device)
            rewritten += retarget_graph(runner, device)
        setattr(lm, attr, OnDevice(runner, device))
    return lm, rewritten


def _model(smoke: bool) -> dict:
    """The LM, tokenizer and texts (None for a random-init model), prompts and a description."""
    from fxforge.models.code_lm import cache_dir_for, load_code_lm, new_model

    if smoke:
        model = new_model("tiny").eval()
        prompts = torch.randint(0, model.config.vocab_size, (SMOKE["prompts"], SMOKE["prompt_tokens"]))
        return {"model": model, "tokenizer": None, "texts": None, "prompts": prompts,
                "example": torch.randint(0, model.config.vocab_size, (2, 16)),
                "description": "code-lm tiny shape, random init (smoke mode: no training)"}
    background = _wait_for_background()
    cached = cache_dir_for("tiny").exists()
    start = time.perf_counter()
    lm = load_code_lm("tiny")  # trains (a 30 s time box) when not cached
    seconds = time.perf_counter() - start
    how = background or ("loaded from the cache" if cached else "trained here")
    ppl = lm.info.get("heldout_perplexity", {}).get("value")
    return {"model": lm.model.eval(), "tokenizer": lm.tokenizer, "texts": lm.train_texts(),
            "prompts": lm.heldout_batches(seq_len=PROMPT_TOKENS, max_batches=1, batch_size=PROMPTS)[0],
            "example": lm.heldout_batches(seq_len=16, max_batches=1, batch_size=2)[0],
            "description": f"code-lm tiny ({how}; {seconds:.0f} s in the section; held-out perplexity "
                           f"{ppl:.1f} after {lm.info.get('training', {}).get('steps')} training steps)"
                           if isinstance(ppl, (int, float)) else f"code-lm tiny ({how})"}


@contextlib.contextmanager
def untuned_attention(active: bool):
    """The attention kernels autotune over their first config only, while active.

    code-lm tiny runs float32 with 16-wide heads: its attention kernels compile to FMA loops
    (no tensor cores for ieee float32) that take 10-30 s each to compile, and tuning a
    64-key-long problem would compile all 6 + 4 configs for nothing.
    """
    from fxforge.kernels import decode_attention, flash_attention

    kernels = (flash_attention.flash_attention_fwd_kernel, decode_attention.decode_split_kernel)
    saved = [k.configs for k in kernels]
    try:
        if active:
            for k in kernels:
                k.configs = k.configs[:1]
        yield
    finally:
        for k, configs in zip(kernels, saved):
            k.configs = configs


def _decode_rows(compiled, plain_graph, tree, prompts, new_tokens: int, device: torch.device, backend: str) -> dict:
    import fxforge.medusa as medusa
    from fxforge.runtime.decoding import CachedLM, greedy_generate

    # Built on the CPU (the passes check themselves there), then moved.
    plain, rewritten_plain = on_device(CachedLM.prepare(plain_graph, backend), device)
    fast, rewritten_fast = on_device(medusa.decoder(compiled, backend, greedy_in_graph=True), device)
    # Warm-up over the same lengths as the measurement: autotuning and caches happen here.
    greedy_generate(plain, prompts[0], new_tokens)
    medusa.generate(compiled, prompts[0], new_tokens, tree=tree, lm=fast)
    totals = {"plain": [0.0, 0, 0], "medusa": [0.0, 0, 0]}  # seconds, tokens, forwards
    mismatches = 0
    for prompt in prompts:
        start = time.perf_counter()
        reference = greedy_generate(plain, prompt, new_tokens)
        middle = time.perf_counter()
        result = medusa.generate(compiled, prompt, new_tokens, tree=tree, lm=fast)
        end = time.perf_counter()
        mismatches += result.tokens != reference.tokens
        for name, seconds, out in (("plain", middle - start, reference), ("medusa", end - middle, result)):
            totals[name][0] += seconds
            totals[name][1] += len(out.tokens)
            totals[name][2] += len(out.accepted_per_step)
    plain_tps = totals["plain"][1] / totals["plain"][0]
    medusa_tps = totals["medusa"][1] / totals["medusa"][0]
    return {"backend": backend, "tree_nodes": tree.num_nodes, "prompts": len(prompts), "new_tokens": new_tokens,
            "plain_tokens_per_s": plain_tps, "medusa_tokens_per_s": medusa_tps, "speedup": medusa_tps / plain_tps,
            "accepted_tokens_per_step": totals["medusa"][1] / totals["medusa"][2],
            "plain_ms_per_token": 1e3 / plain_tps, "medusa_ms_per_step": 1e3 * totals["medusa"][0] / totals["medusa"][2],
            "mismatches_vs_greedy": int(mismatches), "device_constants_rewritten": rewritten_plain + rewritten_fast}


def run(timer=None, device: str = "cuda", *, quick: bool = False, smoke: bool = False) -> dict:
    """{"rows": per backend, "model": ..., "heads": ...}. `timer` is unused: decoding is wall-clock."""
    import fxforge
    import fxforge.medusa as medusa
    from fxforge.passes.kv_cache.add_kv_cache import with_kv_cache

    torch.manual_seed(0)
    # smoke: "cpu:0", so that the device rewriting of `on_device` runs on the CPU too
    dev = torch.device("cpu", 0) if device == "cpu" else torch.device(device)
    src = _model(smoke)
    passes = f"fuse_attention,add_medusa_heads(num_heads={NUM_HEADS},num_layers={HEAD_LAYERS},share_lm_head=True)"
    compiled = fxforge.compile(src["model"], (src["example"],), passes=passes)
    t0 = time.perf_counter()
    settings = ({"steps": SMOKE["head_steps"], "seq_len": SMOKE["seq_len"], "self_distill_sequences": SMOKE["sequences"],
                 "prompt_len": SMOKE["prompt_len"]} if smoke else
                {"steps": HEAD_STEPS, "seq_len": SEQ_LEN, "self_distill_sequences": DISTILL_SEQUENCES,
                 "prompt_len": PROMPT_LEN})
    report = medusa.train_heads(compiled, src["texts"], tokenizer=src["tokenizer"], lr=2e-3, self_distill=True,
                                progress=False, **settings)
    head_seconds = time.perf_counter() - t0
    tree = medusa.tree_from_report(report, TREE_NODES)
    plain_graph = with_kv_cache(fxforge.compile(src["model"], (src["example"],), passes="fuse_attention").graph_module)
    prompts = src["prompts"][: QUICK["prompts"]] if quick else src["prompts"]
    new_tokens = SMOKE["new_tokens"] if smoke else NEW_TOKENS
    rows, errors = [], {}
    for backend in BACKENDS:
        try:
            with untuned_attention(backend == "triton"):
                rows.append(_decode_rows(compiled, plain_graph, tree, prompts, new_tokens, dev, backend))
        except Exception as e:  # one backend failing leaves the other's row
            errors[backend] = f"{type(e).__name__}: {e}"[:2000]
    if not rows:
        raise RuntimeError(f"Medusa decoding failed on every backend: {errors}")
    return {
        "rows": rows, "backend_errors": errors,
        "model": src["description"], "dtype": "float32",
        "heads": {"num_heads": NUM_HEADS, "layers": HEAD_LAYERS, "share_lm_head": True,
                  "training": f"self-distillation on the CPU, {report.steps} steps in {head_seconds:.1f} s"
                              + (" from data prompts" if src["texts"] else " from sampled prompts"),
                  "heldout_top1": report.top1, "heldout_top5": report.top5},
        "note": "tokens/s are wall clock on one prompt at a time (batch 1), prefill included; "
                "accepted_tokens_per_step counts the root token, so plain greedy is 1.0",
    }


def print_table(result: dict) -> None:
    print(f"model: {result['model']}; heads top-1 {[round(a, 3) for a in result['heads']['heldout_top1']]}")
    print(f"{'backend':<8} {'tree':>4} | {'plain tok/s':>11} {'medusa tok/s':>12} {'speedup':>7} "
          f"{'tok/step':>8} {'mismatch':>8}")
    for r in result["rows"]:
        print(f"{r['backend']:<8} {r['tree_nodes']:>4} | {r['plain_tokens_per_s']:>11.1f} "
              f"{r['medusa_tokens_per_s']:>12.1f} {r['speedup']:>6.2f}x {r['accepted_tokens_per_step']:>8.2f} "
              f"{r['mismatches_vs_greedy']:>8}")
    for backend, error in result.get("backend_errors", {}).items():
        print(f"{backend}: failed: {error.splitlines()[0][:300]}")


def main() -> None:
    require_cuda("bench/medusa_gpu.py")
    gpu = torch.cuda.get_device_name()
    result = run(None, "cuda")
    print_table(result)
    path = results_path("medusa_gpu", gpu)
    path.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, **result}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
