"""Helpers shared by tests (importable because pyproject sets pytest's pythonpath to tests/)."""
import copy
import functools



@functools.lru_cache(maxsize=None)
def _traced_zoo(name: str):
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.models import get_model

    zoo = get_model(name)
    gm = trace(zoo.model, zoo.args, zoo.kwargs)
    raw = copy.deepcopy(gm)
    canonicalize(gm)
    return zoo, raw, gm


def traced_zoo(name: str, canonical: bool = True):
    """(ZooModel, GraphModule) for a zoo model, traced once per session; the graph is a copy."""
    zoo, raw, canonical_gm = _traced_zoo(name)
    return zoo, copy.deepcopy(canonical_gm if canonical else raw)
