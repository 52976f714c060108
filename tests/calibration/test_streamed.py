"""Lazy weights: a safetensors directory compiled block by block equals the eager compile.

`hf.from_pretrained(lazy=True)` gives the model views of the mapped files; quantization (RTN,
data-free, and GPTQ, calibrated) then reads one block's weights at a time and writes each
block's codes to disk before the next (`calibration/streaming.py`). The codes must be the
eager compile's, bit for bit, and the bytes of tensors the process owns must stay near one
block's results (the spill store's counter; RSS would also count the page cache).
"""
import sys

import pytest
import torch

import fxforge
from fxforge.calibration import streaming
from fxforge.calibration.streaming import STREAMED, owned_bytes, streamed
from fxforge.errors import ModelDirectoryError
from fxforge.models.hf import from_pretrained
from fxforge.models.lazy_weights import is_mapped

LAYERS = 3
CODES = ("qweight", "scales", "qzeros")


def _save(directory, dtype, shard):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=LAYERS, vocab_size=256, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, max_shard_size="100KB" if shard else "2GB", safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("llama-fp32"), torch.float32, shard=True)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("llama-bf16"), torch.bfloat16, shard=False)


def _codes(compiled):
    return {name: t for name, t in compiled.graph_module.named_buffers() if name.rsplit(".", 1)[-1] in CODES}


def _batches(vocab, count=3, seq=12):
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, vocab, (1, seq), generator=generator),
             "attention_mask": torch.ones(1, seq, dtype=torch.long)} for _ in range(count)]


def _block_bytes(model):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers.0." in n)


def test_lazy_model_is_views_of_the_files(fp32_dir):
    eager, lazy = from_pretrained(fp32_dir), from_pretrained(fp32_dir, lazy=True)
    assert list((fp32_dir).glob("*.index.json")), "the fixture must exercise a sharded directory"
    assert all(is_mapped(p) for p in lazy.model.parameters())
    assert not any(is_mapped(p) for p in eager.model.parameters())
    with torch.no_grad():
        assert torch.equal(eager.model(**eager.kwargs).logits, lazy.model(**lazy.kwargs).logits)


def test_lazy_refuses_a_cast(bf16_dir):
    with pytest.raises(ModelDirectoryError, match="lazy=False"):
        from_pretrained(bf16_dir, dtype="float32", lazy=True)


@pytest.mark.parametrize("passes,calibrated", [("quantize(bits=4,group_size=32)", False),
                                               ("quantize(bits=4,group_size=32,method=gptq)", True)])
def test_streamed_quantize_equals_eager(fp32_dir, passes, calibrated, monkeypatch):
    monkeypatch.setattr(streaming, "SPILL_MIN_BYTES", 0)  # this model's tensors are all below the default
    trims = []
    monkeypatch.setattr(streaming, "release_free_heap", lambda: trims.append(1))
    eager, lazy = from_pretrained(fp32_dir), from_pretrained(fp32_dir, lazy=True)
    calibration = _batches(256) if calibrated else None
    expected = fxforge.compile(eager.model, eager.args, eager.kwargs, passes=passes, calibration=calibration)
    got = fxforge.compile(lazy.model, lazy.args, lazy.kwargs, passes=passes, calibration=calibration)
    want, have = _codes(expected), _codes(got)
    # each layer's 7 linears and the LM head (quantized by default), 3 tensors each
    assert len(want) == 3 * (7 * LAYERS + 1) and want.keys() == have.keys()
    for name in want:
        assert torch.equal(want[name], have[name]), name
    store = streamed(got.graph_module)
    assert store is not None and STREAMED not in expected.graph_module.meta
    # every block's codes went to disk: the compiled graph owns almost nothing, the eager one all codes
    codes_bytes = sum(t.numel() * t.element_size() for t in want.values())
    assert store.spilled_bytes >= codes_bytes
    assert all(is_mapped(t) for t in have.values())
    assert owned_bytes(got.graph_module) < codes_bytes / LAYERS
    assert owned_bytes(expected.graph_module) >= codes_bytes
    # the most owned at once: one block's results (plus small tensors), never all blocks'
    assert store.peak_owned_bytes <= 1.5 * codes_bytes / LAYERS, (store.peak_owned_bytes, codes_bytes)
    assert store.peak_owned_bytes < _block_bytes(eager.model)
    assert len(trims) >= LAYERS  # the heap is trimmed after every block (test below: what that gives back)
    x = expected.example_inputs
    assert torch.equal(expected.run_flat(*x)[0], got.run_flat(*x)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and malloc_trim are Linux/glibc")
def test_release_free_heap_gives_freed_heap_memory_back():
    """Freed small tensors below a live one stay resident until the heap is trimmed."""
    def anon_bytes():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon"))

    chunks = [torch.ones(16 * 1024) for _ in range(1000)]  # 64 KiB each: from the heap, not mmap
    keep = chunks[-1]
    del chunks
    before = anon_bytes()
    streaming.release_free_heap()
    assert before - anon_bytes() >= 32 * 2**20 and keep.sum() == 16 * 1024


def _greedy(compiled, ids, steps):
    """Greedy decoding by re-running the whole (uncached) graph: what "the result decodes" needs."""
    for _ in range(steps):
        logits = compiled(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_streamed_bf16_gptq_to_onnx_decodes(bf16_dir):
    """bf16 directory -> GPTQ int4 -> ONNX, streamed (the bench's 1.1B path on a small model):
    compile checks ONNX against the eager graph, and greedy decoding runs on the result."""
    pytest.importorskip("onnxruntime")
    pretrained = from_pretrained(bf16_dir, lazy=True)
    assert pretrained.dtype == torch.bfloat16
    compiled = fxforge.compile(pretrained.model, pretrained.args, pretrained.kwargs,
                               passes="quantize(bits=4,group_size=32,method=gptq)", backend="onnx",
                               calibration=_batches(256))
    assert streamed(compiled.graph_module) is not None and len(_codes(compiled)) == 3 * (7 * LAYERS + 1)  # each layer's 7 linears and the LM head (quantized by default)
    assert "backend onnx" in str(compiled.report) and "vs eager" in str(compiled.report)
    prompt = pretrained.kwargs["input_ids"][:1, :6]
    tokens = _greedy(compiled, prompt, 4)
    assert tokens.shape == (1, 10) and torch.equal(tokens[:, :6], prompt)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256
