"""The decoder artifact (`fxforge compile DIR --task text-generation-with-past`) on saved HF dirs.

Each artifact is decoded by a plain ONNX Runtime loop written here against the conventional
names only (no fxforge code), and must give exactly the tokens of transformers' greedy
`generate` — alone and in a left-padded batch of prompts of different lengths. The int4
artifact must decode too, and `fxforge generate` must work on both.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hf_dirs import hf_dir
from fxforge.cli import main as cli_main
from fxforge.runtime.layouts import KV_META, KVCacheLayout

FAMILIES = ("gpt2", "llama", "qwen2")
TASK = "text-generation-with-past"
NEW_TOKENS = 6
PROMPTS = ["the quick brown fox jumps", "hello", "a compiler rewrites a graph of tensor operations"]
LAYERS = 2  # tests/hf_dirs.py configs


def _cli(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        status = cli_main(list(argv))
    assert status == 0, out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, HF dir, fp32 decoder artifact written by the CLI)."""
    source = hf_dir(tmp_path_factory, request.param)
    out = tmp_path_factory.mktemp(f"decoder-{request.param}") / "artifact"
    _cli("compile", str(source), "--task", TASK, "--backend", "onnx", "-o", str(out))
    return request.param, source, out


@pytest.fixture(scope="module")
def hf_model():
    cache = {}

    def load(source: Path):
        if source not in cache:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
            tokenizer.padding_side = "left"
            cache[source] = AutoModelForCausalLM.from_pretrained(source).eval(), tokenizer
        return cache[source]
    return load


# --------------------------------------------------------------------------- a plain ORT loop


def ort_greedy(path: Path, ids: np.ndarray, mask: np.ndarray, new_tokens: int, eos: int, pad: int) -> np.ndarray:
    """Greedy decoding with onnxruntime alone, by the conventional names (HF's left padding rules)."""
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    batch = ids.shape[0]
    feeds = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    layers = len(past_inputs) // 2
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    tokens, done, step_ids = ids, np.zeros(batch, bool), ids
    for _ in range(new_tokens):
        feeds.update(input_ids=step_ids, attention_mask=mask, position_ids=positions)
        logits, *cache = session.run(["logits", *present], feeds)
        nxt = np.where(done, pad, logits[:, -1].argmax(-1)).astype(np.int64)
        done |= nxt == eos
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        feeds.update({f"past_key_values.{name[len('present.'):]}": c for name, c in zip(present, cache)})
        positions = mask.sum(-1, keepdims=True)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        step_ids = nxt[:, None]
        if done.all():
            break
    return tokens


def _hf_greedy(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return ref, encoded


# --------------------------------------------------------------------------- names


def test_onnx_has_exactly_the_conventional_names_and_dims(family):
    _, _, out = family
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    kv_in = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    kv_out = [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *kv_in]
    assert list(outputs) == ["logits", *kv_out]
    assert inputs["input_ids"].shape == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"].shape == ["batch_size", "total_sequence_length"]
    assert inputs["attention_mask"].type == "tensor(int64)"
    assert inputs["position_ids"].shape == ["batch_size", "sequence_length"]
    for name in kv_in:
        batch, heads, seq, dim = inputs[name].shape
        assert (batch, seq) == ("batch_size", "past_sequence_length") and heads > 0 and dim > 0
    for name in kv_out:
        assert outputs[name].shape[0] == "batch_size" and outputs[name].shape[2] == "total_sequence_length"
    assert outputs["logits"].shape[:2] == ["batch_size", "sequence_length"]
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] % 1 in inputs and decoder["outputs"]["present_value_names"] % 1 in outputs
    assert decoder["num_hidden_layers"] == LAYERS
    assert decoder["num_key_value_heads"] == inputs["past_key_values.0.key"].shape[1]
    assert (out / "tokenizer.json").is_file()


