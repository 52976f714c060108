"""KV-cached decoding runtime: greedy loop == uncached greedy, prefill/step shapes, errors."""
import pytest
import torch

from fxforge.errors import InputError
from fxforge.passes.add_kv_cache import AddKvCache
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.runtime.decoding import CachedLM, as_prompt, example_cached_inputs, greedy_generate
from runtime.fused_code_lm import example_ids, fused_graph


@pytest.fixture(scope="module")
def graphs():
    gm, ids = fused_graph()
    return gm, run_pass(AddKvCache(), gm, PassContext(example_inputs=(ids,)))


def _uncached_greedy(gm, prompt, n):
    ids = prompt[None]
    for _ in range(n):
        nxt = gm(ids)[0][0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, prompt.numel():].tolist()


def test_greedy_generate_matches_recomputing_the_whole_sequence(graphs):
    gm, cached = graphs
    lm = CachedLM.prepare(cached, "eager")
    assert lm.num_heads == 0
    for prompt in example_ids(batch=3, seq=6):
        result = greedy_generate(lm, prompt, 10)
        assert result.tokens == _uncached_greedy(gm, prompt, 10)
        assert result.forwards == 10 and result.mean_accepted == 1.0
        assert result.tokens_per_second > 0


def test_forward_shapes_prefill_then_step(graphs):
    _, cached = graphs
    lm = CachedLM(cached, cached)
    out = lm.forward(torch.tensor([[1, 2, 3]]), lm.empty_past(1), 0)
    assert out.logits.shape[:2] == (1, 3) and out.head_logits is None
    assert [t.shape for t in out.present] == [(1, 2, 3, 16)] * 4
    step = lm.forward(torch.tensor([[4]]), out.present, 3)
    assert step.present[0].shape == (1, 2, 4, 16)


def test_example_inputs_keep_cache_dimensions_distinct(graphs):
    _, cached = graphs
    flat = example_cached_inputs(cached)
    ids, positions, mask, k0 = flat[0], flat[1], flat[2], flat[3]
    assert ids.shape == (2, 4) and positions.tolist()[0] == [3, 4, 5, 6]
    assert mask.shape == (2, 1, 4, 7) and k0.shape == (2, 2, 3, 16)


def test_errors(graphs):
    gm, cached = graphs
    with pytest.raises(InputError, match="add_kv_cache"):
        CachedLM(gm, gm)
    with pytest.raises(InputError, match="one non-empty sequence"):
        as_prompt(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="max_new_tokens"):
        greedy_generate(CachedLM(cached, cached), [1, 2], 0)
