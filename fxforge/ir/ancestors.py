"""Walking a graph upwards: every node a value is computed from, each once."""
from __future__ import annotations

from typing import Callable, Iterator

from torch.fx import Node


def ancestors(node: Node, through: Callable[[Node], bool] = lambda n: True) -> Iterator[Node]:
    """`node` and the nodes it is computed from, depth first, each once. A node for which
    `through` is False is yielded but its inputs are not walked (e.g. `sym_size`: a mask built
    from an input's length does not depend on the input's values). Stop iterating to stop early."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        if through(current):
            stack.extend(current.all_input_nodes)
