"""The calibration engine: statistics of layer inputs, gathered one block at a time.

    result = calibrate(gm, ctx, {site.node: ("gram",) for site in sites},
                       rewrite_block=quantize_block, pass_name="quantize", method="gptq")

The graph is cut into prologue, repeated blocks and epilogue (`blocks.split_blocks`). The
prologue runs once per calibration batch; then, for each segment in order:

1. capture: the segment runs on every batch's boundary values, and the observers of the
   requested layers' inputs accumulate (ONE `InputStatistics` per distinct input node: q/k/v
   share one, gate/up share one). Under torch.distributed the sums are all-reduced here.
2. rewrite: `rewrite_block(block)` rewrites that segment in place from its statistics
   (`block.stats(node)`); then the statistics are dropped.
3. advance: the rewritten segment runs again to produce the next segment's inputs, so later
   blocks calibrate on the outputs of the rewritten earlier ones (as GPTQ and AWQ do).

Without `rewrite_block`, nothing is rewritten: every segment runs once, in one sweep, and the
statistics of every requested layer are returned (for methods that need all scores before
deciding anything, such as a global sparsity allocation). Ask only for what you keep.

Streamed graphs (weights mapped from safetensors files, `calibration/streaming.py`): after a
segment is done, its new tensors are written to disk and its pages given back (`settle`).

Memory: one segment's statistics, plus the boundary values of all batches (in memory, or in a
temporary directory on disk when they exceed `offload_bytes`), plus the weights. Segments
after the last requested one are never run. Batches are read through
`ctx.calibration_batches` (checked against the graph's inputs).
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxforge.calibration.blocks import BlockPlan, Segment, split_blocks
from fxforge.calibration.observers import InputStatistics, Observer, distributed
from fxforge.calibration.streaming import settle

__all__ = ["calibrate", "CalibrationResult", "BlockCalibration", "BoundaryStore", "DEFAULT_OFFLOAD_BYTES",
           "run_segment"]

Statistic = "str | type[Observer]"
Requests = Mapping[Any, Iterable[Any]]

# Boundary activations above this many bytes (all batches together) go to disk. 2 GiB: a
# 7B model's hidden states for 128 batches of 2048 tokens in fp32 are 4 GiB.
DEFAULT_OFFLOAD_BYTES = int(os.environ.get("FXFORGE_CALIBRATION_OFFLOAD_BYTES", 2 << 30))


@dataclass
class BlockCalibration:
    """What `rewrite_block` receives: one segment and the statistics of its requested layers."""

    gm: GraphModule
    segment: Segment
    nodes: list[Node]                       # requested layer nodes in this segment, graph order
    statistics: dict[str, InputStatistics]  # by layer node name; layers sharing an input share one
    batches: int

    def stats(self, node: Node | str) -> InputStatistics:
        """The statistics of `node`'s input (a node or its name)."""
        return self.statistics[node if isinstance(node, str) else node.name]

    @property
    def name(self) -> str:
        return self.segment.name


@dataclass
class CalibrationResult:
    """What a calibration run did; `statistics` only without rewriting (by layer node name)."""

    batches: int
    segments: int
    blocks: int
    offloaded: bool
    statistics: dict[str, InputStatistics] = field(default_factory=dict)


# --------------------------------------------------------------------------- boundary values


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class BoundaryStore:
    """The values crossing the current cut, one dict {node name: value} per batch.

    Kept in memory until their total exceeds `offload_bytes`; from then on every batch lives
    in its own file (torch.save, read back with weights_only=True) in a TemporaryDirectory
    removed by `close()`.
    """

    def __init__(self, count: int, offload_bytes: int = DEFAULT_OFFLOAD_BYTES):
        self.offload_bytes = offload_bytes
        self._memory: list[dict[str, Any] | None] = [None] * count
        self._sizes = [0] * count
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def offloaded(self) -> bool:
        return self._dir is not None

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, index: int) -> str:
        assert self._dir is not None
        return os.path.join(self._dir.name, f"batch{index}.pt")

    def put(self, index: int, values: dict[str, Any]) -> None:
        self._sizes[index] = _nbytes(values)
        if self._dir is None and sum(self._sizes) > self.offload_bytes:
            self._dir = tempfile.TemporaryDirectory(prefix="fxforge-calibration-")
            for i, kept in enumerate(self._memory):
                if kept is not None and i != index:
                    self._write(i, kept)
                    self._memory[i] = None
        if self._dir is None:
            self._memory[index] = values
        else:
            self._memory[index] = None
            self._write(index, values)

    def _write(self, index: int, values: dict[str, Any]) -> None:
        path = self._path(index)
        torch.save(values, path + ".tmp")
        os.replace(path + ".tmp", path)  # a batch file is whole or absent

    def get(self, index: int) -> dict[str, Any]:
        if self._dir is None:
            values = self._memory[index]
            assert values is not None
            return dict(values)
        return torch.load(self._path(index), weights_only=True)

    def close(self) -> None:
        self._memory = [None] * len(self._memory)
        if self._dir is not None:
            self._dir.cleanup()


