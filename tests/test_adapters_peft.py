"""Adapters in PEFT's format, both ways, on real transformers models (tests/hf_dirs.py):

* a directory written by PEFT's `save_pretrained` (LoRA / DoRA, B perturbed off its zero init)
  loads into our compiled model of the same base and gives PEFT's outputs within 1e-5;
* ours, saved with `save_adapters(format="peft")`, loads with `PeftModel.from_pretrained` and
  gives our outputs within 1e-5;
for Llama (q_proj, v_proj) and GPT-2 (c_attn, a Conv1D: fan_in_fan_out). Bad directories are
refused with the problem named and the model unchanged; `CompiledModel.merge_adapters()`.
"""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxforge
from fxforge.adapters_io import AdapterLoadError, load_adapters, save_adapters
from fxforge.adapters_peft import AdapterSaveError
from fxforge.errors import FxforgeError
from fxforge.ir.graph import summarize
from fxforge.passes.adapters.common import adapter_records

peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
from hf_dirs import build_model  # noqa: E402

RANK, ALPHA = 4, 8
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
CASES = [(family, method) for family in TARGETS for method in ("lora", "dora")]
_CACHE: dict = {}


def base(family):
    """(HF model, example ids) of `family`, built once."""
    if family not in _CACHE:
        model, _ = build_model(family)
        ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
        _CACHE[family] = (model, ids)
    return _CACHE[family]


def compiled_with(family, method):
    """Our compiled model of `family` with `method` adapters on TARGETS (compiled once per case)."""
    key = (family, method)
    if key not in _CACHE:
        model, ids = base(family)
        targets = TARGETS[family]
        _CACHE[key] = fxforge.compile(model, (ids,), passes=f"add_adapters(method={method},rank={RANK},alpha={ALPHA},"
                                                            f"targets={targets})")
    return _CACHE[key]


def peft_model(family, method, rank=RANK, **config):
    model, _ = base(family)
    lora = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=TARGETS[family], lora_dropout=0.0,
                           use_dora=method == "dora", fan_in_fan_out=family == "gpt2", **config)
    return peft.get_peft_model(copy.deepcopy(model), lora).eval()


def perturb(params, seed):
    """Move adapter tensors off their init (B = 0 would make every adapter look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_dir(tmp_path, family="llama", method="lora", **config):
    theirs = peft_model(family, method, **config)
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=1)
    directory = tmp_path / "peft"
    theirs.save_pretrained(directory)
    return theirs, directory


def graph_tensors(compiled):
    return {n: t.detach().clone() for n, t in compiled.graph_module.state_dict().items()}


@pytest.mark.parametrize("family,method", CASES)
def test_peft_directory_gives_peft_outputs(family, method, tmp_path):
    model, ids = base(family)
    compiled = compiled_with(family, method)
    theirs, directory = peft_dir(tmp_path, family, method)
    loaded = load_adapters(compiled, directory)
    assert len(loaded) == 2 * len(TARGETS[family])
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - model(ids).logits).abs().max() > 1e-3  # the adapters do change the outputs
        torch.testing.assert_close(compiled(ids), expected, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in compiled.trainable_parameters())  # still trainable after the load


@pytest.mark.parametrize("family,method", CASES)
def test_our_directory_gives_our_outputs_in_peft(family, method, tmp_path):
    model, ids = base(family)
    compiled = compiled_with(family, method)
    perturb(compiled.trainable_parameters(), seed=2)
    directory = save_adapters(compiled, tmp_path / "ours", format="peft")
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2") and config["use_dora"] == (method == "dora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    with torch.no_grad():
        ours = compiled(ids)
        assert (ours - model(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=1e-5)
    # and back: the directory restores exactly these tensors
    before = {n: p.detach().clone() for n, p in compiled.graph_module.named_parameters() if p.requires_grad}
    perturb(compiled.trainable_parameters(), seed=3)
    load_adapters(compiled, directory / "adapter_model.safetensors")  # the weights file names its directory
    for name, value in before.items():
        assert torch.equal(compiled.graph_module.get_parameter(name), value), name


def test_per_layer_ranks_and_rslora_round_trip_through_peft(tmp_path):
    """PEFT's rank_pattern / alpha_pattern and use_rslora scaling, read and written."""
    model, ids = base("llama")
    pattern = {"model.layers.1.self_attn.q_proj": 2}
    theirs = peft_model("llama", "lora", use_rslora=True, rank_pattern=pattern, alpha_pattern={"v_proj": 4})
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    compiled = fxforge.compile(model, (ids,), verify=False, passes=[
        "add_adapters(method=rslora,rank=4,alpha=8,targets=['model.layers.0.self_attn.q_proj'])",
        "add_adapters(method=rslora,rank=2,alpha=8,targets=['model.layers.1.self_attn.q_proj'])",
        "add_adapters(method=rslora,rank=4,alpha=4,targets=['v_proj'])"])
    load_adapters(compiled, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
        save_adapters(compiled, tmp_path / "ours", format="peft")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, compiled(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["miss", "bat"])
def test_miss_adapters_both_ways(form, tmp_path):
    """fxforge's bone method is PEFT's MiSS tuner (init_weights=True: MiSS, "bat": Bat)."""
    model, ids = base("llama")
    compiled = fxforge.compile(model, (ids,), verify=False,
                               passes=f"add_adapters(method=bone,bone_form={form},rank={RANK},targets=['q_proj','v_proj'])")
    config = peft.MissConfig(r=RANK, target_modules=TARGETS["llama"], init_weights="bat" if form == "bat" else True)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=5)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapters(compiled, tmp_path / "peft")
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(compiled(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
        perturb(compiled.trainable_parameters(), seed=6)
        save_adapters(compiled, tmp_path / "ours", format="peft")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, compiled(ids), atol=1e-5, rtol=1e-5)
    other = "miss" if form == "bat" else "bat"
    wrong = fxforge.compile(model, (ids,), verify=False,
                            passes=f"add_adapters(method=bone,bone_form={other},rank={RANK},targets=['q_proj','v_proj'])")
    with pytest.raises(AdapterLoadError, match=f"bone_form='{other}'"):
        load_adapters(wrong, tmp_path / "ours")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD = {
    "no weights file": (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "has no adapter_config.json"),
    "unknown peft_type": (lambda d: _edit_config(d, peft_type="LOHA"), "peft_type is 'LOHA'"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "trained biases": (lambda d: _edit_config(d, bias="all"), "bias='all'"),
    "rewritten base": (lambda d: _edit_config(d, init_lora_weights="pissa"), "rewrites the base weights"),
    "unknown option": (lambda d: _edit_config(d, use_something_new=True), "use_something_new"),
    "rslora scaling": (lambda d: _edit_config(d, use_rslora=True), "scaling 4.0"),
    "wrong rank": (lambda d: _edit_config(d, r=2), "rank 2 in the directory's config"),
    "wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({Q_A: t[Q_A][:, :31].contiguous()})),
                    "shape (4, 31)"),
    "wrong dtype": (lambda d: _edit_tensors(d, lambda t: t.update({Q_A: t[Q_A].half()})), "dtype torch.float16"),
    "NaN": (lambda d: _edit_tensors(d, lambda t: t[Q_A].__setitem__((0, 0), float("nan"))), "NaN"),
    "unknown tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.weight":
                                                                        torch.zeros(384, 32)})),
                       "not PEFT LoRA/DoRA layer tensors"),
    "missing layer": (lambda d: _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v" in k]),
                      "missing from the directory: model.layers.1.self_attn.v_proj"),
    "pickle only": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "pickle"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_directories_are_refused_and_change_nothing(case, tmp_path):
    compiled = compiled_with("llama", "lora")
    _, directory = peft_dir(tmp_path)
    break_it, message = BAD[case]
    break_it(directory)
    before = graph_tensors(compiled)
    with pytest.raises(AdapterLoadError, match="nothing was changed|has no adapter_") as err:
        load_adapters(compiled, directory)
    assert message in str(err.value)
    after = graph_tensors(compiled)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dora_directory_into_a_lora_graph_is_refused(tmp_path):
    compiled = compiled_with("llama", "lora")
    _, directory = peft_dir(tmp_path, method="dora")
    with pytest.raises(AdapterLoadError, match=r"the graph's adapter is 'lora' \(LoRA\) but the directory holds DoRA"):
        load_adapters(compiled, directory)


