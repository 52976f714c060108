"""Decode a decoder artifact directory (`fxforge.export_decoder`) with ONNX Runtime.

Everything comes from the directory: `genai_config.json` (I/O names, layer count, eos/pad ids),
`model.onnx`, and the tokenizer files. Tensors are bound by name only, so any decoder with
that interface (onnxruntime-genai's builder, optimum's text-generation-with-past export with a
genai_config.json next to it) decodes here too.

    decoder = OnnxDecoder("out/")
    decoder.generate_text(["the quick brown fox", "hello"], max_new_tokens=16)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fxforge.errors import ArtifactError, InputError
from fxforge.runtime.generation import SamplingOptions, generate_tokens

GENAI_CONFIG = "genai_config.json"
_ORT_FLOATS = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


class OnnxDecoder:
    """An ONNX Runtime session over a decoder artifact, with its tokenizer and special ids."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.directory = Path(directory)
        config = _read_config(self.directory)
        decoder = config["model"]["decoder"]
        names = {**decoder["inputs"], **decoder["outputs"]}
        self.layers = decoder["num_hidden_layers"]
        self.past_names = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        self.present_names = [(names["present_key_names"] % i, names["present_value_names"] % i)
                              for i in range(self.layers)]
        self.input_names = (names["input_ids"], names.get("attention_mask"), names.get("position_ids"))
        self.logits_name = names["logits"]
        self.eos_token_id = _optional_id(config["model"].get("eos_token_id"))
        self.pad_token_id = _optional_id(config["model"].get("pad_token_id"))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        path = self.directory / decoder.get("filename", "model.onnx")
        if not path.is_file():
            raise ArtifactError(f"{self.directory} has no {path.name}, which {GENAI_CONFIG} names as the decoder")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in (*self.input_names, *(n for pair in self.past_names for n in pair))
                   if n is not None and n not in inputs]
        if missing:
            raise ArtifactError(f"{path} lacks the inputs {missing} that {GENAI_CONFIG} names")
        first_past = inputs[self.past_names[0][0]]
        self.kv_heads, self.head_dim = int(first_past.shape[1]), int(first_past.shape[3])
        self.dtype = _ORT_FLOATS.get(first_past.type, torch.float32)
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The artifact's tokenizer (transformers' AutoTokenizer; tokenizer.json is data, not code)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
            except Exception as exc:
                raise ArtifactError(f"{self.directory} holds no tokenizer that loads ({exc}); export it with "
                                    "fxforge.export_decoder(..., tokenizer=...)") from exc
        return self._tokenizer

    def step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             past: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward by names: logits and the present cache, flat [k0, v0, ...]."""
        ids_name, mask_name, positions_name = self.input_names
        feeds = {ids_name: ids.numpy()}
        if mask_name:
            feeds[mask_name] = mask.numpy()
        if positions_name:
            feeds[positions_name] = positions.numpy()
        for (k_name, v_name), k, v in zip(self.past_names, past[0::2], past[1::2]):
            feeds[k_name], feeds[v_name] = k.numpy(), v.numpy()
        wanted = [self.logits_name, *(n for pair in self.present_names for n in pair)]
        out = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(wanted, feeds)]
        return out[0], out[1:]

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype) for _ in range(2 * self.layers)]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 seed: int | None = None) -> torch.Tensor:
        """Prompt + new tokens (B, T + n); left-padded batches, stopping at the artifact's eos id."""
        sampling = SamplingOptions(do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed)
        return generate_tokens(self.step, self.empty_past, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, sampling=sampling)

    def generate_text(self, prompts: str | Sequence[str], **options: Any) -> list[str]:
        """Decode text prompts (a batch is left-padded); the generated continuations, as text."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise InputError("prompts must be one or more non-empty strings")
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
        tokens = self.generate(encoded["input_ids"], encoded["attention_mask"], **options)
        new = tokens[:, encoded["input_ids"].shape[1]:]
        return tokenizer.batch_decode(new, skip_special_tokens=True)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / GENAI_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a decoder artifact: {GENAI_CONFIG} is missing. Write one with "
                            f"fxforge.export_decoder or `fxforge compile DIR --task text-generation-with-past`.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        names = {**decoder["inputs"], **decoder["outputs"]}
        for key in ("input_ids", "logits", "past_key_names", "past_value_names", "present_key_names",
                    "present_value_names"):
            if not isinstance(names[key], str):
                raise TypeError(f"{key} must be a string")
        for key in ("past_key_names", "past_value_names", "present_key_names", "present_value_names"):
            if names[key].count("%d") != 1 or "%" in names[key].replace("%d", ""):
                raise ValueError(f"{key} must hold one %d (the layer index), got {names[key]!r}")
        if type(decoder["num_hidden_layers"]) is not int or decoder["num_hidden_layers"] < 1:
            raise ValueError("num_hidden_layers must be a positive integer")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid onnxruntime-genai config: {type(exc).__name__}: {exc}") from None
    return config


def _optional_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if type(value) is int and value >= 0 else None


__all__ = ["OnnxDecoder"]
