"""Fine-tune the zoo's code-lm with LoRA on a new domain, merge, and ship it to ONNX Runtime.

The task: code-lm never saw the held-out `encodings/` codec modules of the standard library
(long, regular decoding tables). We add LoRA adapters to every attention and MLP projection,
train them for a few hundred steps on the first 80% of each of those files (the base model
stays frozen), and measure perplexity on the unseen last 20% before and after. Then the adapters are merged into
the base weights, the merged model is exported to ONNX and checked against the adapted model,
and the adapter weights alone are saved (a few hundred KB).

    python examples/finetune_lora.py                    # code-lm small, 300 steps
    python examples/finetune_lora.py --variant tiny --steps 100

Measured on a shared, heavily loaded 2-core machine: small, 120 steps (batch 8 x 128) took 22
min; held-out perplexity 8.95 -> 7.16, merged model in ONNX Runtime within 1.1e-5 of the
adapted model's logits. tiny, 80 steps (batch 4 x 64): perplexity 23.0 -> 19.5.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxforge
from fxforge.adapters_io import save_adapters
from fxforge.api import CompiledModel
from fxforge.models.code_lm import load_code_lm, perplexity
from fxforge.models.code_lm_data import read_sources, token_stream, windows_evenly_spaced
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.train import fit

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the target of each position is the following token."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def domain_windows(lm, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) token windows: the first 80% of every held-out `encodings/` file trains, the
    last 20% evaluates, so evaluation is on unseen text of the same domain."""
    files = sorted(p for p in lm.info["split"]["heldout"] if p.startswith("encodings/"))
    if not files:
        raise SystemExit("expected held-out encodings/ files in code-lm's split; found none")
    train_parts, eval_parts = [], []
    for text in read_sources(files):
        cut = int(len(text) * 0.8)
        train_parts.append(text[:cut])
        eval_parts.append(text[cut:])
    train = token_stream(lm.tokenizer, train_parts)
    held = token_stream(lm.tokenizer, eval_parts)
    train_windows = windows_evenly_spaced(train, seq, max(8, train.numel() // seq))
    eval_windows = windows_evenly_spaced(held, seq, min(16, max(2, held.numel() // seq)))
    return train_windows, eval_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=["small", "tiny"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="directory for the ONNX model and adapter file")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    lm = load_code_lm(args.variant)
    train_windows, eval_windows = domain_windows(lm, args.seq)
    eval_batches = list(eval_windows.split(4))
    print(f"code-lm {args.variant}: {sum(p.numel() for p in lm.model.parameters()):,} parameters; "
          f"task: {train_windows.shape[0]} train / {eval_windows.shape[0]} eval windows of {args.seq} tokens")

    example = train_windows[: args.batch]
    compiled = fxforge.compile(
        lm.model, (example,),
        passes=f"add_adapters(method=lora,rank={args.rank},alpha={2 * args.rank},targets={PROJECTIONS})")
    trainable = sum(p.numel() for p in compiled.trainable_parameters())
    print(f"adapted {compiled.report['add_adapters'].sites} layers; training {trainable:,} parameters")
    before = perplexity(compiled, eval_batches)

    # shuffled so every batch mixes files: batches in file order make the loss jump from file to file
    order = torch.randperm(train_windows.shape[0], generator=torch.Generator().manual_seed(0))
    batches = [(w, w) for w in train_windows[order].split(args.batch) if w.shape[0] == args.batch]
    start = time.perf_counter()
    losses = fit(compiled, batches, causal_lm_loss, steps=args.steps, lr=args.lr)
    seconds = time.perf_counter() - start
    after = perplexity(compiled, eval_batches)
    window = max(1, min(20, args.steps // 5))
    print(f"trained {args.steps} steps in {seconds:.0f}s: loss {sum(losses[:window]) / window:.3f} -> "
          f"{sum(losses[-window:]) / window:.3f} (mean of first/last {window})")
    for step in range(0, args.steps, max(1, args.steps // 6)):
        print(f"  step {step:4d}  loss {losses[step]:.3f}")
    print(f"held-out encodings/ perplexity: {before:.2f} -> {after:.2f}")

    out = Path(args.out or tempfile.mkdtemp(prefix="fxforge-finetune-"))
    adapter_file = save_adapters(compiled, out / "adapter.safetensors")
    print(f"adapter weights: {adapter_file} ({adapter_file.stat().st_size / 1024:.0f} KiB)")

    merged_graph = run_pass(MergeAdapters(), compiled.graph_module, PassContext(example_inputs=compiled.example_inputs))
    merged = CompiledModel(merged_graph, "onnx", example_inputs=compiled.example_inputs,
                           backend_options={"path": str(out / "merged.onnx")})
    probe = eval_windows[:2]
    with torch.no_grad():
        adapted_logits = compiled(probe)
    merged_logits = merged(probe)
    error = (merged_logits - adapted_logits).abs().max().item()
    print(f"merged model in ONNX Runtime vs adapted eager model: max |Δlogit| = {error:.2e}; "
          f"perplexity {perplexity(merged, eval_batches):.2f}; {out / 'merged.onnx'}")


if __name__ == "__main__":
    main()
