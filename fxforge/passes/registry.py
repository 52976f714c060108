"""Passes by name: `@register_pass`, `registered_passes()`, `get_pass_class(name)`.

Looking a pass up imports only the module that defines it: `BUILTIN_PASSES` maps each of
fxforge's own pass names to its module (as xDSL's pass registry does), so parsing
`"quantize(bits=4)"` loads the quantize family and nothing else. Plugins (the `fxforge.passes`
entry-point group) are loaded only for a name that is not built in, or by `registered_passes()`.
A new built-in pass needs one line in `BUILTIN_PASSES`; `tests/passes/test_registry_map.py` fails
with that line when it is missing.
"""
from __future__ import annotations

import importlib

from fxforge.errors import PassSpecError
from fxforge.passes.base import Pass

__all__ = ["BUILTIN_PASSES", "register_pass", "registered_passes", "get_pass_class"]

# name -> module whose import registers it; kept sorted by name
BUILTIN_PASSES: dict[str, str] = {
    "add_adapters": "fxforge.passes.adapters.add_adapters",
    "add_kv_cache": "fxforge.passes.kv_cache.add_kv_cache",
    "add_medusa_heads": "fxforge.passes.add_medusa_heads",
    "bitdelta": "fxforge.passes.quantize.bitdelta",
    "canonicalize": "fxforge.passes.canonicalize",
    "fuse_attention": "fxforge.passes.attention.fuse_attention",
    "fuse_projections": "fxforge.passes.projections.fuse_projections",
    "fuse_rms_norm": "fxforge.passes.fuse_rms_norm",
    "llm_int8": "fxforge.passes.quantize.llm_int8",
    "medusa_greedy_verify": "fxforge.passes.medusa_greedy_verify",
    "merge_adapters": "fxforge.passes.adapters.merge_adapters",
    "prune": "fxforge.passes.prune.prune",
    "quantize": "fxforge.passes.quantize",
    "quantize_dynamic": "fxforge.passes.quantize.quantize_dynamic",
    "quantize_fp": "fxforge.passes.quantize.quantize_fp",
    "shift_add": "fxforge.passes.quantize.shift_add",
    "sparsify": "fxforge.passes.prune.sparsify",
    "split_medusa_heads": "fxforge.passes.split_medusa_heads",
    "unmerge_adapters": "fxforge.passes.adapters.unmerge_adapters",
}

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` usable by name in pipelines and on the command line."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register_pass needs a subclass of fxforge.Pass, got {cls!r}")
    # the class itself must be decorated: a plain subclass inherits its parent's dataclass params
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass: @dataclass(frozen=True)")
    if not cls.name or not cls.name.isidentifier():
        raise TypeError(f"pass {cls.__name__} needs a `name` class attribute that is an identifier")
    builtin_module = BUILTIN_PASSES.get(cls.name)
    if builtin_module is not None and cls.__module__ != builtin_module:
        raise ValueError(f"pass {cls.__module__}.{cls.__qualname__}: the name '{cls.name}' belongs to fxforge's "
                         f"built-in pass in {builtin_module}; choose another name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"a pass named '{cls.name}' is already registered ({existing.__module__}.{existing.__qualname__})")
    _checked_options(cls)
    _REGISTRY[cls.name] = cls
    return cls


def _checked_options(cls: type[Pass]) -> None:
    """Make `cls(...)` with a bad option raise PassSpecError, as the same pass in a pipeline
    string does: `__post_init__` validates with ValueError/TypeError (see passes/README.md), and a
    user building `Quantize(bits=99)` in Python deserves the same error class as on the CLI."""
    post_init = cls.__dict__.get("__post_init__")
    if post_init is None or getattr(post_init, "_fxforge_checked", False):
        return

    def checked_post_init(self: Pass) -> None:
        try:
            post_init(self)
        except PassSpecError:
            raise
        except (ValueError, TypeError) as exc:
            raise PassSpecError(str(exc)) from exc

    checked_post_init._fxforge_checked = True  # type: ignore[attr-defined]
    checked_post_init.__doc__ = post_init.__doc__
    cls.__post_init__ = checked_post_init  # type: ignore[method-assign]


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass by name: fxforge's own and those of installed plugins (entry points).

    This imports every pass module; to look up one pass, use `get_pass_class`."""
    for name in BUILTIN_PASSES:
        _load_builtin(name)
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    """The pass class registered as `name`, importing only its module (or, for a name that is
    not built in, the installed plugins); a PassSpecError listing the known passes otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN_PASSES:
        return _load_builtin(name)
    _load_plugins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    import difflib

    passes = registered_passes()
    close = difflib.get_close_matches(name, passes, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise PassSpecError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(passes)}.")


def _load_builtin(name: str) -> type[Pass]:
    module = BUILTIN_PASSES[name]
    importlib.import_module(module)
    cls = _REGISTRY.get(name)
    if cls is None or cls.__module__ != module:
        # a bug in fxforge, not in the user's input: the map and the code disagree
        raise RuntimeError(f"BUILTIN_PASSES in fxforge/passes/registry.py says pass '{name}' is registered by "
                           f"{module}, but importing it registered "
                           f"{f'{cls.__module__}.{cls.__qualname__}' if cls else 'nothing by that name'}; "
                           f"fix the map")
    return cls


_plugins_loaded = False


def _load_plugins() -> None:
    """Import the `fxforge.passes` entry points once: each is a Pass subclass (registered here)
    or a module whose import registers its passes."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points  # looked up at call time: tests substitute it

    for ep in entry_points(group="fxforge.passes"):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj)
