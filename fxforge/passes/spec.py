"""Parse pipeline strings: `"canonicalize,quantize(bits=4,group_size=128),fuse_attention"`.

Each item is `name` or `name(opt=value,...)`. Values are Python literals (`4`, `0.5`, `True`,
`'rtn'`, `["q_proj","v_proj"]`) or bare words (`method=awq`), and are checked against the
pass's dataclass field types, so a typo fails here with the list of valid options rather than
deep inside a pass.
"""
from __future__ import annotations

import ast
import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from fxforge.errors import PassSpecError
from fxforge.passes.base import Pass
from fxforge.passes.registry import get_pass_class


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if depth != 0 or quote:
        raise PassSpecError(f"unbalanced brackets or quotes in pipeline spec {text!r}")
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_pipeline(text: str) -> list[Pass]:
    return [parse_pass(item) for item in split_top_level(text)]


def parse_pass(item: str) -> Pass:
    """`"quantize(bits=4)"` -> `Quantize(bits=4)`."""
    item = item.strip()
    name, _, rest = item.partition("(")
    name = name.strip()
    cls = get_pass_class(name)
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith(")"):
            raise PassSpecError(f"pass spec {item!r} is missing its closing ')'")
        for assignment in split_top_level(rest[:-1]):
            key, eq, raw = assignment.partition("=")
            if not eq:
                raise PassSpecError(f"option {assignment!r} of pass '{name}' must be written key=value. "
                                    f"{describe_options(cls)}")
            key = key.strip()
            if key in options:  # last-wins would silently drop what the user wrote first
                raise PassSpecError(f"option '{key}' of pass '{name}' is given twice in {item!r}; "
                                    f"keep one {key}=... ")
            options[key] = _literal(raw.strip())
    return make_pass(cls, options)


def make_pass(cls: type[Pass], options: dict[str, Any]) -> Pass:
    """Instantiate `cls` from options, checking names and types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key, value in options.items():
        if key not in fields:
            raise PassSpecError(f"pass '{cls.name}' has no option '{key}'. {describe_options(cls)}")
        options[key] = coerce(value, hints[key], f"option '{key}' of pass '{cls.name}'", cls)
    try:
        return cls(**options)
    except PassSpecError:
        raise
    except Exception as exc:  # __post_init__ checks meet values of any type: all are the user's to fix
        raise PassSpecError(f"pass '{cls.name}': {exc}. {describe_options(cls)}") from exc


def describe_options(cls: type[Pass]) -> str:
    hints = get_type_hints(cls)
    items = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        items.append(f"{f.name}: {type_name(hints[f.name])} = {default!r}")
    return f"Valid options: {', '.join(items)}." if items else "It takes no options."


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def coerce(value: Any, tp: Any, what: str, cls: type[Pass]) -> Any:
    """Check `value` against type `tp` (converting where lossless: int->float, list->tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise PassSpecError(f"{what} must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return coerce(value, arg, what, cls)
            except PassSpecError:
                continue
        raise PassSpecError(f"{what} must be {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise PassSpecError(f"{what} must be None, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise PassSpecError(f"{what} must be a {type_name(tp)}, got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        items = [coerce(v, args[0], what, cls) for v in value] if args else list(value)
        return tuple(items) if (origin or tp) is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise PassSpecError(f"{what} must be True or False, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise PassSpecError(f"{what} must be an int, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise PassSpecError(f"{what} must be {type_name(tp)}, got {value!r} ({type(value).__name__}). "
                            f"{describe_options(cls)}")
    return value


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    # TypeError: an unhashable dict key or set item ({[1]: 2}); RecursionError/MemoryError: absurd
    # nesting. None of them is a value any option takes: treat the text as a bare word.
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        if raw in ("true", "false"):
            return raw == "true"
        if raw in ("none", "null"):
            return None
        if len(raw) >= 2 and raw[0] + raw[-1] in ("[]", "()"):
            # a list of bare words, as written unquoted on a command line: targets=[q_proj,v_proj]
            return [_literal(item) for item in split_top_level(raw[1:-1])]
        return raw  # a bare word: method=awq


