"""`code-lm`: a small Llama language model that fxforge trains itself on the Python stdlib.

The zoo's language model for measuring what lossy passes (pruning, Medusa heads, shift-add)
cost in perplexity, with no download: the corpus is the running interpreter's standard
library (``code_lm_data``), the tokenizer a byte-level BPE trained on it
(``code_lm_tokenizer``), the model a ``transformers.LlamaForCausalLM`` with grouped-query
attention trained by a time-boxed AdamW loop (``code_lm_train``). Trained models are cached
under ``~/.cache/fxforge/code-lm-<variant>-py<major><minor>/`` (``$FXFORGE_CACHE`` replaces
``~/.cache/fxforge``).

Usage::

    lm = load_code_lm("tiny")                       # trains (< 1 min) on first use
    batches = heldout_batches(lm.tokenizer, seq_len=128, max_batches=8)
    print(perplexity(lm.model, batches))            # or any callable input_ids -> logits

Command line: ``python -m fxforge.models.code_lm train [--variant small|tiny] [--minutes N]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from fxforge.errors import ArtifactError, FxforgeError, InputError
from fxforge.models.base import ZooModel
from fxforge.models.code_lm_data import (
    SPLIT_RULE, heldout_batches, limit_by_bytes, read_sources, split_stdlib, token_stream,
)
from fxforge.models.code_lm_tokenizer import EOS_TOKEN, eos_id, train_bpe_tokenizer
from fxforge.models.code_lm_train import TrainSettings, torch_threads, train_causal_lm

__all__ = [
    "CodeLM", "CodeLMVariant", "VARIANTS", "cache_dir_for", "heldout_batches", "load_code_lm",
    "perplexity", "train_code_lm",
]

FORMAT_VERSION = 1
INFO_FILE = "code_lm.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class CodeLMVariant:
    """Architecture of one code-lm size, plus its default training and evaluation settings."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    context: int
    training: TrainSettings = field(compare=False)
    eval_batches: int = field(default=8, compare=False)
    eval_batch_size: int = field(default=4, compare=False)

    def architecture(self) -> dict[str, int]:
        """The fields that decide the weights' shapes (what a cached model must match)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("name", "training", "eval_batches", "eval_batch_size")}


VARIANTS: dict[str, CodeLMVariant] = {
    # ~4M parameters; a 30-minute loop on 2 idle CPU cores (~1.0 s/step, ~1450 steps, under one
    # epoch of the 3.4M-token train stream) reaches held-out perplexity ~28. The lossy-pass
    # benchmarks need a model trained this far: at 13 minutes (~360 steps on a busy machine, ppl
    # ~80) quantization, sparsity and Medusa heads barely register and their rankings are noise.
    "small": CodeLMVariant(
        name="small", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
        intermediate_size=704, vocab_size=2048, context=256,
        training=TrainSettings(max_steps=4000, minutes=30.0, batch_size=8, lr=2e-3,
                               warmup_steps=30),
        eval_batches=16,
    ),
    # ~160k parameters; for tests and CI: a 30 s training loop on 2 MB of source, about a
    # minute end to end on 2 busy CPU cores. Time-boxed, so a slower machine takes fewer steps.
    "tiny": CodeLMVariant(
        name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=176, vocab_size=512, context=128,
        training=TrainSettings(max_steps=300, minutes=0.5, batch_size=16, lr=3e-3,
                               warmup_steps=20, train_bytes=2_000_000, threads=1),
    ),
}


def _variant(variant: str | CodeLMVariant) -> CodeLMVariant:
    if isinstance(variant, CodeLMVariant):
        return variant
    if variant not in VARIANTS:
        raise FxforgeError(f"unknown code-lm variant {variant!r}; choose one of "
                           f"{', '.join(sorted(VARIANTS))}.")
    return VARIANTS[variant]


def cache_dir_for(variant: str | CodeLMVariant) -> Path:
    """Where a variant is cached: ``$FXFORGE_CACHE`` (default ``~/.cache/fxforge``) /
    ``code-lm-<variant>-py<major><minor>``."""
    root = Path(os.environ.get("FXFORGE_CACHE") or Path.home() / ".cache" / "fxforge")
    major, minor = sys.version_info[:2]
    return root.expanduser() / f"code-lm-{_variant(variant).name}-py{major}{minor}"


@dataclass
class CodeLM:
    """A loaded code-lm: the model (eval mode), its tokenizer and its training record."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    variant: CodeLMVariant
    cache_dir: Path
    info: dict[str, Any]

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a LongTensor of shape (1, L), ready to feed the model."""
        return torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of a 1-D (or (1, L)) sequence of token ids."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def train_texts(self) -> list[str]:
        """Source texts of the stdlib files in this model's train split."""
        return read_sources(self.info["split"]["train"])

    def heldout_texts(self) -> list[str]:
        """Source texts of the stdlib files in this model's held-out split."""
        return read_sources(self.info["split"]["heldout"])

    def heldout_batches(self, seq_len: int | None = None, max_batches: int | None = None, *,
                        batch_size: int | None = None) -> list[torch.Tensor]:
        """``heldout_batches`` with this variant's defaults (context length, eval counts)."""
        return heldout_batches(self.tokenizer, seq_len or self.variant.context,
                               max_batches or self.variant.eval_batches,
                               batch_size=batch_size or self.variant.eval_batch_size)

    @property
    def heldout_perplexity(self) -> float:
        """The held-out perplexity measured right after training (see ``info``)."""
        return self.info["heldout_perplexity"]["value"]


