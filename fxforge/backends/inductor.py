"""Backend `inductor`: torch.compile on the rewritten graph (fxforge ops run as opaque calls)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule

# torch.compile's keyword arguments: prepare forwards them, so they are declared here for
# fxforge.backends.validate to check names before compiling.
OPTIONS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def prepare(gm: GraphModule, example_inputs: Sequence[Any] = (), **options: Any) -> Any:
    options.setdefault("dynamic", True)
    return torch.compile(gm, **options)
