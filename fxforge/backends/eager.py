"""Backend `eager`: runs the GraphModule as it is; fxforge ops run their reference implementations."""
from __future__ import annotations

from typing import Any, Sequence

from torch.fx import GraphModule


def prepare(gm: GraphModule, example_inputs: Sequence[Any] = (), **options: Any) -> GraphModule:
    if options:
        raise TypeError(f"the eager backend takes no options, got {sorted(options)}")
    return gm