def test_onnx_uses_ort_fused_attention_and_norms(family):
    """Each cached layer is one GroupQueryAttention (cache inside, no Concat/Attention left), and
    the residual adds are fused into the norms (RMSNorm: Llama/Qwen2; LayerNorm: GPT-2)."""
    name, _, out = family
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS and "Attention" not in ops
    skip = "SkipLayerNormalization" if name == "gpt2" else "SkipSimplifiedLayerNormalization"
    # two norms a layer and the final one; each follows a residual add but Llama's first (the
    # embedding) while GPT-2's first follows the token + position embedding sum
    assert ops.count(skip) == 2 * LAYERS + (name == "gpt2")


# --------------------------------------------------------------------------- greedy vs transformers


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "left-padded-batch3"])
def test_plain_ort_greedy_matches_transformers(family, hf_model, prompts):
    _, source, out = family
    model, tokenizer = hf_model(source)
    ref, encoded = _hf_greedy(model, tokenizer, prompts)
    if len(prompts) > 1:
        assert (encoded["attention_mask"] == 0).any()  # really padded
    got = ort_greedy(out, encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), NEW_TOKENS,
                     model.config.eos_token_id, tokenizer.pad_token_id)
    assert got.tolist() == ref.tolist()


def test_onnx_decoder_and_cli_generate_agree_with_the_plain_loop(family, hf_model):
    from fxforge.runtime.onnx_decoder import OnnxDecoder

    _, source, out = family
    model, tokenizer = hf_model(source)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    plain = ort_greedy(out, encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), NEW_TOKENS,
                       model.config.eos_token_id, tokenizer.pad_token_id)
    decoder = OnnxDecoder(out)
    got = decoder.generate(encoded["input_ids"], encoded["attention_mask"], max_new_tokens=NEW_TOKENS)
    assert got.tolist() == plain.tolist()
    text = _cli("generate", str(out), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS))
    width = encoded["input_ids"].shape[1]
    single = tokenizer([PROMPTS[0]], return_tensors="pt")["input_ids"]
    alone = decoder.generate(single, max_new_tokens=NEW_TOKENS)
    assert text.strip() == (PROMPTS[0] + tokenizer.decode(alone[0, single.shape[1]:], skip_special_tokens=True)).strip()
    assert plain.shape[1] <= width + NEW_TOKENS


# --------------------------------------------------------------------------- int4, sampling


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory):
    source = hf_dir(tmp_path_factory, "llama")
    out = tmp_path_factory.mktemp("decoder-int4") / "artifact"
    _cli("compile", str(source), "--task", TASK, "--backend", "onnx", "--passes", "quantize(bits=4,group_size=32)",
         "-o", str(out))
    return source, out


def test_int4_artifact_decodes_on_plain_ort_and_fxforge_generate(int4_artifact, hf_model):
    source, out = int4_artifact
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops  # the weights really are 4-bit in the file
    model, tokenizer = hf_model(source)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    got = ort_greedy(out, encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), NEW_TOKENS,
                     eos=-1, pad=tokenizer.pad_token_id)  # eos=-1: run every step
    new = got[:, encoded["input_ids"].shape[1]:]
    assert new.shape == (len(PROMPTS), NEW_TOKENS)
    assert ((0 <= new) & (new < model.config.vocab_size)).all()
    text = _cli("generate", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "4")
    lines = text.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(PROMPTS[0]) and lines[1].startswith(PROMPTS[1])


def test_w8a8_artifact_fuses_its_norms_and_decodes(tmp_path_factory, hf_model):
    # per-token W8A8 linears end in com.microsoft::MatMulIntegerToFloat, which ORT's symbolic
    # shape inference has no rule for: without ort_norms' own rule no norm was fused here
    source = hf_dir(tmp_path_factory, "llama")
    out = tmp_path_factory.mktemp("decoder-w8a8") / "artifact"
    _cli("compile", str(source), "--task", TASK, "--backend", "onnx", "--passes",
         "fuse_attention,quantize_dynamic(include_lm_head=True,act_scale=token)", "-o", str(out))
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert "MatMulIntegerToFloat" in ops and ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    model, tokenizer = hf_model(source)
    encoded = tokenizer(PROMPTS[:1], return_tensors="pt")
    got = ort_greedy(out, encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), NEW_TOKENS,
                     eos=-1, pad=tokenizer.pad_token_id)
    assert got.shape == (1, encoded["input_ids"].shape[1] + NEW_TOKENS)


