"""Medusa on the zoo's code-lm: add heads, train them by self-distillation, decode faster.

Compiles code-lm with fused attention and four Medusa heads that share the LM head, trains the
heads on the model's own greedy continuations of training-split prompts (the backbone stays
frozen), builds a candidate tree from the heads' measured accuracies, then decodes held-out
prompts with plain KV-cached greedy decoding and with Medusa on ONNX Runtime. Greedy Medusa
must produce exactly the same tokens; it needs fewer forwards for them.

    python examples/medusa_decode.py                      # code-lm small, 600 steps (~5 min)
    python examples/medusa_decode.py --variant tiny --steps 40

bench/medusa.py is the full measurement (both backends, several trees, typical acceptance).
"""
from __future__ import annotations

import argparse
import time

import torch

import fxforge
import fxforge.medusa as medusa
from fxforge.models.code_lm import load_code_lm
from fxforge.passes.kv_cache.add_kv_cache import with_kv_cache
from fxforge.runtime.decoding import CachedLM, greedy_generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=("small", "tiny"))
    parser.add_argument("--steps", type=int, default=600, help="head training steps")
    parser.add_argument("--tree-nodes", type=int, default=6, help="head guesses verified per step")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--backend", default="onnx", choices=("onnx", "eager"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    lm = load_code_lm(args.variant)
    example = lm.heldout_batches(seq_len=16, max_batches=1, batch_size=2)[0]
    compiled = fxforge.compile(lm.model, (example,),
                               passes="fuse_attention,add_medusa_heads(num_heads=4,num_layers=2,share_lm_head=True)")
    # Self-distillation from real prompts: the heads learn what the model itself will generate.
    report = medusa.train_heads(compiled, lm.train_texts(), tokenizer=lm.tokenizer, steps=args.steps,
                                seq_len=64, lr=2e-3, self_distill=True, self_distill_sequences=256, prompt_len=16)
    print(report)
    tree = medusa.tree_from_report(report, args.tree_nodes)

    # The baseline is the same model without heads, KV-cached, on the same backend.
    plain = CachedLM.prepare(with_kv_cache(fxforge.compile(lm.model, (example,), passes="fuse_attention").graph_module),
                             args.backend)
    fast = medusa.decoder(compiled, args.backend, greedy_in_graph=True)
    prompts = lm.heldout_batches(seq_len=32, max_batches=1, batch_size=args.prompts)[0]
    greedy_generate(plain, prompts[0], 4)  # warm-up: session start, allocator
    medusa.generate(compiled, prompts[0], 4, tree=tree, lm=fast)
    totals = {"plain": [0.0, 0, 0], "medusa": [0.0, 0, 0]}  # seconds, tokens, forwards
    for prompt in prompts:
        start = time.perf_counter()
        reference = greedy_generate(plain, prompt, args.new_tokens)
        middle = time.perf_counter()
        result = medusa.generate(compiled, prompt, args.new_tokens, tree=tree, lm=fast)
        end = time.perf_counter()
        if result.tokens != reference.tokens:
            raise SystemExit("greedy Medusa differs from plain greedy decoding: this is a bug, please report it")
        for name, seconds, out in (("plain", middle - start, reference), ("medusa", end - middle, result)):
            totals[name][0] += seconds
            totals[name][1] += len(out.tokens)
            totals[name][2] += len(out.accepted_per_step)
    print(f"\n{args.backend}: {args.prompts} held-out prompts x {args.new_tokens} tokens, tree of {tree.num_nodes} nodes")
    for name, (seconds, tokens, steps) in totals.items():
        print(f"  {name:<7} {tokens / steps:5.2f} tokens/forward  {tokens / seconds:7.1f} tokens/s")
    print("  same tokens as plain greedy: yes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