def _logits_of(output: Any) -> torch.Tensor:
    # Accept what HF models, fxforge compiled models and plain functions return.
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"perplexity expected the model to return logits (a tensor, a tuple starting "
                     f"with one, or an object with .logits); got {type(output).__name__}.")


def perplexity(model_or_callable: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], *,
               device: torch.device | str | None = None) -> float:
    """exp(mean next-token NLL) of a model over batches of input_ids.

    ``model_or_callable`` is called as ``f(input_ids)`` with one positional (B, L) LongTensor
    (moved to ``device`` first if given) and must return (B, L, V) logits. Every token after
    the first in each row is scored.

    Example::

        ppl = perplexity(compiled_model, heldout_batches(lm.tokenizer, 128, 8), device="cuda")
    """
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for input_ids in batches:
            if device is not None:
                input_ids = input_ids.to(device)
            logits = _logits_of(model_or_callable(input_ids))
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
                raise InputError(f"perplexity: input_ids of shape {tuple(input_ids.shape)} gave "
                                 f"logits of shape {tuple(logits.shape)}; expected (B, L, V).")
            vocab = logits.shape[-1]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                                  input_ids[:, 1:].reshape(-1).to(logits.device), reduction="sum")
            total_nll += nll.item()
            total_tokens += input_ids[:, 1:].numel()
    if total_tokens == 0:
        raise InputError("perplexity needs at least one batch with sequence length >= 2.")
    return math.exp(total_nll / total_tokens)


