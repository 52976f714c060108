"""The model zoo: small, reproducible models that examples, tests and benchmarks share.

Every entry is built by a factory `seed -> ZooModel`; a ZooModel carries the module (in eval
mode), example inputs, the `dynamic_shapes` to give torch.export, and `make_inputs` to make
inputs of other sizes. Factories of the built-in families live one per file next to this one
(`hf_tiny.py`, `mlp.py`, `cnn.py`, `minilm.py`) and are imported only when a model is asked
for, so importing the zoo does not import transformers.

    >>> from fxforge.models.zoo import get_model
    >>> zm = get_model("tiny-llama")
    >>> logits = zm.model(*zm.args, **zm.kwargs, return_dict=False)[0]

Hugging Face models are the bare transformers modules, so their module paths read
`model.layers.0.self_attn.q_proj`; they return a ModelOutput unless called with
`return_dict=False` (transformers 5 breaks if `config.return_dict` is False, so the caller
passes it). Their configs set `use_cache=False`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from fxforge.errors import FxforgeError
from fxforge.models.base import ZooFactory, ZooModel


class UnknownModelError(FxforgeError, LookupError):
    """`get_model` was asked for a name that no factory is registered under."""


_FACTORIES: dict[str, ZooFactory] = {}


def register_model(name: str, factory: ZooFactory) -> None:
    """Register `factory(seed) -> ZooModel` under `name`.

    Registering the same factory twice is a no-op; registering a different one under a taken
    name is refused, so one family cannot silently shadow another.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a zoo model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory for zoo model '{name}' must be callable (seed -> ZooModel)")
    existing = _FACTORIES.get(name)
    if existing is not None and existing is not factory:
        raise ValueError(
            f"zoo model '{name}' is already registered; pick another name for the new model"
        )
    _FACTORIES[name] = factory


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_FACTORIES)


def get_model(name: str, seed: int = 0) -> ZooModel:
    """Build a fresh copy of zoo model `name`; `seed` fixes its random weights (and inputs).

    Raises UnknownModelError, listing the known names, when `name` is not registered.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UnknownModelError(
            f"unknown zoo model {name!r}. Known models: {', '.join(list_models())}. "
            f"Add one with fxforge.models.zoo.register_model(name, factory)."
        )
    zoo_model = factory(int(seed))
    if not isinstance(zoo_model, ZooModel):
        raise TypeError(
            f"the factory of zoo model '{name}' returned {type(zoo_model).__name__}, "
            f"not a ZooModel"
        )
    return zoo_model


def _lazy_factory(module: str, function: str) -> ZooFactory:
    """A factory that imports `fxforge.models.<module>` only when first called."""

    def factory(seed: int) -> ZooModel:
        build: Callable[[int], Any] = getattr(
            importlib.import_module(f"fxforge.models.{module}"), function
        )
        return build(seed)

    factory.__name__ = f"{module}.{function}"
    return factory


# The built-in families: name -> (module under fxforge/models, factory function).
_BUILTIN = {
    "tiny-gpt2": ("hf_tiny", "build_tiny_gpt2"),
    "tiny-llama": ("hf_tiny", "build_tiny_llama"),
    "tiny-bert": ("hf_tiny", "build_tiny_bert"),
    "mlp": ("mlp", "build_mlp"),
    "cnn": ("cnn", "build_cnn"),
    "minilm": ("minilm", "build_minilm"),
}
for _name, (_module, _function) in _BUILTIN.items():
    register_model(_name, _lazy_factory(_module, _function))


def _code_lm_factory(variant: str) -> ZooFactory:
    def factory(seed: int) -> ZooModel:
        from fxforge.models.code_lm import build_code_lm_zoo  # trains on first use: import when asked

        return build_code_lm_zoo(variant, seed)

    factory.__name__ = f"code_lm.{variant}"
    return factory


# Trained, not random: built (and trained on first use) by fxforge/models/code_lm.py.
register_model("code-lm", _code_lm_factory("small"))
register_model("code-lm-tiny", _code_lm_factory("tiny"))
