"""Medusa candidate trees: structure, attention mask, candidates, acceptance, KV compaction.

A tree is a list of paths; a path is the rank chosen at each depth: `(0,)` is head 1's top
guess, `(0, 2)` head 2's third guess after it. Node 0 is the root, the base model's own next
token; a node at depth d holds head d's guess of that rank (the guesses of one head are shared
by every parent at that depth, as in Medusa). One forward verifies the whole tree: each node
sees the cached prefix, its ancestors and itself, at position prefix_len + depth.

Acceptance walks the tree against the base model's logits at each node's parent:
- greedy: accept a node iff it equals the parent's argmax; the result is exactly plain greedy.
- typical (Medusa): accept iff p(token) > min(ε, δ·exp(-H(p))), with p the parent's softmax at
  the sampling temperature, ε = 0.09, δ = 0.3.
The deepest accepted node wins; its path's KV entries are moved in place of the tree's.

Default trees and `tree_from_accuracies` choose the paths with the highest probability of being
accepted, assuming head guesses are right independently with the measured top-k accuracies.
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fxforge.errors import InputError

EPSILON = 0.09
DELTA = 0.3


@dataclass(frozen=True)
class MedusaTree:
    """A validated candidate tree. Build with `MedusaTree.from_paths(paths)`."""

    paths: tuple[tuple[int, ...], ...]   # non-root nodes in order (by depth, then ranks)
    parents: tuple[int, ...]             # parent node index of every node (root: -1)
    depths: tuple[int, ...]              # 0 for the root

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], num_heads: int | None = None) -> "MedusaTree":
        """Validate and order `paths`; every prefix of a path must itself be a path.

        Raises InputError naming the offending path when the list is inconsistent.
        """
        cleaned: list[tuple[int, ...]] = []
        for path in paths:
            p = tuple(path)
            if not p or any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in p):
                raise InputError(f"Medusa tree path {path!r} is invalid: a path is a non-empty sequence of "
                                 "non-negative integer ranks, one per depth, e.g. (0, 1).")
            cleaned.append(p)
        if not cleaned:
            raise InputError("a Medusa tree needs at least one path, e.g. [(0,), (0, 0)].")
        unique = set(cleaned)
        if len(unique) != len(cleaned):
            dupes = sorted({p for p in cleaned if cleaned.count(p) > 1})
            raise InputError(f"Medusa tree paths {dupes} are listed more than once.")
        for p in cleaned:
            if len(p) > 1 and p[:-1] not in unique:
                raise InputError(f"Medusa tree path {p} has no parent: its prefix {p[:-1]} is not in the path "
                                 "list. Every prefix of a path must also be a path.")
        depth = max(len(p) for p in cleaned)
        if num_heads is not None and depth > num_heads:
            raise InputError(f"the Medusa tree is {depth} levels deep but the model has {num_heads} heads; "
                             f"use paths of length <= {num_heads}.")
        ordered = sorted(cleaned, key=lambda p: (len(p), p))
        index = {p: i + 1 for i, p in enumerate(ordered)}
        parents = (-1,) + tuple(index.get(p[:-1], 0) for p in ordered)
        depths = (0,) + tuple(len(p) for p in ordered)
        return cls(paths=tuple(ordered), parents=parents, depths=depths)

    @property
    def num_nodes(self) -> int:
        """Tree tokens per forward, root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max(self.depths)

    def topk(self) -> list[int]:
        """How many guesses each head must provide (max rank + 1 at each depth)."""
        k = [0] * self.depth
        for p in self.paths:
            k[len(p) - 1] = max(k[len(p) - 1], p[-1] + 1)
        return k

    def attention_mask(self) -> torch.Tensor:
        """(N, N) bool: node i sees node j iff j is i or one of its ancestors."""
        return self._constants.mask.clone()

    def inputs(self, past_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids (1, N), tree mask (1, 1, N, past_len + N)) for one verification forward."""
        constants, n = self._constants, self.num_nodes
        # numpy: a third of the cost of the same two small torch ops, and this runs every step
        mask = np.ones((1, 1, n, past_len + n), dtype=bool)
        mask[0, 0, :, past_len:] = constants.mask.numpy()
        return torch.from_numpy(constants.depths_np[None, :] + past_len), torch.from_numpy(mask)

    def parent_index(self) -> torch.Tensor:
        """(N,) int64: each node's parent, -1 for the root (input of in-graph verification)."""
        return self._constants.parents

    def candidates(self, root_token: int, head_logits: torch.Tensor) -> torch.Tensor:
        """(N,) tree tokens: the root, then each node's head guess of its rank.

        head_logits: (K, V), every head's logits at the last accepted position.
        """
        if head_logits.shape[0] < self.depth:
            raise InputError(f"the tree is {self.depth} deep but only {head_logits.shape[0]} heads' logits "
                             "were given.")
        constants = self._constants
        top = head_logits[: self.depth].topk(constants.max_rank, dim=-1).indices.reshape(-1).tolist()
        # a few nodes: Python lists beat three small tensor ops, and this runs every step
        return torch.tensor([root_token] + [top[i] for i in constants.guess_index])

    @functools.cached_property
    def _constants(self) -> "_TreeConstants":
        # Computed once per tree: decoding asks for them every step.
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        max_rank = max(self.topk())
        heads = torch.tensor([len(p) - 1 for p in self.paths], dtype=torch.long)
        ranks = torch.tensor([p[-1] for p in self.paths], dtype=torch.long)
        return _TreeConstants(mask=mask, depths_np=np.asarray(self.depths, dtype=np.int64), max_rank=max_rank,
                              guess_index=(heads * max_rank + ranks).tolist(),
                              parents=torch.tensor(self.parents, dtype=torch.long))

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, inclusive."""
        chain = []
        while node >= 0:
            chain.append(node)
            node = self.parents[node]
        return chain[::-1]

    def leaves(self) -> list[int]:
        has_child = set(self.parents[1:])
        return [i for i in range(self.num_nodes) if i not in has_child]

    def candidate_paths(self, tree_tokens: torch.Tensor) -> list[list[int]]:
        """Every root-to-leaf token sequence (the candidates one forward verifies)."""
        return [[int(tree_tokens[i]) for i in self.path_to(leaf)] for leaf in self.leaves()]


@dataclass(frozen=True)
class _TreeConstants:
    mask: torch.Tensor         # (N, N) bool, ancestors and self
    depths_np: np.ndarray      # (N,) int64
    max_rank: int              # guesses taken from each head (its top-k)
    guess_index: list[int]     # index of each non-root node's guess in the flat (depth, k) top-k
    parents: torch.Tensor      # (N,) long, -1 for the root


@dataclass
class Acceptance:
    """The verification result: accepted node chain (root first) and the next root token."""

    path: list[int]
    next_token: int

    @property
    def accepted(self) -> int:
        """Head guesses accepted (the root is always emitted on top)."""
        return len(self.path) - 1


def _deepest(tree: MedusaTree, ok: list[bool], score: list[float] | None = None) -> int:
    best = 0
    for i in range(1, tree.num_nodes):
        if not ok[i]:
            continue
        deeper = tree.depths[i] > tree.depths[best]
        tie_better = score is not None and tree.depths[i] == tree.depths[best] and score[i] > score[best]
        if deeper or tie_better:
            best = i
    return best


def greedy_accept(tree: MedusaTree, tree_tokens: torch.Tensor, logits: torch.Tensor) -> Acceptance:
    """Accept the longest path whose every token is its parent's argmax. logits: (N, V)."""
    predicted = logits.argmax(dim=-1).tolist()
    tokens = tree_tokens.tolist()
    ok = [True] + [False] * (tree.num_nodes - 1)
    for i in range(1, tree.num_nodes):  # parents precede children
        parent = tree.parents[i]
        ok[i] = ok[parent] and tokens[i] == predicted[parent]
    best = _deepest(tree, ok)
    return Acceptance(path=tree.path_to(best), next_token=predicted[best])


