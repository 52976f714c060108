"""A saved Hugging Face model directory -> a model for one task, its tokenizer and example inputs.

    loaded = fxforge.from_pretrained("path/to/llama", task="text-generation", seq=32, batch=2)
    compiled = fxforge.compile(loaded.model, loaded.args, loaded.kwargs, passes="quantize(bits=4)")

Tasks follow `optimum`'s names. The default is read from config.json's `architectures`:
`*ForCausalLM` and `*LMHeadModel` are causal LMs (text-generation), `*ForMaskedLM` fill-mask,
`*ForSequenceClassification` text-classification, a bare `*Model` feature-extraction. A
directory serves its own head's task(s) and feature-extraction (every checkpoint holds the base
model); asking for a head the checkpoint does not hold (fill-mask of a GPT-2, a classifier of a
BERT saved for masked LM) is an error instead of a head of random weights.

Example inputs come from the directory's tokenizer: real sentences of different lengths, padded
to `seq` with an attention mask, `batch` rows (batch 2 by default: torch.export fixes a size-1
dimension, and a traced batch of 1 could serve batch 1 only). Causal LMs are called with
`use_cache=False` (a constant baked into the trace): the graph computes logits without a cache,
and `text-generation-with-past` adds one with the `add_kv_cache` pass (`Pretrained.task_passes`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from fxforge.errors import ModelDirectoryError

TASKS = ("text-generation", "text-generation-with-past", "feature-extraction", "fill-mask", "text-classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architecture-name suffix -> the tasks its checkpoint serves, the first being its default.
_HEADS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("ForCausalLM", "LMHeadModel"), ("text-generation", "text-generation-with-past")),
    (("ForMaskedLM",), ("fill-mask",)),
    (("ForSequenceClassification",), ("text-classification",)),
    (("Model",), ("feature-extraction",)),
)
# Passes a task appends to the user's pipeline (the cache is a graph rewrite, verified like any pass).
# text-generation-with-past: the conventional decoder (padding mask; see fxforge.decoder_artifact).
# fuse_projections first (exact): q/k/v and gate/up become one (quantized) linear each, one weight
# stream per group, and the ONNX decoder feeds the q/k/v one to GroupQueryAttention packed.
# fuse_attention next: SDPA attention is cached through the fused op.
TASK_PASSES = {"text-generation-with-past": ("fuse_projections", "fuse_attention", "add_kv_cache(attention_mask=True)")}
# Files of a tokenizer as `save_pretrained` writes them (fast and slow tokenizers, chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")

# Different lengths, so a batch of them has padded rows; one word is replaced by the mask token
# for fill-mask.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "def add(a, b): return a + b",
    "One two three four five six seven eight nine ten eleven twelve.",
)
_MASKED_WORD = "fox"


@dataclass(frozen=True)
class Pretrained:
    """A model loaded from a directory for one task, with what `fxforge.compile` needs.

    model: the transformers model (eval mode, eager attention, in `dtype`).
    tokenizer: the directory's tokenizer, or None when the directory has none (then the example
        inputs are random token ids).
    args, kwargs: example inputs: `compile(model, args, kwargs)`; kwargs holds `input_ids`,
        `attention_mask` (not for text-generation-with-past, whose cache pass takes ids alone)
        and, for causal LMs, `use_cache=False`.
    task: the task it was loaded for; `task_passes` are the passes the task appends to a pipeline.
    """

    model: nn.Module
    tokenizer: Any | None
    args: tuple
    kwargs: dict[str, Any]
    task: str
    directory: Path
    dtype: torch.dtype
    architecture: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def task_passes(self) -> tuple[str, ...]:
        """Passes appended to the user's pipeline for this task (e.g. add_kv_cache)."""
        return TASK_PASSES.get(self.task, ())

    def tokenizer_files(self) -> dict[str, Path]:
        """The directory's tokenizer files by name, to save next to a compiled artifact."""
        return tokenizer_files(self.directory)


def from_pretrained(directory: str | Path, task: str | None = None, dtype: str | torch.dtype | None = None,
                    seq: int = 16, batch: int = 2, lazy: bool = False) -> Pretrained:
    """Load a `save_pretrained` directory for `task` with example inputs from its tokenizer.

    Args:
        directory: a local directory with config.json and weights (hubs are not contacted).
        task: one of TASKS; None = the default of config.json's `architectures`.
        dtype: "float32" (default), "bfloat16", "float16" or a torch dtype: the weights' dtype.
        seq, batch: size of the example inputs (the traced graph stays dynamic in both where
            the model allows; batch 1 fixes the batch to 1).
        lazy: build the model on the meta device and give it views into the memory-mapped
            safetensors files instead of loading them (`fxforge.models.lazy_weights`): nothing
            is read until used, and passes that walk the model block by block hold one block's
            weights at a time. The weights keep the file's dtype (`dtype` must be None or that
            dtype: a cast would be a full copy).

    Raises:
        ModelDirectoryError naming the problem and the fix: no such directory, no config.json,
        an unknown architecture without `task`, a task the checkpoint has no head for, a bad
        dtype or size.
    """
    directory = Path(directory)
    config = _read_config(directory)
    architecture = (config.architectures or [None])[0]
    served = served_tasks(config.architectures)
    task = _choose_task(directory, task, config.architectures, served)
    torch_dtype = _resolve_dtype(dtype)
    _check_sizes(config, seq, batch)
    if lazy:
        model, torch_dtype = _lazy_model(directory, config, task, dtype)
    else:
        model = _load_model(directory, task, torch_dtype)
    tokenizer, notes = _load_tokenizer(directory)
    args, kwargs = example_inputs(tokenizer, task, seq=seq, batch=batch, vocab_size=_vocab_size(model))
    return Pretrained(model=model, tokenizer=tokenizer, args=args, kwargs=kwargs, task=task, directory=directory,
                      dtype=torch_dtype, architecture=architecture, notes=notes)


