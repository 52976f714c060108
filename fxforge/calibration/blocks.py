"""Split a canonical graph into its repeated blocks, so calibration can run one block at a time.

Every call node of a traced graph carries the module it came from (`node.meta["module_path"]`,
e.g. "model.layers.3.mlp.down_proj"). The repeated blocks are the children of the container
that owns most nodes through an indexed path ("model.layers", "transformer.h",
"encoder.layer"). The graph's computation nodes, in graph order, are cut into contiguous
segments:

    prologue   everything before the first block node (embeddings, rotary tables, masks)
    block i    from block i's first node to block i+1's first node (unlabelled nodes in
               between, e.g. a residual add, stay with the block before them)
    epilogue   everything after the last block node (final norm, lm head, pooler)

Segments are contiguous in a topological order, so running them one after another with the
values that cross each cut (hidden states, position embeddings, masks, graph inputs) computes
the graph. Placeholders, get_attr nodes (weights, fetched when used) and the output node
belong to no segment. A graph without indexed modules (an MLP, a CNN) is one segment.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from torch.fx import GraphModule, Node

__all__ = ["Segment", "BlockPlan", "split_blocks", "block_container", "is_computation"]

_INDEX = re.compile(r"^\d+$")


def is_computation(node: Node) -> bool:
    """A node that computes a value at run time (not an input, a weight or the output)."""
    return node.op in ("call_function", "call_method", "call_module")


def _block_key(path: str) -> tuple[str, int] | None:
    """("model.layers", 3) for "model.layers.3.mlp.down_proj": the outermost indexed module."""
    atoms = path.split(".") if path else []
    for i, atom in enumerate(atoms):
        if i > 0 and _INDEX.match(atom):
            return ".".join(atoms[:i]), int(atom)
    return None


def block_container(gm: GraphModule) -> str | None:
    """The module path of the repeated blocks' container, or None when the graph has none."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        key = _block_key(str(node.meta.get("module_path") or "")) if is_computation(node) else None
        if key is not None:
            counts[key[0]] += 1
    if not counts:
        return None
    return max(counts, key=lambda prefix: (counts[prefix], -len(prefix)))


@dataclass
class Segment:
    """A contiguous run of computation nodes: the prologue, one block, or the epilogue.

    name: "prologue", the block's module path ("model.layers.3"), "epilogue", or "graph" for a
        graph without blocks.
    kind: "prologue" | "block" | "epilogue" | "graph".
    index: position in `BlockPlan.segments`.
    nodes: the computation nodes in graph order (refreshed by `BlockPlan.refresh` after a rewrite).
    """

    name: str
    kind: str
    index: int
    nodes: list[Node] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {self.kind}, {len(self.nodes)} nodes)"


@dataclass
class BlockPlan:
    """The graph's segments in execution order, and the values that cross each cut."""

    gm: GraphModule
    container: str | None
    segments: list[Segment]

    @property
    def blocks(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "block"]

    def segment_of(self) -> dict[Node, int]:
        """{computation node: segment index} for the graph as it is now."""
        return {n: s.index for s in self.segments for n in s.nodes}

    def inputs(self, segment: Segment) -> list[Node]:
        """Values the segment reads that are computed outside it (graph inputs, earlier segments)."""
        inside = set(segment.nodes)
        seen: dict[Node, None] = {}
        for node in segment.nodes:
            for arg in node.all_input_nodes:
                if arg not in inside and arg.op != "get_attr":
                    seen[arg] = None
        return list(seen)

    def outputs(self, segment: Segment) -> list[Node]:
        """Values of the segment read after it (by later segments or the graph's output)."""
        inside = set(segment.nodes)
        return [n for n in segment.nodes if any(u not in inside for u in n.users)]

    def refresh(self, segment: Segment) -> None:
        """Re-read `segment.nodes` from the graph after a rewrite of that segment.

        A segment is everything after the previous segment's last node up to the next
        segment's first node: nodes a rewrite inserted into the block (quantized layers,
        dequantization) are picked up, erased ones dropped. The neighbours must be untouched.
        """
        i = segment.index
        start = self.segments[i - 1].nodes[-1] if i > 0 else None
        stop = self.segments[i + 1].nodes[0] if i + 1 < len(self.segments) else None
        for marker in (start, stop):
            if marker is not None and getattr(marker, "_erased", False):
                raise RuntimeError(f"the rewrite of '{segment.name}' erased node '{marker.name}' of a neighbouring "
                                   f"segment; a block's rewrite must stay inside the block")
        nodes: list[Node] = []
        node = start.next if start is not None else next(iter(self.gm.graph.nodes))
        while node is not stop and node.op != "root":
            if node.op == "output":
                break
            if is_computation(node):
                nodes.append(node)
            node = node.next
        segment.nodes = nodes

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)


def split_blocks(gm: GraphModule) -> BlockPlan:
    """Cut `gm`'s computation nodes into prologue, one segment per block, and epilogue."""
    container = block_container(gm)
    nodes = [n for n in gm.graph.nodes if is_computation(n)]
    if container is None:
        return BlockPlan(gm, None, [Segment("graph", "graph", 0, nodes)] if nodes else [])
    labels: list[int | None] = []
    for node in nodes:
        key = _block_key(str(node.meta.get("module_path") or ""))
        labels.append(key[1] if key is not None and key[0] == container else None)
    last_block_node = max(i for i, label in enumerate(labels) if label is not None)

    prologue = Segment("prologue", "prologue", 0)
    epilogue = Segment("epilogue", "epilogue", 0)
    blocks: list[Segment] = []
    current: Segment = prologue
    seen_index: int | None = None
    for position, (node, label) in enumerate(zip(nodes, labels)):
        if position > last_block_node:
            current = epilogue
        elif label is not None and (seen_index is None or label > seen_index):
            # a new block starts; a node labelled with an earlier block after a later one stays
            # where it is (segments must stay contiguous in graph order)
            seen_index = label
            current = Segment(f"{container}.{label}", "block", 0)
            blocks.append(current)
        current.nodes.append(node)
    segments = [s for s in [prologue, *blocks, epilogue] if s.nodes]
    for i, segment in enumerate(segments):
        segment.index = i
    return BlockPlan(gm, container, segments)
