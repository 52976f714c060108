"""Choosing the linear layers a pass rewrites: `targets` / `exclude`, checked in one place.

Every pass with `targets`/`exclude` options selects through `LayerSelection` (one normal form
for the options, one check of the patterns), whose `sites` keeps two promises the bare
`linear_sites` query cannot:

* a pattern that matches no layer is a `PassError` naming the pattern and listing layers that
  exist (a typo in `targets` otherwise rewrites nothing, one in `exclude` rewrites a layer the
  user meant to keep) — `require_matches` does this for passes that select other things too;
* a layer an earlier pass already turned into an fxforge op (`quantize,sparsify`: the linears
  are `fxforge::linear_wq` by then) is reported in `skipped` with the reason, not silently
  absent from the count; so is an LM head a pattern named while `include_lm_head` is off.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite, linear_sites, matches_any
from fxforge.ir.ops import op_name_of

Skipped = list[tuple[str, str]]


@dataclass
class Selection:
    """The sites a pass should rewrite, and (layer, reason) for linear layers it will not."""

    sites: list[LinearSite]
    skipped: Skipped = field(default_factory=list)


def patterns_of(value: str | Sequence[str] | None, option: str = "targets") -> tuple[str, ...] | None:
    """One normal form for targets/exclude: None, or a tuple of patterns ("q_proj" -> ("q_proj",)).

    Raises ValueError naming `option` for anything that is not a pattern or a list of patterns.
    """
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{option} must be a module-path pattern or a list of them (e.g. ['q_proj', "
                         f"'layers.*.mlp.*']), got {value!r}")
    return patterns


@dataclass(frozen=True)
class LayerSelection:
    """Which layers a pass rewrites: `targets` (None = every one), minus `exclude`, LM head opt-in.

    The one place these options are normalized and checked; a pass with `targets`/`exclude`
    fields selects through `LayerSelection.of(self)`:

        selection = LayerSelection.of(self).sites(gm, self.name)      # linear layers
        LayerSelection.of(self).require_matches(self.name, paths, what="heads group")  # other units
    """

    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", patterns_of(self.targets, "targets"))
        object.__setattr__(self, "exclude", patterns_of(self.exclude, "exclude") or ())

    @classmethod
    def of(cls, options: object) -> LayerSelection:
        """The selection a pass's options describe (its `targets`, `exclude`, `include_lm_head`)."""
        return cls(getattr(options, "targets", None), getattr(options, "exclude", None),
                   bool(getattr(options, "include_lm_head", False)))

    @staticmethod
    def normalize_fields(options: object) -> None:
        """Rewrite a frozen pass's `targets`/`exclude` in the normal form (call in `__post_init__`),
        so `Pass(targets="q_proj") == Pass(targets=("q_proj",))` and a bad value fails at once."""
        object.__setattr__(options, "targets", patterns_of(getattr(options, "targets"), "targets"))
        object.__setattr__(options, "exclude", patterns_of(getattr(options, "exclude"), "exclude") or ())

    def chooses(self, path: str) -> bool:
        """Whether a layer at module path `path` is selected (ignoring the LM-head rule)."""
        return (self.targets is None or matches_any(path, self.targets)) and not matches_any(path, self.exclude)

    def require_matches(self, pass_name: str, available: Sequence[str], what: str = "linear layer",
                        hint: str = "") -> None:
        """PassError when targets is empty or one of its or exclude's patterns matches none of
        `available` (module paths): a typo in targets rewrites nothing, one in exclude rewrites
        a layer the user meant to keep."""
        if self.targets == ():  # once meant "all" to some passes and "none" to others: ask for the intent
            raise PassError(f"pass '{pass_name}': targets is empty, which selects no layer. Leave targets out "
                            f"(None) for every linear layer, or list patterns such as ['q_proj', 'v_proj'].",
                            pass_name=pass_name)
        require_matches(pass_name, "targets", self.targets or (), available, what, hint)
        require_matches(pass_name, "exclude", self.exclude, available, what, hint)

    def sites(self, gm: GraphModule, pass_name: str) -> Selection:
        """The float `aten.linear` sites chosen, with reasons for those left out.

        Raises PassError when a pattern of `targets` or `exclude` matches no linear layer at all
        (float, LM head, or already rewritten by an earlier pass).
        """
        every = linear_sites(gm, include_lm_head=True)
        rewritten = rewritten_linear_layers(gm)
        self.require_matches(pass_name, [s.module_path for s in every] + list(rewritten))
        sites = linear_sites(gm, targets=self.targets, exclude=self.exclude, include_lm_head=self.include_lm_head)
        skipped: Skipped = []
        if self.targets is not None and not self.include_lm_head:
            kept = {s.node for s in sites}
            skipped += [(s.module_path, f"the LM head: {pass_name} leaves it alone unless include_lm_head=True")
                        for s in every if s.node not in kept and self.chooses(s.module_path)]
        for path, op in rewritten.items():
            if self.chooses(path) and (self.include_lm_head or not _looks_like_lm_head(path)):
                skipped.append((path, f"already rewritten by an earlier pass (now fxforge::{op}); {pass_name} "
                                      f"rewrites float linear layers only: run {pass_name} before that pass"))
        return Selection(sites, skipped)


def require_matches(pass_name: str, option: str, patterns: Iterable[str], available: Sequence[str],
                    what: str = "linear layer", hint: str = "") -> None:
    """PassError unless every pattern matches at least one of `available` (module paths)."""
    for pattern in patterns:
        if not any(matches_any(path, [pattern]) for path in available):
            raise PassError(
                f"pass '{pass_name}': {option} pattern '{pattern}' matches no {what}. "
                f"{_suggest(pattern, available, what)} Patterns are fnmatch globs over module paths; "
                f"a bare name matches as a suffix ('q_proj' matches 'model.layers.0.self_attn.q_proj').{hint}",
                pass_name=pass_name)


def rewritten_linear_layers(gm: GraphModule) -> dict[str, str]:
    """module path -> fxforge op for layers an earlier pass turned into an fxforge linear op."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        name = op_name_of(node.target) if node.op == "call_function" else None
        if name and "linear" in name and node.meta.get("module_path"):
            found.setdefault(node.meta["module_path"], name)
    return found


def _looks_like_lm_head(path: str) -> bool:
    return "lm_head" in path.rsplit(".", 1)[-1]


def _suggest(pattern: str, available: Sequence[str], what: str) -> str:
    if not available:
        return f"The model has no {what}."
    names = sorted({p.rsplit(".", 1)[-1] for p in available} | set(available))
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if close:
        return f"Close matches: {', '.join(close)}."
    shown = list(dict.fromkeys(p or "<model>" for p in available))  # the root module has no path
    more = f" ... ({len(shown)} in all)" if len(shown) > 12 else ""
    return f"Available: {', '.join(shown[:12])}{more}."