def default_task(architectures: list[str] | None) -> str | None:
    """The task of the first architecture with a known suffix (its head's), or None."""
    for arch in architectures or []:
        for suffixes, tasks in _HEADS:
            if arch.endswith(suffixes):
                return tasks[0]
    return None


def served_tasks(architectures: list[str] | None) -> list[str]:
    """Tasks a checkpoint of these architectures has weights for: its head's, then feature-extraction."""
    for arch in architectures or []:
        for suffixes, tasks in _HEADS:
            if arch.endswith(suffixes):
                return list(dict.fromkeys([*tasks, "feature-extraction"]))
    return ["feature-extraction"]


def tokenizer_files(directory: str | Path) -> dict[str, Path]:
    """{file name: path} of the tokenizer files `save_pretrained` left in `directory`."""
    directory = Path(directory)
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def example_inputs(tokenizer: Any | None, task: str, *, seq: int, batch: int,
                   vocab_size: int | None = None) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for `task`: tokenized sentences (or random ids without a tokenizer)."""
    causal = task.startswith("text-generation")
    constants: dict[str, Any] = {"use_cache": False} if causal else {}
    if task == "text-generation-with-past":
        # add_kv_cache takes token ids alone (a cached graph has no padding mask): full rows.
        return (), {"input_ids": _unpadded_rows(tokenizer, seq, batch, vocab_size), **constants}
    if tokenizer is None:
        ids = _random_ids(vocab_size, seq, batch)
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), **constants}
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    if task == "fill-mask":
        texts = [t.replace(_MASKED_WORD, tokenizer.mask_token) if _MASKED_WORD in t else f"{tokenizer.mask_token} {t}"
                 for t in texts]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt",
                    return_token_type_ids=False)
    return (), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **constants}


# --------------------------------------------------------------------------- internals


def _read_config(directory: Path) -> Any:
    from transformers import AutoConfig

    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise ModelDirectoryError(f"model directory {str(directory)!r} {what}; pass a directory written by "
                                  f"model.save_pretrained(...)")
    if not (directory / "config.json").is_file():
        raise ModelDirectoryError(f"{str(directory)!r} is not a Hugging Face model directory: it has no "
                                  f"config.json; save the model there with model.save_pretrained(...)")
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as exc:  # ValueError (unknown model_type), OSError, JSON errors
        raise ModelDirectoryError(f"cannot read {directory / 'config.json'}: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300]}") from exc


def _choose_task(directory: Path, task: str | None, architectures: list[str] | None, served: list[str]) -> str:
    listing = f"tasks: {', '.join(TASKS)}"
    architecture = (architectures or [None])[0]
    if task is None:
        if architecture is None:
            raise ModelDirectoryError(f"{directory / 'config.json'} names no `architectures`, so the task is "
                                      f"unknown; pass task= (--task) one of {listing}")
        default = default_task(architectures)
        if default is None:
            raise ModelDirectoryError(f"architecture {architecture!r} of {directory} has no known task; pass "
                                      f"task= (--task) {' or '.join(served)} (what this checkpoint serves); "
                                      f"known {listing}")
        return default
    if task not in TASKS:
        import difflib

        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelDirectoryError(f"unknown task {task!r}.{hint} Known {listing}")
    if task not in served:
        raise ModelDirectoryError(f"{directory} ({architecture or 'no architecture'}) cannot serve task {task!r}: "
                                  f"its checkpoint has no weights for that head. It serves: {', '.join(served)}")
    return task


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelDirectoryError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def _check_sizes(config: Any, seq: int, batch: int) -> None:
    if not isinstance(batch, int) or batch < 1:
        raise ModelDirectoryError(f"batch must be a positive integer, got {batch!r}")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(seq, int) or seq < 2 or (limit and seq > limit):
        bound = f" and at most {limit} (the model's position limit)" if limit else ""
        raise ModelDirectoryError(f"seq must be an integer of at least 2{bound}, got {seq!r}")


def _model_class(task: str) -> Any:
    import transformers as tf

    return {"text-generation": tf.AutoModelForCausalLM, "text-generation-with-past": tf.AutoModelForCausalLM,
            "feature-extraction": tf.AutoModel, "fill-mask": tf.AutoModelForMaskedLM,
            "text-classification": tf.AutoModelForSequenceClassification}[task]


def _load_model(directory: Path, task: str, dtype: torch.dtype) -> nn.Module:
    model, missing = _load_weights(directory, task, dtype)
    if task == "feature-extraction" and missing and all(k.startswith("pooler.") for k in missing):
        # A head checkpoint (BertForMaskedLM) has no pooler: features are the hidden states, so
        # load the base model without one rather than with a random pooled output.
        model, missing = _load_weights(directory, task, dtype, add_pooling_layer=False)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelDirectoryError(f"{directory} lacks weights the {task!r} model needs ({shown}); they would be "
                                  f"random. Pass a task this checkpoint was saved for, or a complete checkpoint")
    return model.eval()


def _load_weights(directory: Path, task: str, dtype: torch.dtype, **options: Any) -> tuple[nn.Module, list[str]]:
    """(model, names of weights the checkpoint lacks) for `task`'s auto class."""
    try:
        with _quiet_transformers():
            # eager attention: the attention math stays visible in the graph (fuse_attention, add_kv_cache)
            model, info = _model_class(task).from_pretrained(directory, dtype=dtype, attn_implementation="eager",
                                                             output_loading_info=True, **options)
    except Exception as exc:  # OSError (no weights), ValueError (config class unknown to the loader)
        raise ModelDirectoryError(f"cannot load {directory} for task {task!r}: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300]}") from exc
    return model, sorted(info.get("missing_keys") or [])


