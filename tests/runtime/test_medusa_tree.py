"""Medusa candidate trees: structure, mask, positions, candidates, acceptance, KV compaction, builders."""
import itertools
import math

import pytest
import torch

from fxforge.errors import InputError
from fxforge.runtime.medusa_tree import (
    DELTA, EPSILON, MedusaTree, assumed_accuracies, compact_kv, default_tree, expected_accept_length,
    greedy_accept, tree_from_accuracies, typical_accept,
)

PATHS = [(1,), (0,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


def test_from_paths_orders_by_depth_and_links_parents():
    tree = MedusaTree.from_paths(PATHS)
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 3)
    assert tree.depths == (0, 1, 1, 2, 2, 2, 3)
    assert tree.num_nodes == 7 and tree.depth == 3
    assert tree.topk() == [2, 2, 1]
    assert tree.path_to(6) == [0, 1, 3, 6]
    assert tree.leaves() == [4, 5, 6]


@pytest.mark.parametrize("paths, words", [
    ([(0,), (0, 1, 0)], "prefix (0, 1) is not in the path list"),
    ([(0,), (0,)], "more than once"),
    ([(0,), (-1,)], "non-negative integer ranks"),
    ([()], "non-empty"),
    ([], "at least one path"),
])
def test_inconsistent_paths_are_refused_with_the_reason(paths, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        MedusaTree.from_paths(paths)


def test_tree_deeper_than_heads_is_refused():
    with pytest.raises(InputError, match="3 levels deep but the model has 2 heads"):
        MedusaTree.from_paths(PATHS, num_heads=2)


def test_attention_mask_is_ancestors_and_self():
    tree = MedusaTree.from_paths(PATHS)
    mask = tree.attention_mask()
    for i, j in itertools.product(range(tree.num_nodes), repeat=2):
        assert bool(mask[i, j]) == (j in tree.path_to(i)), (i, j)
    # ancestors come first, so the tree mask never exceeds the causal triangle
    assert not mask.triu(1).any()


def test_inputs_positions_are_prefix_plus_depth_and_past_fully_visible():
    tree = MedusaTree.from_paths(PATHS)
    positions, mask = tree.inputs(past_len=5)
    assert positions.tolist() == [[5, 6, 6, 7, 7, 7, 8]]
    assert mask.shape == (1, 1, 7, 12) and mask.dtype == torch.bool
    assert mask[0, 0, :, :5].all()
    assert torch.equal(mask[0, 0, :, 5:], tree.attention_mask())


def test_candidates_take_each_heads_ranked_guess():
    tree = MedusaTree.from_paths(PATHS)
    vocab = 10
    heads = torch.zeros(3, vocab)
    heads[0, 7], heads[0, 3] = 5.0, 4.0      # head 1: top-1 = 7, top-2 = 3
    heads[1, 2], heads[1, 9] = 5.0, 4.0      # head 2: 2, 9
    heads[2, 4] = 5.0                         # head 3: 4
    tokens = tree.candidates(root_token=1, head_logits=heads)
    assert tokens.tolist() == [1, 7, 3, 2, 9, 2, 4]
    assert tree.candidate_paths(tokens) == [[1, 7, 9], [1, 3, 2], [1, 7, 2, 4]]


def _logits_predicting(next_of: dict[int, int], n: int, vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(n, vocab)
    for node, token in next_of.items():
        logits[node, token] = 3.0
    return logits


def test_greedy_accept_follows_argmax_chain_and_returns_bonus_token():
    tree = MedusaTree.from_paths(PATHS)
    tokens = torch.tensor([1, 7, 3, 2, 9, 2, 4])
    # base argmax: after root -> 7 (node 1), after node 1 -> 9 (node 4), after node 4 -> 5
    logits = _logits_predicting({0: 7, 1: 9, 4: 5, 2: 0, 3: 0, 5: 0, 6: 0}, 7)
    result = greedy_accept(tree, tokens, logits)
    assert result.path == [0, 1, 4] and result.accepted == 2 and result.next_token == 5
    # nothing matches: only the root is emitted, the bonus is the root's argmax
    result = greedy_accept(tree, tokens, _logits_predicting({0: 8}, 7))
    assert result.path == [0] and result.next_token == 8


def test_typical_accept_uses_min_epsilon_delta_exp_entropy():
    tree = MedusaTree.from_paths([(0,), (1,)])
    tokens = torch.tensor([0, 1, 2])
    vocab = 4
    # Root distribution: p(1) = 0.05, p(2) = 0.15, rest split evenly.
    probs = torch.tensor([0.4, 0.05, 0.15, 0.4])
    entropy = float(-(probs * probs.log()).sum())
    threshold = min(EPSILON, DELTA * math.exp(-entropy))
    assert 0.05 < threshold < 0.15  # so node 1 (p=0.05) fails and node 2 (p=0.15) passes
    logits = torch.zeros(3, vocab)
    logits[0] = probs.log()
    result = typical_accept(tree, tokens, logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert result.path == [0, 2]
    with pytest.raises(InputError, match="temperature > 0"):
        typical_accept(tree, tokens, logits, temperature=0.0)


def test_compact_kv_keeps_prefix_then_path_entries_in_order():
    past_len, n = 3, 5
    present = [torch.arange(past_len + n, dtype=torch.float32).reshape(1, 1, -1, 1).expand(1, 2, -1, 4)]
    out = compact_kv(present, past_len, [0, 2, 4])
    assert out[0].shape == (1, 2, 6, 4)
    assert out[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 7]


def test_tree_from_accuracies_is_prefix_closed_and_beats_other_trees():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.15, 0.05], [0.3, 0.1, 0.05]]
    tree = tree_from_accuracies(acc, num_nodes=8)
    assert len(tree.paths) == 8
    assert all(p[:-1] in tree.paths for p in tree.paths if len(p) > 1)
    best = expected_accept_length(tree, acc)
    # no other prefix-closed 8-path tree over these ranks does better (a few hand-made rivals)
    chain = MedusaTree.from_paths([(0,), (0, 0), (0, 0, 0), (1,), (2,), (1, 0), (0, 1), (0, 2)])
    wide = MedusaTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1)])
    assert best >= expected_accept_length(chain, acc) - 1e-12
    assert best >= expected_accept_length(wide, acc) - 1e-12
    # expected length = 1 + Σ path probabilities
    assert math.isclose(expected_accept_length(MedusaTree.from_paths([(0,), (0, 0)]), acc), 1 + 0.6 + 0.6 * 0.4)


def test_default_tree_sizes_scale_with_heads():
    assert default_tree(4).num_nodes == 64  # 63 paths + the root
    assert default_tree(5).num_nodes == 64
    assert default_tree(1).depth == 1 and default_tree(1).num_nodes == 17
    assert default_tree(2).depth == 2
    assert len(assumed_accuracies(3)) == 3
    with pytest.raises(InputError, match="num_heads >= 1"):
        default_tree(0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        tree_from_accuracies([[1.5]], 3)