@pytest.mark.parametrize("family,method", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_residual_methods_load_in_peft_relative_to_the_original_model(family, method, tmp_path):
    """PiSSA/OLoRA rewrote W; written as PEFT's converted LoRA of rank 2r against the original W."""
    model, ids = base(family)
    compiled = fxforge.compile(model, (ids,), verify=False, passes=f"add_adapters(method={method},rank={RANK},"
                                                                    f"alpha={ALPHA},targets={TARGETS[family]})")
    perturb(compiled.trainable_parameters(), seed=7)
    with pytest.raises(AdapterSaveError, match="pass base_model="):
        save_adapters(compiled, tmp_path / "ours", format="peft")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with pytest.raises(AdapterSaveError, match="not the model these adapters were compiled from"):
        save_adapters(compiled, tmp_path / "ours", format="peft", base_model=other)
    assert not (tmp_path / "ours").exists()
    directory = save_adapters(compiled, tmp_path / "ours", format="peft", base_model=model)
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 2 * RANK
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    with torch.no_grad():
        ours = compiled(ids)
        assert (ours - model(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_methods_without_a_peft_form_are_refused_before_writing(tmp_path):
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    compiled = fxforge.compile(layer, (torch.randn(2, 8),), passes="add_adapters(method=sorsa,rank=2)", verify=False)
    with pytest.raises(AdapterSaveError, match="method 'sorsa': PEFT has no SORSA tuner"):
        save_adapters(compiled, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_saving_never_replaces_a_directory_of_other_files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(AdapterSaveError, match="refusing to replace"):
        save_adapters(compiled_with("llama", "lora"), tmp_path / "model", format="peft")
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


def test_merge_adapters_returns_a_new_model_and_keeps_the_adapted_one(tmp_path):
    model, ids = base("llama")
    compiled = compiled_with("llama", "lora")
    theirs, directory = peft_dir(tmp_path)
    load_adapters(compiled, directory)
    before = graph_tensors(compiled)
    with torch.no_grad():
        adapted = compiled(ids)
        merged = compiled.merge_adapters()
        assert summarize(merged.graph_module).ops.get("fxforge.lora_linear", 0) == 0
        assert summarize(compiled.graph_module).ops["fxforge.lora_linear"] == 4
        assert merged.report["merge_adapters"].sites == 4
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(ids), theirs.merge_and_unload()(ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(compiled(ids), adapted)
    after = graph_tensors(compiled)
    assert all(torch.equal(before[k], after[k]) for k in before) and adapter_records(compiled.graph_module)
    assert len(compiled.trainable_parameters()) == 8 and not merged.trainable_parameters()


def test_merge_adapters_without_adapters_is_refused():
    plain = fxforge.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(FxforgeError, match="no adapters to merge"):
        plain.merge_adapters()
