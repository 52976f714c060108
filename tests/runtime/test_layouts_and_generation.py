"""KVCacheLayout (typed, checked plain data) and the generation loop, without any model export."""
import pytest
import torch

from fxforge.errors import InputError
from fxforge.runtime.generation import (
    SamplingOptions, generate_tokens, layout_empty_past, layout_step, padded_tree_mask,
)
from fxforge.runtime.layouts import KVCacheLayout, decoder_input_names, decoder_output_names


def _layout(**changes):
    fields = dict(input_ids=0, position_ids=2, mask=1, mask_kind="padding", past=((3, 4),), present=((1, 2),),
                  logits_output=0, kv_shapes=((2, 4, 4),), dtype="float32", attention="fused",
                  num_inputs=5, num_outputs=3)
    return KVCacheLayout(**{**fields, **changes})


def test_layout_round_trips_through_json_and_rejects_bad_fields():
    layout = _layout()
    assert KVCacheLayout.from_json(layout.to_json()) == layout
    data = layout.to_json()
    assert data["past"] == [[3, 4]]  # plain lists, JSON-ready
    for field, value, message in [("past", [[3, "4"]], r"past\[0\]"), ("dtype", "int8", "dtype"),
                                  ("mask_kind", "causal", "mask_kind"), ("num_inputs", 4, "below num_inputs"),
                                  ("kv_shapes", [[2, 4]], r"kv_shapes\[0\]")]:
        with pytest.raises(ValueError, match=message):
            KVCacheLayout.from_json({**data, field: value})
    with pytest.raises(ValueError, match="fields"):
        KVCacheLayout.from_json({**data, "extra": 1})


def test_conventional_names():
    assert decoder_input_names(1) == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                      "past_key_values.0.value"]
    assert decoder_output_names(2)[-1] == "present.1.value"


def test_padded_tree_mask_is_causal_over_real_keys_and_never_empty():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    tree = padded_tree_mask(mask, new_len=2)  # queries at key positions 2 and 3
    assert tree.shape == (2, 1, 2, 4)
    assert tree[0, 0].tolist() == [[False, False, True, False], [False, False, True, True]]
    assert tree[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    pad_query = padded_tree_mask(torch.tensor([[0, 0, 1]]), new_len=3)[0, 0]
    assert pad_query[0].tolist() == [True, False, False]  # a padding query sees itself only


class _CountingLM:
    """A fake decoder: logits favour (last real token + 1) mod V; checks what the loop feeds it."""

    vocab = 11

    def __init__(self):
        self.calls = []

    def __call__(self, ids, mask, positions, past):
        self.calls.append((ids.clone(), mask.clone(), positions.clone()))
        assert mask.shape[1] == past[0].shape[2] + ids.shape[1]
        logits = torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float()
        present = [torch.cat([p, torch.zeros(p.shape[0], p.shape[1], ids.shape[1], p.shape[3])], 2) for p in past]
        return logits, present


def _empty(batch):
    return [torch.zeros(batch, 1, 0, 2), torch.zeros(batch, 1, 0, 2)]


def test_loop_left_padding_positions_eos_and_pad():
    lm = _CountingLM()
    ids = torch.tensor([[0, 0, 3], [5, 6, 7]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    out = generate_tokens(lm, _empty, ids, mask, max_new_tokens=5, eos_token_id=9, pad_token_id=0)
    assert out[0, 3:].tolist() == [4, 5, 6, 7, 8]
    assert out[1, 3:].tolist() == [8, 9, 0, 0, 0]  # eos at 9, then padding
    _, _, prefill_positions = lm.calls[0]
    assert prefill_positions.tolist() == [[1, 1, 0], [0, 1, 2]]  # HF's: cumsum - 1, padding 1
    _, step_mask, step_positions = lm.calls[1]
    assert step_positions.tolist() == [[1], [3]] and step_mask.shape == (2, 4)


def test_loop_stops_when_every_row_is_finished_and_refuses_bad_input():
    out = generate_tokens(_CountingLM(), _empty, torch.tensor([[7]]), max_new_tokens=10, eos_token_id=9)
    assert out.tolist() == [[7, 8, 9]]
    with pytest.raises(InputError, match="left padding"):
        generate_tokens(_CountingLM(), _empty, torch.tensor([[1, 2]]), torch.tensor([[1, 0]]), max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate_tokens(_CountingLM(), _empty, torch.tensor([[1]]), max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        SamplingOptions(do_sample=True, temperature=0.0)


def test_sampling_respects_top_k_and_seed():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    draws = {int(SamplingOptions(True, temperature=5.0, top_k=2, seed=s).chooser()(logits)[0]) for s in range(40)}
    assert draws == {1, 2}
    a = SamplingOptions(True, seed=7).chooser()
    b = SamplingOptions(True, seed=7).chooser()
    assert [int(a(logits)[0]) for _ in range(10)] == [int(b(logits)[0]) for _ in range(10)]


def test_layout_step_places_inputs_where_the_layout_says():
    layout = _layout()
    seen = {}

    def run(*flat):
        seen["flat"] = flat
        return (torch.zeros(1, 1, 3), flat[3], flat[4])

    step = layout_step(layout, run)
    past = layout_empty_past(layout)(1)
    assert past[0].shape == (1, 2, 0, 4)
    ids, mask, positions = torch.tensor([[5]]), torch.tensor([[1]]), torch.tensor([[0]])
    logits, present = step(ids, mask, positions, past)
    assert seen["flat"][0] is ids and seen["flat"][1] is mask and seen["flat"][2] is positions
    assert present[0] is past[0] and logits.shape == (1, 1, 3)
    tree = layout_step(_layout(mask_kind="tree"), run)
    tree(ids, mask, positions, past)
    assert seen["flat"][1].dtype == torch.bool and seen["flat"][1].shape == (1, 1, 1, 1)


def test_a_batch_one_example_is_widened_for_the_decoder_task():
    from fxforge.text_generation import dynamic_batch_example, with_passes

    kwargs, note = dynamic_batch_example({"input_ids": torch.tensor([[4, 5, 6]]), "use_cache": False})
    assert kwargs["input_ids"].tolist() == [[4, 5, 6], [4, 5, 6]] and kwargs["use_cache"] is False
    assert "batch stays dynamic" in note
    two = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert dynamic_batch_example(two) == (two, None)
    task = ("fuse_attention", "add_kv_cache(attention_mask=True)")
    assert with_passes("quantize(bits=4)", task) == "quantize(bits=4),fuse_attention,add_kv_cache(attention_mask=True)"
    assert with_passes("fuse_attention", task) == "fuse_attention,add_kv_cache(attention_mask=True)"