def test_sampling_is_seeded_and_differs_from_greedy(int4_artifact):
    from fxforge.runtime.onnx_decoder import OnnxDecoder

    _, out = int4_artifact
    decoder = OnnxDecoder(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    first = decoder.generate(ids, max_new_tokens=12, do_sample=True, temperature=2.0, seed=1)
    again = decoder.generate(ids, max_new_tokens=12, do_sample=True, temperature=2.0, seed=1)
    greedy = decoder.generate(ids, max_new_tokens=12)
    assert torch.equal(first, again)
    assert not torch.equal(first, greedy)  # temperature 2 over a random model: some token differs
    top1 = decoder.generate(ids, max_new_tokens=12, do_sample=True, top_k=1, seed=5)
    assert torch.equal(top1, greedy)  # top-k 1 sampling is greedy


# --------------------------------------------------------------------------- Python API


def _llama_head_dim_16(directory: Path) -> Path:
    """tests/hf_dirs.py's Llama with 2 heads of 16 (its own have 8): ORT's GroupQueryAttention
    rotates heads of multiples of 16 only, so this is the model whose file takes the full ORT
    path (rotary inside the op, the fused q/k/v projection fed packed, no head Reshapes)."""
    import transformers as tf

    from hf_dirs import VOCAB, _decoder_tokenizer

    tokenizer = _decoder_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    tf.LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def compiled_llama(tmp_path_factory):
    import fxforge

    source = _llama_head_dim_16(tmp_path_factory.mktemp("hf-llama-d16"))
    out = tmp_path_factory.mktemp("decoder-api") / "artifact"
    return source, fxforge.compile_decoder(source, out), out


def test_the_fused_qkv_projection_feeds_group_query_attention_packed(compiled_llama):
    """fuse_projections (a task pass) makes q/k/v one MatMul read whole by the op, rotary inside
    it; the head split/merge Reshapes around it cancel and are gone."""
    _, _, out = compiled_llama
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    producer = {o: node.op_type for node in graph.node for o in node.output}
    layers = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert len(layers) == LAYERS
    for gqa in layers:
        assert producer[gqa.input[0]] == "MatMul" and list(gqa.input[1:3]) == ["", ""]
        assert any(a.name == "do_rotary" and a.i == 1 for a in gqa.attribute)
    assert "Reshape" not in ops and "Transpose" not in ops
    assert ops.count("MatMul") == 4 * LAYERS + 1  # qkv, o, gate_up, down per layer; the head


def test_compiled_generate_matches_transformers_on_a_padded_batch(compiled_llama, hf_model):
    source, compiled, _ = compiled_llama
    model, tokenizer = hf_model(source)
    ref, encoded = _hf_greedy(model, tokenizer, PROMPTS)
    got = compiled.generate(encoded["input_ids"], encoded["attention_mask"], max_new_tokens=NEW_TOKENS,
                            eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert got.tolist() == ref.tolist()


def test_ort_fused_decoder_matches_the_standard_onnx_one(compiled_llama, hf_model, tmp_path):
    """The GroupQueryAttention / skip-norm file against the same graph written as standard ONNX
    (Attention + Concat cache): logits of a left-padded prefill within float32 reordering, the
    same greedy tokens on a left-padded batch."""
    from fxforge.decoder_artifact import write_decoder_onnx

    source, compiled, fused_dir = compiled_llama
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    write_decoder_onnx(compiled, plain_dir / "model.onnx", ort_fusions=False)
    plain_ops = [n.op_type for n in onnx.load(str(plain_dir / "model.onnx")).graph.node]
    assert "Attention" in plain_ops and "GroupQueryAttention" not in plain_ops
    _, tokenizer = hf_model(source)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"].numpy(), encoded["attention_mask"].numpy()
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)}
    for directory in (plain_dir, fused_dir):
        session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((len(PROMPTS), i.shape[1], 0, i.shape[3]), np.float32)
        logits = session.run(["logits"], feeds)[0]
        if directory == plain_dir:
            want = logits
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)  # padding rows too: same mask
    got = {d: ort_greedy(d, ids, mask, NEW_TOKENS, eos=-1, pad=tokenizer.pad_token_id) for d in (plain_dir, fused_dir)}
    assert got[plain_dir].tolist() == got[fused_dir].tolist()


