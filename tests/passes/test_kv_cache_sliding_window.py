"""add_kv_cache on sliding-window attention: the cached graph keeps each layer's window.

The graphs are traced on 3 tokens, shorter than the window (4), as the pass's own verification
sees them; decoding then runs past the window, where a plain causal tree mask would let a layer
attend to keys its model never sees (issue 18).
"""
import functools

import pytest
import torch

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.ops import get_op
from fxforge.ir.trace import trace
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline
from fxforge.runtime.cache_inputs import cached_inputs, empty_past
from fxforge.runtime.meta_keys import KV_META

WINDOW, TRACED, DECODED = 4, 3, 10
aten = torch.ops.aten


def _mistral(attn_implementation: str):
    import transformers

    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, use_cache=False, attn_implementation=attn_implementation)
    return transformers.MistralForCausalLM(config)


def _gpt_neo():
    import transformers

    # layer 0 global, layer 1 local: its buffer mask is tril(ones) ^ tril(ones, -window_size)
    config = transformers.GPTNeoConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, window_size=WINDOW,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=32, use_cache=False,
        bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoForCausalLM(config)


MODELS = {"mistral": lambda: _mistral("sdpa"), "mistral_eager": lambda: _mistral("eager"), "gpt_neo": _gpt_neo}
CASES = [("mistral", "fuse_attention,add_kv_cache"), ("mistral_eager", "add_kv_cache"),
         ("gpt_neo", "add_kv_cache"), ("gpt_neo", "fuse_attention,add_kv_cache"),
         ("mistral", "fuse_attention,add_kv_cache(attention_mask=True)")]


@functools.lru_cache(maxsize=None)
def _traced(name: str):
    """(model, canonical graph traced on TRACED tokens, DECODED token ids), once per model (the
    pipelines leave their input graph unchanged)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(0, 64, (2, DECODED))
    gm = trace(model, (ids[:, :TRACED],))
    canonicalize(gm)
    return model, gm, ids


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def cached(request):
    """(model name, model, cached graph, token ids) for one model and pipeline."""
    name, passes = request.param
    model, gm, ids = _traced(name)
    cached_gm, _report = Pipeline(passes).run(gm, PassContext(example_inputs=(ids[:, :TRACED],)))
    return name, model, cached_gm, ids


def test_token_by_token_decoding_past_the_window_matches_the_uncached_model(cached):
    _name, model, gm, ids = cached
    meta = gm.meta[KV_META]
    past, steps = empty_past(meta, ids.shape[0], torch.float32), []
    for i in range(ids.shape[1]):
        out = gm(*cached_inputs(meta, ids[:, i:i + 1], i, past))
        steps.append(out[0])
        past = [out[j] for pair in meta.present for j in pair]
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=1e-5)


def test_a_prefill_longer_than_the_window_then_a_step_matches(cached):
    _name, model, gm, ids = cached
    meta = gm.meta[KV_META]
    prefill = gm(*cached_inputs(meta, ids[:, :7], 0, empty_past(meta, ids.shape[0], torch.float32)))
    past = [prefill[j] for pair in meta.present for j in pair]
    step = gm(*cached_inputs(meta, ids[:, 7:], 7, past))
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(torch.cat([prefill[0], step[0]], 1), want, atol=1e-5, rtol=1e-5)


def test_only_the_window_layers_read_a_narrowed_mask_built_once(cached):
    name, _model, gm, _ids = cached
    narrowed = [n for n in gm.graph.nodes if n.target == aten.lt.Scalar and n.args[1] == WINDOW]
    assert len(narrowed) == 1  # one mask per window width, shared by the layers with that window
    (mask,) = narrowed[0].users
    attention = get_op("attention").overload
    fused = [n for n in gm.graph.nodes if n.target == attention]
    if fused:  # Mistral: every layer slides; GPT-Neo: layer 1 (local) only
        assert [n.args[3] is mask for n in fused] == ([False, True] if name == "gpt_neo" else [True, True])


def test_a_left_padded_row_counts_its_window_in_columns_as_transformers_does():
    # generation feeds tree-mask graphs real positions (the padding mask's cumsum) for padded rows;
    # the window still counts columns there, as transformers' cache positions do
    from fxforge.runtime.generation import padded_tree_mask

    model, gm, ids = _traced("mistral")
    mask = torch.ones(2, DECODED, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded by 3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for passes in ("fuse_attention,add_kv_cache", "fuse_attention,add_kv_cache(attention_mask=True)"):
        cached_gm, _ = Pipeline(passes).run(gm, PassContext(example_inputs=(ids[:, :TRACED],)))
        meta = cached_gm.meta[KV_META]

        def masks(upto, new):
            return {"attention_mask": mask[:, :upto]} if meta.padding_mask else \
                {"tree_mask": padded_tree_mask(mask[:, :upto], new)}

        out = cached_gm(*cached_inputs(meta, ids[:, :7], 0, empty_past(meta, 2, torch.float32), positions[:, :7],
                                       **masks(7, 7)))
        past = [out[j] for pair in meta.present for j in pair]
        step = cached_gm(*cached_inputs(meta, ids[:, 7:], 7, past, positions[:, 7:], **masks(DECODED, 3)))
        with torch.no_grad():
            want = model(ids, attention_mask=mask, position_ids=positions).logits
        got = torch.cat([out[0], step[0]], 1)
        torch.testing.assert_close(got[:, 3:], want[:, 3:], atol=1e-5, rtol=1e-5)  # the padded row's real tokens


def _llama4_chunked():
    import transformers

    # every layer chunked (no_rope_layers all 1 = rope + chunked attention), chunks of WINDOW tokens
    config = transformers.Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=WINDOW,
        num_local_experts=2, use_cache=False, attn_implementation="eager")
    return transformers.Llama4ForCausalLM(config)


@pytest.mark.parametrize("passes", ["add_kv_cache", "fuse_attention,add_kv_cache"])
def test_chunked_attention_is_refused_by_name_not_cached_wrongly(passes):
    """Llama 4's chunked mask (floor(i / c) == floor(j / c)) is not a band the analyser proves; the
    cache's tree mask would drop the chunk boundaries, so add_kv_cache refuses it by name."""
    from fxforge.errors import PassError

    MODELS["llama4_chunked"] = _llama4_chunked
    _model, gm, ids = _traced("llama4_chunked")
    with pytest.raises(PassError, match="chunked attention"):
        Pipeline(passes).run(gm, PassContext(example_inputs=(ids[:, :TRACED],)))
