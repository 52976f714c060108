"""Verification of passes on streamed graphs, block by block (fxforge/passes/streamed_verification.py).

A tiny Llama saved as safetensors and loaded lazily: compile with verify=True must check every
pass while giving the mapped pages back after each block, measure the same loss as the
whole-graph check of the same model held in memory, and roll back a rewrite that breaks one
block, naming that block.
"""
import dataclasses

import pytest
import torch

import fxforge
import fxforge.passes.quantize as quantize_module
from fxforge.errors import PassError
from fxforge.ir.verify import run_graph
from fxforge.models.hf import from_pretrained
from fxforge.passes import streamed_verification
from fxforge.passes.streamed_verification import run_by_block

LAYERS = 3
PASSES = "quantize(bits=4,group_size=32,method=gptq)"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama-verify")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=LAYERS, vocab_size=256, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def _batches(count=3, seq=12):
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 256, (1, seq), generator=generator),
             "attention_mask": torch.ones(1, seq, dtype=torch.long)} for _ in range(count)]


def _record(compiled):
    return compiled.report["quantize"]


def test_block_by_block_run_equals_the_graph_and_gives_pages_back(llama_dir, monkeypatch):
    lazy = from_pretrained(llama_dir, lazy=True)
    compiled = fxforge.compile(lazy.model, lazy.args, lazy.kwargs, verify=False)
    gm, inputs = compiled.graph_module, compiled.example_inputs
    drops = []
    monkeypatch.setattr(streamed_verification, "drop_all_pages", lambda: drops.append(1))
    outputs, leaving = run_by_block(gm, inputs, keep_block_outputs=True)
    assert torch.equal(outputs[0], run_graph(gm, inputs)[0])
    names = [name for name, _ in leaving]
    assert names == ["prologue"] + [f"model.layers.{i}" for i in range(LAYERS)] + ["epilogue"]
    assert len(drops) == len(names)  # every segment's pages are given back before the next runs


def test_streamed_verification_measures_the_whole_graph_loss(llama_dir):
    eager, lazy = from_pretrained(llama_dir), from_pretrained(llama_dir, lazy=True)
    calibration = _batches()
    whole = fxforge.compile(eager.model, eager.args, eager.kwargs, passes=PASSES, calibration=calibration)
    streamed = fxforge.compile(lazy.model, lazy.args, lazy.kwargs, passes=PASSES, calibration=calibration)
    want, have = _record(whole), _record(streamed)
    assert "block by block" in have.verification_note and "block by block" not in want.verification_note
    assert have.verified_against == "semantics" and len(have.loss) == len(want.loss) == 1
    assert have.loss[0].rel_l2 > 0  # int4 is lossy: a loss was measured, not skipped
    assert have.loss[0].rel_l2 == pytest.approx(want.loss[0].rel_l2, rel=1e-4)
    assert have.check_error <= 1e-4


@pytest.mark.parametrize("broken", [1])  # the middle block: neither the first nor the last
def test_a_broken_block_is_rolled_back_and_named(llama_dir, monkeypatch, broken):
    """The rewrite of block `broken` emits scales twice what GPTQ chose (the claim keeps the right
    ones): verification must fail, name that block, and leave the user's model as it was."""
    emit = quantize_module.emit_weight_only

    def emit_wrong_in_one_block(gm, site, matrix, spec, group_axis):
        if f".layers.{broken}." in site.module_path:
            matrix = dataclasses.replace(matrix, scales=matrix.scales * 2)
        return emit(gm, site, matrix, spec, group_axis)

    monkeypatch.setattr(quantize_module, "emit_weight_only", emit_wrong_in_one_block)
    lazy = from_pretrained(llama_dir, lazy=True)
    state = {k: v.clone() for k, v in lazy.model.state_dict().items()}
    with pytest.raises(PassError, match=rf"first in block 'model\.layers\.{broken}' and was rolled back") as info:
        fxforge.compile(lazy.model, lazy.args, lazy.kwargs, passes=PASSES, calibration=_batches())
    assert info.value.node == f"model.layers.{broken}"
    assert all(torch.equal(v, lazy.model.state_dict()[k]) for k, v in state.items())