def typical_accept(tree: MedusaTree, tree_tokens: torch.Tensor, logits: torch.Tensor, temperature: float,
                   epsilon: float = EPSILON, delta: float = DELTA,
                   generator: torch.Generator | None = None) -> Acceptance:
    """Typical acceptance: p(token) > min(ε, δ·exp(-H(p))) at every step of the path.

    The next root is sampled from the base distribution at the last accepted node.
    """
    if temperature <= 0:
        raise InputError("typical acceptance needs temperature > 0; use mode='greedy' for temperature 0.")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy)).tolist()
    tokens = tree_tokens.tolist()
    ok = [True] + [False] * (tree.num_nodes - 1)
    score = [0.0] * tree.num_nodes  # log-probability of the path, to break depth ties
    for i in range(1, tree.num_nodes):
        parent = tree.parents[i]
        p = float(probs[parent, tokens[i]])
        ok[i] = ok[parent] and p > threshold[parent]
        score[i] = score[parent] + math.log(max(p, 1e-30))
    best = _deepest(tree, ok, score)
    next_token = int(torch.multinomial(probs[best].float(), 1, generator=generator))
    return Acceptance(path=tree.path_to(best), next_token=next_token)


def compact_kv(present: Sequence[torch.Tensor], past_len: int, path: Sequence[int]) -> list[torch.Tensor]:
    """Keep the cached prefix and the accepted path's entries, in path order, drop the rest."""
    keep = np.concatenate([np.arange(past_len), past_len + np.asarray(path, dtype=np.int64)])
    if all(t.device.type == "cpu" and not t.requires_grad for t in present):
        # numpy's take costs half of index_select per call here, and this runs every step
        return [torch.from_numpy(np.take(t.numpy(), keep, axis=2)) for t in present]
    index = torch.from_numpy(keep)
    return [t.index_select(2, index.to(t.device)) for t in present]