# --------------------------------------------------------------------------- running a segment


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def run_segment(gm: GraphModule, nodes: list[Node], env: dict[str, Any],
                watch: Mapping[str, InputStatistics] | None = None) -> dict[str, Any]:
    """Run `nodes` (in order) on `env` ({node name: value} of every value they read), in place.

    `watch` maps input node names to the statistics that observe them: values from outside the
    segment are observed first, the segment's own when computed. Values the segment computes
    and uses only inside itself are freed after their last use.
    """
    watch = watch or {}
    for name, stats in watch.items():
        if name in env:
            stats.update(env[name])
    inside = set(nodes)
    last_use: dict[Node, Node] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in inside:
                last_use[arg] = node
    free_after: dict[Node, list[Node]] = defaultdict(list)
    for value, user in last_use.items():
        if all(u in inside for u in value.users):
            free_after[user].append(value)

    def load(arg: Node) -> Any:
        if arg.op == "get_attr":
            return _fetch_attr(gm, arg.target)
        return env[arg.name]

    for node in nodes:
        args = map_arg(node.args, load)
        kwargs = map_arg(node.kwargs, load)
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = gm.get_submodule(node.target)(*args, **kwargs)
        env[node.name] = value
        if node.name in watch:
            watch[node.name].update(value)
        for done in free_after.get(node, ()):
            env.pop(done.name, None)
        if not node.users:  # a dead value (a pass left it behind): nothing reads it
            env.pop(node.name, None)
    return env


# --------------------------------------------------------------------------- the engine


def _consumer(key: Any) -> Node:
    node = getattr(key, "node", key)  # a LinearSite or a Node
    if not isinstance(node, Node):
        raise TypeError(f"calibration requests are keyed by graph nodes (or LinearSites), got {key!r}")
    return node


def _observed(node: Node) -> Node:
    source = node.args[0] if node.args else None
    if not isinstance(source, Node):
        raise ValueError(f"calibration: the first argument of '{node.name}' is not a graph value, nothing to observe")
    return source


def _width(node: Node) -> int | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape:
        try:
            return int(shape[-1])
        except (TypeError, ValueError):  # a symbolic last dimension
            return None
    return None


def _normalize(gm: GraphModule, plan: BlockPlan, requests: Requests) -> dict[int, dict[Node, set]]:
    """{segment index: {layer node: statistics}}, validated."""
    where = plan.segment_of()
    by_segment: dict[int, dict[Node, set]] = defaultdict(dict)
    for key, statistics in requests.items():
        node = _consumer(key)
        if node.graph is not gm.graph or node not in where:
            raise ValueError(f"calibration: '{node.name}' is not a computation node of this graph")
        _observed(node)
        wanted = by_segment[where[node]].setdefault(node, set())
        wanted.update([statistics] if isinstance(statistics, str) else statistics)
    return by_segment


def _build_statistics(wanted: dict[Node, set], config: dict[str, Any]) -> tuple[dict[str, InputStatistics],
                                                                                  dict[str, InputStatistics]]:
    """(by layer name, by observed input name): one InputStatistics per distinct input node."""
    needs: dict[Node, set] = defaultdict(set)
    for node, statistics in wanted.items():
        needs[_observed(node)].update(statistics)
    by_input = {source.name: InputStatistics(source.name, sorted(stats, key=str), _width(source), **config)
                for source, stats in needs.items()}
    return {node.name: by_input[_observed(node).name] for node in wanted}, by_input


def _boundary(plan: BlockPlan, upto: int) -> set[str]:
    """Names of the values computed by segments ≤ `upto` (or graph inputs) read after it."""
    where = plan.segment_of()
    keep = set()
    for node in plan.gm.graph.nodes:
        if node.op == "get_attr" or node.op == "output":
            continue
        if node.op != "placeholder" and where.get(node, upto + 1) > upto:
            continue
        if any(u.op == "output" or where.get(u, -1) > upto for u in node.users):
            keep.add(node.name)
    return keep


