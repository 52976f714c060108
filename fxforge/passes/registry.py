"""Passes by name: `@register_pass`, `registered_passes()`, `get_pass_class(name)`, and the
loading of fxforge's own passes and of plugins (the `fxforge.passes` entry-point group)."""
from __future__ import annotations

from fxforge.errors import PassSpecError
from fxforge.passes.base import Pass

__all__ = ["register_pass", "registered_passes", "get_pass_class"]


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
    """Every pass by name: fxforge's own and those of installed plugins (entry points)."""
    _load_builtin_and_plugin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PassSpecError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(passes)}.")
    return passes[name]


_loaded = False


def _load_builtin_and_plugin_passes() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import fxforge.passes as package

    for info in pkgutil.walk_packages(package.__path__, prefix="fxforge.passes."):
        if info.name.rsplit(".", 1)[-1] not in ("base", "spec"):
            importlib.import_module(info.name)
    for ep in entry_points(group="fxforge.passes"):
        obj = ep.load()  # a Pass subclass, or a module whose import registers passes
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj)
