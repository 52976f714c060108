"""Which passes can follow which: the pipeline's check before it runs anything.

Each pass declares the forms of linear layer it rewrites (`Pass.consumes`: "linear" for a float
`aten.linear`, or an fxforge op name such as "linear_wq") and the form it leaves the layers it
selects in (`Pass.produces`; "adapter" stands for any adapter op or branch). Walking the
pipeline, a pass that turned *every* layer a later pass would select into a form that later
pass does not read makes the pair meaningless: `quantize,sparsify` would zero no weight (the
weights are integer codes by then). That pipeline is refused up front, with an error naming both
passes and the way out, instead of a later pass rewriting zero sites.

Only whole coverage counts: a pass with `targets` or `exclude` leaves float layers behind that
a later pass may legitimately rewrite, so after it the forms are unknown and nothing is refused.
The declarations, not a table of pairs, are the source of truth (docs/composition.md shows the
matrix they produce, measured).
"""
from __future__ import annotations

from typing import Sequence

from fxforge.errors import PassSpecError
from fxforge.passes.base import Pass

__all__ = ["check_composition"]

FLOAT = "linear"


def _describe(form: str) -> str:
    if form == FLOAT:
        return "float linear layers (aten.linear)"
    if form == "adapter":
        return "layers with adapters"
    return f"fxforge::{form} layers"


def _covers(earlier: Pass, later: Pass) -> bool:
    """Whether `earlier` selects every layer `later` would (no targets/exclude, LM head too)."""
    if getattr(earlier, "targets", None) is not None or getattr(earlier, "exclude", None):
        return False
    return bool(getattr(earlier, "include_lm_head", False)) or not getattr(later, "include_lm_head", False)


def check_composition(passes: Sequence[Pass]) -> None:
    """PassSpecError when a pass would find none of the linear forms it rewrites because an
    earlier pass turned all of them into another form. The message names both passes."""
    made: Pass | None = None  # the last pass that changed the form of every layer, if any
    form: str | None = None  # the form it left them in; None: unknown (mixed, or as traced)
    for p in passes:
        consumes = frozenset(p.consumes)
        if consumes and made is not None and form is not None and form not in consumes and _covers(made, p):
            reads = " or ".join(_describe(f) for f in sorted(consumes))
            if made.name == p.name:
                raise PassSpecError(f"pass '{p.spec()}' runs twice, but its first run turns every layer the second "
                                    f"would select into {_describe(form)}, which {p.name} does not rewrite; run it "
                                    f"once, or give the first targets/exclude that leave the second's layers alone.")
            raise PassSpecError(
                f"passes '{made.spec()}' and '{p.spec()}' do not compose in this order: {p.name} cannot follow {made.name}: {p.name} rewrites "
                f"{reads}, and {made.name} turns every layer it would select into {_describe(form)}, so "
                f"{p.name} would rewrite nothing. Run {p.name} before {made.name}, or give {made.name} "
                f"targets/exclude that leave {p.name}'s layers alone.")
        if p.produces is not None and consumes:
            if _covers_all(p):
                made, form = p, p.produces
            else:
                made, form = None, None  # some layers changed, some not: nothing to say for sure
    return None


def _covers_all(p: Pass) -> bool:
    return getattr(p, "targets", None) is None and not getattr(p, "exclude", None)