def new_model(variant: str | CodeLMVariant, vocab_size: int | None = None, eos_token_id: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` of the variant's shape (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    v = _variant(variant)
    config = LlamaConfig(
        vocab_size=vocab_size or v.vocab_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, num_key_value_heads=v.num_kv_heads,
        max_position_embeddings=v.context, tie_word_embeddings=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        attn_implementation="eager",
        use_cache=False,  # zoo convention: tracing a forward that returns a KV cache is awkward
    )
    return LlamaForCausalLM(config)


def train_code_lm(variant: str | CodeLMVariant = "small", *, minutes: float | None = None,
                  max_steps: int | None = None, train_bytes: int | None = None,
                  seed: int | None = None, threads: int | None = None, progress: bool = True,
                  overwrite: bool = False) -> CodeLM:
    """Train a code-lm variant from scratch, measure held-out perplexity and cache it.

    ``minutes``, ``max_steps``, ``train_bytes``, ``seed`` and ``threads`` override the
    variant's training defaults (tests use a few steps on a few hundred kB). The result is written to a temporary
    directory and renamed into ``cache_dir_for(variant)`` only when complete, so an interrupted
    run never leaves a half-written cache. An existing cache is kept (and returned) unless
    ``overwrite``.
    """
    v = _variant(variant)
    overrides = {k: val for k, val in dict(minutes=minutes, max_steps=max_steps, seed=seed,
                                           train_bytes=train_bytes, threads=threads).items()
                 if val is not None}
    settings = replace(v.training, **overrides)
    torch.manual_seed(settings.seed)

    split = split_stdlib()
    used_files = limit_by_bytes(split.train, settings.train_bytes)
    texts = read_sources(used_files)
    tokenizer = train_bpe_tokenizer(texts, v.vocab_size)
    stream = token_stream(tokenizer, texts)
    model = new_model(v, tokenizer.get_vocab_size(), eos_id(tokenizer))
    with torch_threads(settings.threads):
        report = train_causal_lm(model, stream, v.context, settings, progress=progress)
        batches = heldout_batches(tokenizer, v.context, v.eval_batches,
                                  batch_size=v.eval_batch_size)
        ppl = perplexity(model, batches)
    info = {
        "format": FORMAT_VERSION,
        "variant": v.name,
        "architecture": v.architecture(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "training": {
            "settings": asdict(settings),
            "steps": report.steps, "seconds": round(report.seconds, 1),
            "tokens_seen": report.tokens_seen, "train_stream_tokens": stream.numel(),
            "train_files_used": len(used_files),
            "first_loss": report.mean_loss(first=True), "last_loss": report.mean_loss(first=False),
        },
        "split": {"rule": SPLIT_RULE, "train": list(split.train), "heldout": list(split.heldout)},
        "heldout_perplexity": {"value": ppl, "seq_len": v.context, "batches": v.eval_batches,
                               "batch_size": v.eval_batch_size},
        "eos_token": EOS_TOKEN,
    }
    target = _publish(model, tokenizer, info, cache_dir_for(v), overwrite)
    return _load_dir(target, v)


def _publish(model, tokenizer: Tokenizer, info: dict, target: Path, overwrite: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(staging)
    tokenizer.save(str(staging / TOKENIZER_FILE))
    (staging / INFO_FILE).write_text(json.dumps(info, indent=1))
    if target.exists() and overwrite:
        shutil.rmtree(target)
    try:
        staging.rename(target)
    except OSError:
        # Another process published the same variant first: keep theirs, drop ours.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _corrupted(cache_dir: Path, variant: CodeLMVariant, problem: str) -> ArtifactError:
    return ArtifactError(
        f"the code-lm cache at {cache_dir} is unusable: {problem}. Delete that directory to "
        f"retrain on next use, or retrain now with "
        f"`python -m fxforge.models.code_lm train --variant {variant.name}`."
    )


def _load_dir(cache_dir: Path, variant: CodeLMVariant) -> CodeLM:
    from transformers import LlamaForCausalLM

    for name in (INFO_FILE, TOKENIZER_FILE, "config.json", "model.safetensors"):
        if not (cache_dir / name).is_file():
            raise _corrupted(cache_dir, variant, f"{name} is missing")
    try:
        info = json.loads((cache_dir / INFO_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupted(cache_dir, variant, f"{INFO_FILE} is not valid JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise _corrupted(cache_dir, variant, f"{INFO_FILE} is not a format-{FORMAT_VERSION} "
                                             "code-lm record")
    if info.get("architecture") != variant.architecture():
        raise _corrupted(cache_dir, variant, f"it holds architecture {info.get('architecture')}, "
                                             f"but variant {variant.name!r} is now "
                                             f"{variant.architecture()}")
    try:
        tokenizer = Tokenizer.from_file(str(cache_dir / TOKENIZER_FILE))
        eos_id(tokenizer)
    except Exception as e:  # tokenizers raises bare Exception subclasses on bad JSON
        raise _corrupted(cache_dir, variant, f"{TOKENIZER_FILE} does not load ({e})") from e
    try:
        model, loading = LlamaForCausalLM.from_pretrained(
            cache_dir, attn_implementation="eager", output_loading_info=True)
    except Exception as e:  # safetensors/json errors vary by version; all mean the same here
        raise _corrupted(cache_dir, variant, f"the weights do not load ({type(e).__name__}: "
                                             f"{e})") from e
    # from_pretrained silently re-initialises absent weights: that would be a random model.
    bad = {k: sorted(v) for k, v in loading.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise _corrupted(cache_dir, variant, f"model.safetensors does not match the config {bad}")
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise _corrupted(cache_dir, variant, f"the tokenizer has {tokenizer.get_vocab_size()} "
                                             f"tokens but the model {model.config.vocab_size}")
    model.config.use_cache = False
    model.eval()
    return CodeLM(model=model, tokenizer=tokenizer, variant=variant, cache_dir=cache_dir,
                  info=info)


def load_code_lm(variant: str = "small", train_if_missing: bool = True) -> CodeLM:
    """The cached code-lm of a variant, training it first if there is none and allowed to.

    Raises ``ArtifactError`` when the cache is missing (and ``train_if_missing`` is False) or
    corrupted; a corrupted cache is never overwritten silently.
    """
    v = _variant(variant)
    cache_dir = cache_dir_for(v)
    if not cache_dir.exists():
        if not train_if_missing:
            raise ArtifactError(
                f"no code-lm {v.name!r} is cached at {cache_dir}. Train it with "
                f"`python -m fxforge.models.code_lm train --variant {v.name}` or call "
                f"load_code_lm({v.name!r}, train_if_missing=True).")
        return train_code_lm(v)
    return _load_dir(cache_dir, v)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``train`` a variant into the cache and print its held-out perplexity."""
    parser = argparse.ArgumentParser(prog="python -m fxforge.models.code_lm",
                                     description="Train the code-lm zoo model on the stdlib.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a variant and cache it (replaces the cache)")
    train.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    train.add_argument("--minutes", type=float, default=None,
                       help="wall-clock budget of the training loop (default: the variant's)")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (1 can beat 2 on a busy machine)")
    args = parser.parse_args(argv)

    lm = train_code_lm(args.variant, minutes=args.minutes, max_steps=args.max_steps,
                       threads=args.threads, overwrite=True)
    record = lm.info
    print(f"code-lm {args.variant}: {record['parameters']:,} parameters, "
          f"{record['training']['steps']} steps in {record['training']['seconds']:.0f} s, "
          f"train loss {record['training']['first_loss']:.3f} -> "
          f"{record['training']['last_loss']:.3f}, held-out perplexity "
          f"{lm.heldout_perplexity:.3f}; cached at {lm.cache_dir}")
    return 0


def build_code_lm_zoo(variant: str, seed: int = 0) -> ZooModel:
    """The zoo entry for a code-lm variant: the trained LM and one held-out batch as inputs.

    Trains and caches the variant first if it is not cached (tiny: about a minute; small: up to
    30 minutes on 2 cores). The weights are trained, so `seed` only picks which held-out windows
    make the example inputs.
    """
    lm = load_code_lm(variant)
    windows = torch.cat(lm.heldout_batches(seq_len=64, max_batches=4, batch_size=2))

    def make_inputs(batch: int = 2, seq: int = 64) -> tuple[tuple, dict]:
        start = (seed * batch) % max(1, windows.shape[0] - batch + 1)
        rows = windows[start:start + batch, :seq]
        if rows.shape != (batch, seq):
            raise ValueError(f"code-lm: inputs are held-out windows of at most {windows.shape[1]} "
                             f"tokens and {windows.shape[0]} rows; asked for ({batch}, {seq})")
        return (rows,), {}

    args, kwargs = make_inputs()
    return ZooModel(
        name="code-lm" if variant == "small" else f"code-lm-{variant}",
        model=lm.model,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=None,
        description=f"code-lm ({variant}): a Llama-architecture LM with GQA trained by fxforge on the "
                    f"Python standard library; held-out windows as inputs",
        make_inputs=make_inputs,
    )


if __name__ == "__main__":
    raise SystemExit(main())
