"""Models in by task: `fxforge.from_pretrained` and `fxforge compile DIR --task ...` on saved
Hugging Face directories (GPT-2, Llama, Qwen2, BERT; random weights, real tokenizers)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from hf_dirs import build_model, hf_dir

import fxforge
from fxforge.cli import main, with_task_passes
from fxforge.errors import ModelDirectoryError
from fxforge.models.hf import TASKS

DECODERS = ("gpt2", "llama", "qwen2")
FAMILIES = (*DECODERS, "bert")
DEFAULT_TASK = {"gpt2": "text-generation", "llama": "text-generation", "qwen2": "text-generation",
                "bert": "fill-mask"}
SERVED = {**{f: {"text-generation", "text-generation-with-past", "feature-extraction"} for f in DECODERS},
          "bert": {"fill-mask", "feature-extraction"}}
HEAD_CLASS = {"text-generation": transformers.AutoModelForCausalLM,
              "text-generation-with-past": transformers.AutoModelForCausalLM,
              "feature-extraction": transformers.AutoModel, "fill-mask": transformers.AutoModelForMaskedLM}
PROBE = ["a compiler rewrites a graph", "hello", "the quick brown fox jumps over the lazy dog again and again"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {family: hf_dir(tmp_path_factory, family) for family in FAMILIES}


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def reference(directory, task, enc):
    """What transformers computes for `task` on `enc` (logits, or hidden states)."""
    model = HEAD_CLASS[task].from_pretrained(directory).eval()
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def probe_inputs(directory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer(PROBE, padding="max_length", max_length=12, truncation=True, return_tensors="pt",
                     return_token_type_ids=False)


# ------------------------------------------------------------------ from_pretrained


@pytest.mark.parametrize("family", FAMILIES)
def test_default_task_comes_from_the_architecture(dirs, family):
    loaded = fxforge.from_pretrained(dirs[family], batch=3, seq=12)
    assert loaded.task == DEFAULT_TASK[family]
    architecture = json.loads((dirs[family] / "config.json").read_text())["architectures"][0]
    assert type(loaded.model).__name__ == architecture  # GPT2LMHeadModel keeps its head
    ids, mask = loaded.kwargs["input_ids"], loaded.kwargs["attention_mask"]
    assert ids.shape == mask.shape == (3, 12)
    assert (mask == 0).any() and (mask.sum(1) > 2).all()  # a real sentence per row, some rows padded
    assert (ids[mask == 0] == loaded.tokenizer.pad_token_id).all()
    if family in DECODERS:
        assert loaded.kwargs["use_cache"] is False
    else:
        assert (ids == loaded.tokenizer.mask_token_id).sum(1).tolist() == [1, 1, 1]  # fill-mask has a mask


@pytest.mark.parametrize("family", FAMILIES)
def test_every_task_the_directory_serves_and_a_clear_error_for_the_rest(dirs, family):
    for task in TASKS:
        if task not in SERVED[family]:
            with pytest.raises(ModelDirectoryError, match=f"cannot serve task '{task}'.*It serves: "):
                fxforge.from_pretrained(dirs[family], task=task)
            continue
        loaded = fxforge.from_pretrained(dirs[family], task=task)
        want = HEAD_CLASS[task].from_config(loaded.model.config)
        assert type(loaded.model) is type(want), task
        assert loaded.task == task
    past = fxforge.from_pretrained(dirs["llama"], task="text-generation-with-past", batch=3, seq=10)
    assert any(spec.startswith("add_kv_cache") for spec in past.task_passes)  # the CLI appends them
    assert set(past.kwargs) == {"input_ids", "use_cache"}  # the cache pass takes ids alone: full rows
    assert past.kwargs["input_ids"].shape == (3, 10)


def test_bad_directories_and_arguments_are_clear_errors(dirs, tmp_path):
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        fxforge.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelDirectoryError, match="no config.json"):
        fxforge.from_pretrained(tmp_path)
    with pytest.raises(ModelDirectoryError, match=r"unknown task 'text-gen'.*Did you mean 'text-generation'"):
        fxforge.from_pretrained(dirs["gpt2"], task="text-gen")
    with pytest.raises(ModelDirectoryError, match="dtype 'int8'"):
        fxforge.from_pretrained(dirs["gpt2"], dtype="int8")
    with pytest.raises(ModelDirectoryError, match="position limit"):
        fxforge.from_pretrained(dirs["gpt2"], seq=4096)
    config = json.loads((dirs["llama"] / "config.json").read_text())
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForTokenClassification"]}))
    with pytest.raises(ModelDirectoryError, match=r"'LlamaForTokenClassification'.*no known task.*feature-extraction"):
        fxforge.from_pretrained(odd)


def test_a_classifier_directory_defaults_to_text_classification(tmp_path):
    model, tokenizer = build_model("bert")
    classifier = transformers.BertForSequenceClassification(model.config).eval()
    classifier.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = fxforge.from_pretrained(tmp_path)
    assert loaded.task == "text-classification"
    compiled = fxforge.compile(loaded.model, loaded.args, loaded.kwargs, verify=False)
    enc = probe_inputs(tmp_path)
    with torch.no_grad():
        want = classifier(**enc).logits
    torch.testing.assert_close(compiled(**enc), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the CLI


@pytest.mark.slow  # one ONNX export per family (the backend keeps it, the save copies it)
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_writes_an_onnx_artifact_that_plain_onnxruntime_runs(dirs, family, tmp_path, capsys):
    out = tmp_path / "artifact"
    status, stdout, err = cli(capsys, "compile", dirs[family], "--backend", "onnx", "-o", out)
    assert status == 0, err
    assert f"task {DEFAULT_TASK[family]}" in stdout
    # self-contained: the tokenizer is in the artifact, and it still loads (manifest lists it)
    assert (out / "tokenizer.json").read_bytes() == (dirs[family] / "tokenizer.json").read_bytes()
    assert "tokenizer.json" in json.loads((out / "manifest.json").read_text())["files"]
    if family == "gpt2":  # one is enough: the manifest lists the tokenizer, so load accepts the directory
        fxforge.load(out, backend="eager")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    enc = probe_inputs(out)  # the artifact's own tokenizer; batch 3, seq 12: not the traced 2x16
    got = session.run(None, {k: v.numpy() for k, v in enc.items()})[0]
    want = reference(dirs[family], DEFAULT_TASK[family], enc)
    assert got.shape == tuple(want.shape) and want.shape[-1] == 384  # logits over the vocabulary
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_cli_feature_extraction_of_a_causal_lm(dirs, tmp_path, capsys):
    out = tmp_path / "features"
    status, stdout, err = cli(capsys, "compile", dirs["qwen2"], "--task", "feature-extraction", "-o", out)
    assert status == 0, err
    enc = probe_inputs(dirs["qwen2"])
    got = fxforge.load(out)(**enc)
    want = reference(dirs["qwen2"], "feature-extraction", enc)
    assert got.shape == want.shape and want.shape[-1] == 32  # hidden size, not the vocabulary
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bert_features_come_without_a_random_pooler(dirs):
    loaded = fxforge.from_pretrained(dirs["bert"], task="feature-extraction")
    assert type(loaded.model).__name__ == "BertModel" and loaded.model.pooler is None  # not in the checkpoint
    compiled = fxforge.compile(loaded.model, loaded.args, loaded.kwargs, verify=False)
    enc = probe_inputs(dirs["bert"])
    torch.testing.assert_close(compiled(**enc), reference(dirs["bert"], "feature-extraction", enc),
                               rtol=1e-4, atol=1e-4)


def test_cli_bfloat16_on_eager_and_onnx(dirs, tmp_path, capsys):
    out = tmp_path / "bf16"
    status, _, err = cli(capsys, "compile", dirs["llama"], "--dtype", "bfloat16", "-o", out)
    assert status == 0, err
    compiled = fxforge.load(out)
    assert {p.dtype for p in compiled.graph_module.parameters()} == {torch.bfloat16}
    enc = probe_inputs(dirs["llama"])
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = model(**enc).logits.float()
    got = compiled(**enc).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding, not a different model
    # ONNX on CPU runs a bf16 model computing in float32 (backends/onnx/compute_dtype.py)
    status, _, err = cli(capsys, "compile", dirs["llama"], "--dtype", "bfloat16", "--backend", "onnx",
                         "-o", tmp_path / "onnx")
    assert status == 0, err
    got = fxforge.load(tmp_path / "onnx")(**enc).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_task_passes_are_appended_once():
    assert with_task_passes("", ("add_kv_cache",)) == "add_kv_cache"
    assert with_task_passes("quantize(bits=4), fuse_rms_norm", ("add_kv_cache",)) == \
        "quantize(bits=4), fuse_rms_norm,add_kv_cache"
    assert with_task_passes("fuse_attention,add_kv_cache", ("add_kv_cache",)) == "fuse_attention,add_kv_cache"


def test_cli_errors_are_one_line(dirs, tmp_path, capsys):
    cases = [
        (["--task", "fill-mask"], "cannot serve task 'fill-mask'"),
        (["--task", "summarize"], "unknown --task 'summarize'; tasks: text-generation"),
        (["--passes", "quantize(bits=4,method=gptq,group_size=32)"], "needs calibration data: pass --calibration FILE"),
        (["--calibration", tmp_path / "missing.txt"], "calibration file"),
        (["--calibration-samples", "4"], "--calibration FILE, which is missing"),
    ]
    for extra, message in cases:
        status, _, err = cli(capsys, "compile", dirs["gpt2"], *extra, "-o", tmp_path / "out")
        assert status == 2, (extra, err)
        assert err.startswith("fxforge: error:") and err.count("\n") == 1 and message in err, err
    status, _, err = cli(capsys, "compile", "zoo:tiny-llama", "--task", "text-generation", "-o", tmp_path / "o")
    assert status == 2 and "need(s) a Hugging Face model directory" in err
    status, _, err = cli(capsys, "compile", "zoo:tiny-llama", "--passes", "quantize(bits=4,method=gptq,group_size=32)",
                         "-o", tmp_path / "o")
    assert status == 2 and "for Hugging Face directories only" in err and "calibration=[batch, ...]" in err
    status, _, err = cli(capsys, "compile", tmp_path / "nothing", "-o", tmp_path / "o")
    assert status == 2 and "cannot interpret MODEL" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a calibrated compile through the CLI
def test_cli_gptq_calibrates_on_a_text_file_and_differs_from_rtn(dirs, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(["the quick brown fox jumps over the lazy dog",
                                "quantize the weights, prune the heads, fuse the attention",
                                "a compiler rewrites a graph of tensor operations"] * 6))
    out = tmp_path / "gptq"
    status, stdout, err = cli(capsys, "compile", dirs["llama"], "--passes", "quantize(bits=4,method=gptq,group_size=32)",
                              "--calibration", calib, "--calibration-samples", "8", "--calibration-seq", "32",
                              "-o", out)
    assert status == 0, err
    assert "calibration: 8 window(s) of 32 tokens" in stdout
    enc = probe_inputs(dirs["llama"])
    gptq = fxforge.load(out)(**enc)
    loaded = fxforge.from_pretrained(dirs["llama"])
    rtn = fxforge.compile(loaded.model, loaded.args, loaded.kwargs, passes="quantize(bits=4,method=rtn,group_size=32)",
                          verify=False)(**enc)
    full = reference(dirs["llama"], "text-generation", enc)
    assert (gptq - rtn).abs().max() > 1e-3  # the calibration data changed the rounding
    assert (gptq - full).abs().max() < 0.5 * full.abs().max()  # and it is still the model, quantized