def calibrate(gm: GraphModule, ctx: Any, requests: Requests,
              rewrite_block: Callable[[BlockCalibration], None] | None = None, *,
              pass_name: str | None = None, method: str | None = None, max_batches: int | None = None,
              sample_rows: int = 256, offload_bytes: int = DEFAULT_OFFLOAD_BYTES) -> CalibrationResult:
    """Gather `requests` ({layer node or LinearSite: statistic names}) block by block.

    Statistic names: "gram", "abs_mean", "moments", "samples" (`observers.OBSERVERS`) or an
    `Observer` subclass. With `rewrite_block`, each segment holding requested layers is
    captured, handed to `rewrite_block(BlockCalibration)` to rewrite in place, and re-run so
    later segments see its outputs; the statistics are freed after each segment. Without it,
    the graph is not changed and every requested layer's statistics are returned.

    `ctx` is the PassContext (calibration_batches, progress, seed); `pass_name`/`method` name
    the reader in CalibrationErrors; `max_batches` caps the batches read; `sample_rows` is the
    rows per batch the "samples" statistic keeps; `offload_bytes` is where boundary values go
    to disk.
    """
    plan = split_blocks(gm)
    by_segment = _normalize(gm, plan, requests)
    result = CalibrationResult(batches=0, segments=len(plan), blocks=len(plan.blocks), offloaded=False)
    if not by_segment:
        return result
    last = max(by_segment)
    rank = torch.distributed.get_rank() if distributed() else 0
    config = {"rows_per_batch": sample_rows, "generator": torch.Generator().manual_seed(int(ctx.seed) + rank)}

    batches = ctx.calibration_batches(gm, max_batches, pass_name=pass_name, method=method)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    initial = [dict(zip(placeholders, flat)) for flat in batches]
    store = BoundaryStore(len(initial), offload_bytes)
    for i, values in enumerate(initial):
        store.put(i, values)
    del initial
    result.batches = len(store)
    label = f"{pass_name or 'calibration'}" + (f" ({method})" if method else "")
    try:
        with torch.no_grad():
            for segment in ctx.progress(plan.segments[:last + 1], desc=f"calibrate {label}", total=last + 1):
                wanted = by_segment.get(segment.index)
                if wanted and rewrite_block is None:  # one run: observe, and keep what the next segment reads
                    by_layer, by_input = _build_statistics(wanted, config)
                    _advance(plan, segment, store, by_input, keep_outputs=segment.index < last)
                    for stats in by_input.values():
                        stats.all_reduce()
                    result.statistics.update(by_layer)
                    settle(gm, segment.nodes)
                    continue
                if wanted:
                    _capture_and_rewrite(gm, segment, wanted, store, config, rewrite_block)
                if segment.index < last:
                    _advance(plan, segment, store)
                plan.refresh(segment)
                settle(gm, segment.nodes)  # streamed graphs: this block's weights and results go to disk
        result.offloaded = store.offloaded
    finally:
        store.close()
    return result


def _capture_and_rewrite(gm: GraphModule, segment: Segment, wanted: dict[Node, set], store: BoundaryStore,
                         config: dict[str, Any], rewrite_block: Callable[[BlockCalibration], None]) -> None:
    by_layer, by_input = _build_statistics(wanted, config)
    for i in range(len(store)):
        run_segment(gm, segment.nodes, store.get(i), by_input)
    for stats in by_input.values():
        stats.all_reduce()
    nodes = [n for n in segment.nodes if n in wanted]
    block = BlockCalibration(gm, segment, nodes, by_layer, len(store))
    del by_layer, by_input
    rewrite_block(block)
    block.statistics.clear()  # the block's statistics die here, not when the next block's are built


def _advance(plan: BlockPlan, segment: Segment, store: BoundaryStore,
             watch: Mapping[str, InputStatistics] | None = None, keep_outputs: bool = True) -> None:
    """Run the (possibly rewritten) segment on every batch and keep what later segments read."""
    plan.refresh(segment)
    keep = _boundary(plan, segment.index)
    for i in range(len(store)):
        env = run_segment(plan.gm, segment.nodes, store.get(i), watch)
        if keep_outputs:
            store.put(i, {name: value for name, value in env.items() if name in keep})