def _lazy_model(directory: Path, config: Any, task: str, dtype: str | torch.dtype | None) -> tuple[nn.Module, torch.dtype]:
    """The model with parameters on the meta device, then bound to views of the mapped files."""
    from fxforge.models.lazy_weights import SafetensorsWeights

    weights = SafetensorsWeights(directory)
    stored = {d for d in weights.dtypes() if d.is_floating_point}
    wanted = _resolve_dtype(dtype) if dtype is not None else (next(iter(stored)) if len(stored) == 1 else torch.float32)
    if stored - {wanted}:
        raise ModelDirectoryError(f"lazy loading keeps the weights of {directory} as stored "
                                  f"({', '.join(sorted(str(d) for d in stored))}); dtype={wanted} would copy them all. "
                                  f"Pass dtype=None (or the stored dtype), or lazy=False")
    with _quiet_transformers(), _parameters_on_meta():
        model = _model_class(task).from_config(config, dtype=wanted, attn_implementation="eager")
    # a tied weight (lm_head = embed_tokens) is stored once, under either of its names
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    state: dict[str, torch.Tensor] = {}
    missing = []
    for names in aliases.values():
        found = next((n for n in names if n in weights), None)
        if found is None:
            missing.extend(names)
            continue
        for name in names:
            state[name] = weights.tensor(found)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelDirectoryError(f"{directory} lacks weights the {task!r} model needs ({shown}); they would be "
                                  f"random. Pass a task this checkpoint was saved for, or a complete checkpoint")
    model.load_state_dict(state, strict=False, assign=True)
    model.fxforge_lazy_weights = weights  # keeps the mappings' reader alive as long as the model
    return model.eval(), wanted


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside go to the meta device as they are registered (one layer's
    allocation at a time, never the model's); buffers (rotary tables, computed, not stored)
    stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports: fxforge reports what matters itself (missing weights)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _load_tokenizer(directory: Path) -> tuple[Any | None, tuple[str, ...]]:
    if not tokenizer_files(directory):
        return None, (f"{directory} has no tokenizer: example inputs are random token ids",)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise ModelDirectoryError(f"cannot load the tokenizer of {directory}: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300]}") from exc
    notes: tuple[str, ...] = ()
    if tokenizer.pad_token is None:
        # GPT-2's tokenizer has no pad token; padding with EOS under a zero mask is the usual fix.
        if tokenizer.eos_token is None:
            raise ModelDirectoryError(f"the tokenizer of {directory} has neither a pad nor an eos token, so "
                                      f"batches cannot be padded; set tokenizer.pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
        notes = ("the tokenizer has no pad token: padding with its eos token",)
    return tokenizer, notes


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _random_ids(vocab_size: int | None, seq: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size or 2, (batch, seq), generator=generator)


def _unpadded_rows(tokenizer: Any | None, seq: int, batch: int, vocab_size: int | None) -> torch.Tensor:
    """`batch` rows of `seq` real tokens: the sentences' tokens repeated, each row starting later."""
    if tokenizer is None:
        return _random_ids(vocab_size, seq, batch)
    stream = tokenizer(" ".join(SENTENCES), add_special_tokens=False)["input_ids"]
    stream = stream * (1 + (seq + batch) // max(1, len(stream)))
    return torch.tensor([stream[i:i + seq] for i in range(batch)], dtype=torch.long)