def test_layout_is_a_typed_record_that_survives_save_and_load(compiled_llama, tmp_path):
    import fxforge

    _, compiled, _ = compiled_llama
    layout = compiled.graph_module.meta[KV_META]
    assert isinstance(layout, KVCacheLayout) and layout.padding_mask and layout.num_layers == LAYERS
    compiled.save(tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved" / "manifest.json").read_text())
    assert manifest["graph_meta"][KV_META]["mask_kind"] == "padding"  # plain data in the manifest
    loaded = fxforge.load(tmp_path / "saved")
    assert loaded.graph_module.meta[KV_META] == layout
    ids = torch.tensor([[4, 9, 16, 25]])
    assert torch.equal(loaded.generate(ids, max_new_tokens=4), compiled.generate(ids, max_new_tokens=4))


def test_a_malformed_layout_in_a_manifest_is_an_artifact_error(compiled_llama, tmp_path):
    import fxforge
    from fxforge.errors import ArtifactError

    _, compiled, _ = compiled_llama
    compiled.save(tmp_path / "saved")
    path = tmp_path / "saved" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["graph_meta"][KV_META]["past"] = [[3, "4"]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"past\[0\] must be an integer|graph_meta"):
        fxforge.load(tmp_path / "saved")


def test_export_decoder_refuses_a_tree_mask_graph_and_generate_refuses_right_padding(compiled_llama, tmp_path):
    import fxforge
    from fxforge.errors import InputError

    _, compiled, _ = compiled_llama
    original = compiled.graph_module.meta[KV_META]
    compiled.graph_module.meta[KV_META] = original.replace(mask_kind="tree")
    try:
        with pytest.raises(InputError, match=r"add_kv_cache\(attention_mask=True\)"):
            fxforge.export_decoder(compiled, tmp_path / "out")
    finally:
        compiled.graph_module.meta[KV_META] = original
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="left padding"):
        compiled.generate(torch.tensor([[4, 9, 3]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)


# --------------------------------------------------------------------------- onnxruntime-genai


_OG_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime_genai as og
directory, ids, max_length = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(directory)
params = og.GeneratorParams(model)
params.set_search_options(max_length=max_length, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.array(ids, dtype=np.int32))
while not generator.is_done():
    generator.generate_next_token()
print(json.dumps([int(t) for t in generator.get_sequence(0)]))
"""


def _genai_python() -> list[str] | None:
    """An interpreter with onnxruntime_genai: this one, or $FXFORGE_GENAI_PYTHON (its own venv,
    since its wheel pins its own onnxruntime)."""
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return [sys.executable]
    other = os.environ.get("FXFORGE_GENAI_PYTHON")
    return [other] if other and Path(other).is_file() else None


def test_onnxruntime_genai_generator_decodes_the_artifact_like_transformers(family, hf_model):
    python = _genai_python()
    if python is None:
        pytest.skip("onnxruntime_genai does not import here; set FXFORGE_GENAI_PYTHON to a python that has it "
                    "(pip install onnxruntime-genai in a separate venv)")
    _, source, out = family
    model, tokenizer = hf_model(source)
    ref, encoded = _hf_greedy(model, tokenizer, PROMPTS[:1])
    ids = encoded["input_ids"].tolist()
    result = subprocess.run([*python, "-c", _OG_SCRIPT, str(out), json.dumps(ids), str(ref.shape[1])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ref[0].tolist()
