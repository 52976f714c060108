"""Task `text-generation-with-past`: a Hugging Face causal-LM directory -> a decoder artifact.

    fxforge.compile_decoder("hf-llama/", "out/", passes="quantize(bits=4)")
    # = fxforge compile hf-llama/ --task text-generation-with-past --backend onnx --passes "quantize(bits=4)" -o out/

The user's passes run first, then `fuse_attention` (unless they named it) and
`add_kv_cache(attention_mask=True)`; the model is traced on batch-2 token ids so the batch
stays dynamic, and exported once, by `export_decoder`, which checks the ONNX file against the
compiled graph before the artifact replaces anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fxforge.errors import PassSpecError

TASK = "text-generation-with-past"
KV_PASS = "add_kv_cache(attention_mask=True)"


def decoder_passes(passes: str) -> str:
    """The user's pipeline string completed for the task (see the module docstring)."""
    names = [p.strip() for p in passes.split(",") if p.strip()] if passes else []
    if any(p.split("(")[0].strip() == "add_kv_cache" for p in names):
        raise PassSpecError(f"--task {TASK} adds the KV cache itself ({KV_PASS}); remove add_kv_cache from "
                            "--passes")
    if not any(p.split("(")[0].strip() == "fuse_attention" for p in names):
        names.append("fuse_attention")  # SDPA attention is cached through the fused op
    return ",".join([*names, KV_PASS])


def load_causal_lm(directory: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a saved HF directory; the model returns logits only (no HF cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    model.config.use_cache = False  # our own copy: the cache is the graph's, not HF's DynamicCache
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer


def compile_decoder(model_dir: str | Path, output: str | Path, *, passes: str = "", seq: int = 8,
                    verify: bool = True, max_length: int | None = None) -> Any:
    """Compile a HF causal LM directory into a decoder artifact at `output`; returns the CompiledModel.

    `seq`: length of the example ids the model is traced and verified on (batch 2).
    """
    import fxforge

    model, tokenizer = load_causal_lm(model_dir)
    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    ids = torch.randint(0, min(vocab, len(tokenizer)), (2, seq), generator=torch.Generator().manual_seed(0))
    compiled = fxforge.compile(model, (ids,), passes=decoder_passes(passes), backend="eager", verify=verify)
    fxforge.export_decoder(compiled, output, tokenizer=tokenizer, config=model.config, max_length=max_length)
    return compiled


__all__ = ["KV_PASS", "TASK", "compile_decoder", "decoder_passes", "load_causal_lm"]