# --------------------------------------------------------------------------- tree construction


# Assumed top-1 accuracy of heads 1.. (the paper's Vicuna-7B: head 1 ≈ 0.56, head 2 ≈ 0.32) and
# how fast the chance of rank r being right falls with r; used only when nothing is measured.
_ASSUMED_TOP1 = (0.56, 0.32, 0.22, 0.16, 0.12, 0.09, 0.07, 0.05)
_ASSUMED_RANK_DECAY = 0.45


def assumed_accuracies(num_heads: int, ranks: int = 16) -> list[list[float]]:
    """Per head, per rank: the probability that guess is right, by the assumed profile."""
    top1 = [_ASSUMED_TOP1[min(h, len(_ASSUMED_TOP1) - 1)] * (0.75 ** max(0, h - len(_ASSUMED_TOP1) + 1))
            for h in range(num_heads)]
    return [[a * _ASSUMED_RANK_DECAY ** r for r in range(ranks)] for a in top1]


def default_tree(num_heads: int, num_nodes: int | None = None) -> MedusaTree:
    """A Medusa-style sparse tree for `num_heads` heads: 63 nodes for 4+ heads, scaled down for fewer."""
    if num_heads < 1:
        raise InputError(f"a Medusa tree needs num_heads >= 1, got {num_heads}")
    if num_nodes is None:
        num_nodes = min(63, round(63 * num_heads / 4))
    return tree_from_accuracies(assumed_accuracies(num_heads), num_nodes)


def tree_from_accuracies(accuracies: Sequence[Sequence[float]], num_nodes: int) -> MedusaTree:
    """The `num_nodes`-path tree with the largest expected accepted length.

    accuracies[h][r]: measured probability that head h+1's rank-r guess is the right token
    (e.g. from `train_heads`' report: top-k accuracy differences). A path's probability is
    the product along it, so best-first expansion keeps every prefix before its extensions.
    """
    if num_nodes < 1:
        raise InputError(f"num_nodes must be >= 1, got {num_nodes}")
    if not accuracies or any(len(a) == 0 for a in accuracies):
        raise InputError("accuracies must give at least one rank's accuracy for each head")
    for h, row in enumerate(accuracies):
        if any(not 0.0 <= float(a) <= 1.0 for a in row):
            raise InputError(f"accuracies of head {h + 1} must lie in [0, 1], got {list(row)}")
    heap: list[tuple[float, tuple[int, ...]]] = [(-float(a), (r,)) for r, a in enumerate(accuracies[0])]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < num_nodes:
        neg_prob, path = heapq.heappop(heap)
        chosen.append(path)
        depth = len(path)
        if depth < len(accuracies):
            for r, a in enumerate(accuracies[depth]):
                heapq.heappush(heap, (neg_prob * float(a), path + (r,)))
    return MedusaTree.from_paths(chosen)


def expected_accept_length(tree: MedusaTree, accuracies: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step (root included) under independent per-rank accuracies."""
    total = 1.0
    for path in tree.paths:
        prob = 1.0
        for depth, rank in enumerate(path):
            row = accuracies[depth]
            prob *= float(row[rank]) if rank < len(row) else 0.0
        total += prob
    return total


__all__ = ["Acceptance", "DELTA", "EPSILON", "MedusaTree", "assumed_accuracies", "compact_kv", "default_tree",
           "expected_accept_length", "greedy_accept", "tree_from_accuracies", "typical_accept"]
