"""Methods: the interchangeable algorithms inside one pass family, one class each.

A pass family (quantize, prune, sparsify, add_adapters, shift_add, ...) does one job; a method
is one way of doing it (quantize's rtn / awq / gptq / easyquant; prune's flap / magnitude /
wanda_sp). Each method is a frozen dataclass whose fields are *its own* options, registered
under its family:

    @register_method("quantize")
    @dataclass(frozen=True)
    class Gptq(Method):
        name = "gptq"
        needs_calibration = True
        damp: float = 0.01
        block_size: int = 128

The pass keeps the options users write in pipeline strings (`quantize(method=gptq,damp=0.1)`)
and hands each method only its own: `method_options(family, method, pass_options)` builds the
method object and raises PassSpecError when an option that belongs to another method of the
family was changed from its default (`quantize(method=rtn,damp=0.1)`: damp is gptq's). Adding
a method is one new class in its family's room; nothing else changes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from fxforge.errors import PassSpecError

__all__ = ["Method", "register_method", "method_class", "methods_of", "method_options", "pass_method"]

_METHODS: dict[str, dict[str, type["Method"]]] = {}

M = TypeVar("M", bound=type["Method"])


@dataclass(frozen=True)
class Method:
    """Base of every method. Subclass as a frozen dataclass; fields are the method's options.

    name: the method's name in its family (`method=<name>`).
    needs_calibration: the method reads calibration data (the pass asks the calibration
        engine for `statistics` before rewriting).
    statistics: which observers the method needs at the input of each site it rewrites
        (names understood by the calibration engine, e.g. "gram", "abs_mean", "moments",
        "samples"); empty for data-free methods.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    statistics: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def register_method(family: str) -> Callable[[M], M]:
    """Class decorator: register a Method subclass as `method=<cls.name>` of `family`."""

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method needs a subclass of Method, got {cls!r}")
        params = cls.__dict__.get("__dataclass_params__")
        if params is None or not params.frozen:
            raise TypeError(f"method {cls.__name__} must be a frozen dataclass: @dataclass(frozen=True)")
        if not cls.name:
            raise TypeError(f"method {cls.__name__} needs a `name` class attribute")
        known = _METHODS.setdefault(family, {})
        existing = known.get(cls.name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{family} already has a method named '{cls.name}' ({existing.__qualname__})")
        known[cls.name] = cls
        return cls

    return decorate


def methods_of(family: str) -> dict[str, type[Method]]:
    """Every registered method of `family`, by name (registration order)."""
    return dict(_METHODS.get(family, {}))


def method_class(family: str, name: str) -> type[Method]:
    """The method class, or a PassSpecError listing the family's methods."""
    known = _METHODS.get(family, {})
    if name not in known:
        raise PassSpecError(f"{family}: method={name!r} must be one of {tuple(known)}")
    return known[name]


def method_options(family: str, method: str, options: Mapping[str, Any],
                   defaults: Mapping[str, Any] | None = None) -> Method:
    """Build `method`'s object from the pass's options.

    `options` are the pass's option values; `defaults` their defaults (to tell which the user
    changed). An option that some *other* method of the family declares and that differs from
    its default is a PassSpecError naming the method it belongs to; options no method declares
    (bits, targets, ...) belong to the pass and are ignored here.
    """
    cls = method_class(family, method)
    own = set(cls.option_names())
    defaults = defaults or {}
    owners: dict[str, list[str]] = {}  # option -> the other methods declaring it (two may share one)
    for other_name, other in _METHODS.get(family, {}).items():
        if other is not cls:
            for key in other.option_names():
                if key not in own:
                    owners.setdefault(key, []).append(other_name)
    for key, names in owners.items():
        if key in options and key in defaults and options[key] != defaults[key]:
            belongs = (f"method '{names[0]}'" if len(names) == 1
                       else "methods " + ", ".join(f"'{n}'" for n in names))
            raise PassSpecError(
                f"{family}: option {key}={options[key]!r} belongs to {belongs}, not "
                f"'{method}'. Remove it, or use method={names[0]}.")
    return cls(**{key: options[key] for key in own if key in options})


def pass_method(family: str, options: Any) -> Method:
    """`method_options` for a pass dataclass: its `method` field names the method, its fields
    are the options and their dataclass defaults tell which the user changed."""
    fields = dataclasses.fields(options)
    values = {f.name: getattr(options, f.name) for f in fields}
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in fields
                     if f.default_factory is not dataclasses.MISSING})  # type: ignore[misc]
    return method_options(family, values["method"], values, defaults)
