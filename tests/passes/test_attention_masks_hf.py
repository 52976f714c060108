"""transformers' own causal masks (masking_utils, no attention_mask given) are proved causal.

Llama, Qwen2 and Mistral build the mask from position_ids gathered with `index`, `le`, a
packed-sequence check (cumsum of diff(position_ids) != 1, compared for equality) and `where`
with the dtype's min. fuse_attention must read all of it, drop the mask and set is_causal, so
the ONNX backend can use GroupQueryAttention. A real attention_mask input or a sliding window
must still keep the mask.

Tracing a model costs 5-10 s on the shared CI machine, so CI runs Llama (causal, padded, ONNX);
FXFORGE_SWEEP=all adds Qwen2, Mistral and Mistral with a sliding window. The mask analyser's own
tests (test_attention_masks.py) cover transformers' mask builder for all of them in under a second.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn
from torch.export import Dim

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import INPUT_NAMES, trace
from fxforge.ir.verify import run_graph
from fxforge.passes.attention.fuse_attention import FuseAttention
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass

ATTENTION = torch.ops.fxforge.attention.default
VOCAB, LAYERS = 128, 2
SWEEP = pytest.mark.skipif(os.environ.get("FXFORGE_SWEEP") != "all", reason="full sweep only: set FXFORGE_SWEEP=all")


def _model(arch: str, sliding_window: int | None = None) -> nn.Module:
    import transformers as T

    config_class, model_class = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                                 "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                                 "mistral": (T.MistralConfig, T.MistralForCausalLM)}[arch]
    extra = {"sliding_window": sliding_window} if arch == "mistral" else {}
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          attn_implementation="eager", use_cache=False, **extra)
    return model_class(config).eval()


def _inputs(seq: int, with_mask: bool, padded: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq))
    if not with_mask:
        return {"input_ids": ids}
    mask = torch.ones(2, seq, dtype=torch.long)
    if padded:
        mask[-1, : seq // 3] = 0  # last row left-padded
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def _fused(arch: str, with_mask: bool = False, sliding_window: int | None = None):
    """(model, fused graph, flatten) for the tiny model traced with dynamic batch and length."""
    model = _model(arch, sliding_window)
    example = _inputs(8, with_mask)
    dims = {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)}
    gm = trace(model, (), example, dynamic_shapes={name: dims for name in example})
    canonicalize(gm)
    names = gm.meta[INPUT_NAMES]

    def flat(inputs):
        return tuple(inputs[n] for n in names)

    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=flat(example)))
    return model, fused, flat


def _attention_nodes(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == ATTENTION]


def _assert_matches_eager(arch: str, with_mask: bool, padded: bool, sliding_window: int | None = None) -> None:
    model, fused, flat = _fused(arch, with_mask, sliding_window)
    for seq in (11,):  # not the traced length 8: the dynamic-length graph
        inputs = _inputs(seq, with_mask, padded)
        with torch.no_grad():
            want = model(**inputs).logits
        (got,) = run_graph(fused, flat(inputs))[:1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=[SWEEP, pytest.mark.slow]),
                                  pytest.param("mistral", marks=[SWEEP, pytest.mark.slow])])
def test_masking_utils_causal_mask_is_proved_causal(arch):
    _, fused, _ = _fused(arch)
    nodes = _attention_nodes(fused)
    assert len(nodes) == LAYERS
    for node in nodes:
        q, k, v, mask, is_causal = node.args[:5]
        assert mask is None and is_causal is True, node.format_node()
    assert not any(n.target == torch.ops.aten.where.ScalarOther for n in fused.graph.nodes), \
        "the dropped mask's construction should be dead code"
    _assert_matches_eager(arch, with_mask=False, padded=False)


def test_padding_mask_from_attention_mask_is_kept():
    _, fused, _ = _fused("llama", with_mask=True)
    nodes = _attention_nodes(fused)
    assert len(nodes) == LAYERS
    assert all(n.args[3] is not None and n.args[4] is False for n in nodes)
    _assert_matches_eager("llama", with_mask=True, padded=True)


@SWEEP
@pytest.mark.slow
def test_sliding_window_mask_is_kept():
    # window 3 < the test lengths: the band's lower edge hides keys, so it is not the causal triangle
    _, fused, _ = _fused("mistral", sliding_window=3)
    nodes = _attention_nodes(fused)
    assert len(nodes) == LAYERS
    assert all(n.args[3] is not None and n.args[4] is False for n in nodes)
    _assert_matches_eager("mistral", with_mask=False, padded=False, sliding_window=3)


def test_fused_llama_exports_group_query_attention(tmp_path):
    import onnx
    import onnxruntime as ort

    from fxforge.backends.onnx.backend import export_onnx

    model, fused, flat = _fused("llama")
    path = export_onnx(fused, flat(_inputs(8, False)), tmp_path / "llama.onnx", input_names=["input_ids"])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS, sorted(set(ops))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq in (6, 13):
        ids = _inputs(seq, False)["input_ids"]
        got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
        with torch.no_grad():
            want = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
