"""Pipelines: parsing pass specs, custom passes by name, verification and rollback, the report."""
import copy
import re
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from testing_utils import traced_zoo
from torch.fx import GraphModule

import fxforge
from fxforge.errors import PassError, PassSpecError
from fxforge.ir.graph import get_attr, linear_sites, set_attr
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline
from fxforge.passes.registry import register_pass, registered_passes
from fxforge.passes.spec import parse_pass
from fxforge.models import get_model

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class NegateTwice(Pass):
    """Test pass: y -> -(-y) after every targeted linear (exact)."""

    name = "negate_twice"
    targets: tuple[str, ...] = ("*",)
    mode: Literal["exact", "tiny"] = "exact"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        sites = linear_sites(gm, targets=self.targets)
        for site in sites:
            with gm.graph.inserting_after(site.node):
                neg = gm.graph.call_function(aten.neg.default, (site.node,))
            with gm.graph.inserting_after(neg):
                back = gm.graph.call_function(aten.neg.default, (neg,))
            site.node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not neg)
        return PassResult(gm, sites=len(sites))


@register_pass
@dataclass(frozen=True)
class BreakWeights(Pass):
    """Test pass that is deliberately wrong: it scales the first layer's weight."""

    name = "break_weights"
    factor: float = 3.0

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        site = linear_sites(gm)[0]
        set_attr(gm, site.weight_name, get_attr(gm, site.weight_name) * self.factor)
        return PassResult(gm, sites=1)


@register_pass
@dataclass(frozen=True)
class Crash(Pass):
    name = "crash"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_registry_key_equals_pass_name():
    for key, cls in registered_passes().items():
        assert key == cls.name


def test_builtin_pass_names_equal_their_file_names():
    import inspect
    from pathlib import Path

    for name, cls in registered_passes().items():
        if not cls.__module__.startswith("fxforge.passes"):
            continue
        path = Path(inspect.getfile(cls))
        assert name in (path.stem, path.parent.name), f"{cls.__name__} lives in {path}"


def test_spec_parses_into_dataclass():
    p = parse_pass("negate_twice(targets=['mlp.*','self_attn.*'],mode=tiny)")
    assert p == NegateTwice(targets=("mlp.*", "self_attn.*"), mode="tiny")
    assert parse_pass(p.spec()) == p
    pipeline = Pipeline("canonicalize, negate_twice(mode='exact'), fuse_rms_norm")
    assert [q.name for q in pipeline.passes] == ["canonicalize", "negate_twice", "fuse_rms_norm"]


def test_unquoted_lists_parse_as_lists_of_words():
    # What a shell user types: no quotes inside the brackets.
    assert parse_pass("negate_twice(targets=[mlp.*,self_attn.*])").targets == ("mlp.*", "self_attn.*")
    assert parse_pass("negate_twice(targets=(q_proj))").targets == ("q_proj",)


def test_unknown_pass_lists_known_passes_and_close_matches():
    with pytest.raises(PassSpecError) as info:
        Pipeline("canonicalize,negate_twise")
    message = str(info.value)
    assert "unknown pass 'negate_twise'" in message
    assert "Did you mean 'negate_twice'" in message
    assert "fuse_rms_norm" in message  # the list of known passes


def test_unknown_option_lists_valid_options():
    with pytest.raises(PassSpecError) as info:
        parse_pass("break_weights(factr=2)")
    assert "no option 'factr'" in str(info.value)
    assert "factor: float = 3.0" in str(info.value)


@pytest.mark.parametrize("spec, fragment", [
    ("break_weights(factor='big')", "must be float"),
    ("negate_twice(mode=fast)", "must be one of 'exact', 'tiny'"),
    ("negate_twice(targets=3)", "must be a tuple"),
    ("break_weights(factor=2", "closing ')'"),
    ("break_weights(2.0)", "key=value"),
])
def test_ill_typed_options_are_rejected(spec, fragment):
    with pytest.raises(PassSpecError, match=re.escape(fragment)):
        parse_pass(spec)


def test_int_option_is_accepted_for_float_field():
    assert parse_pass("break_weights(factor=2)").factor == 2.0


@pytest.fixture(scope="module")
def llama():
    return get_model("tiny-llama")


def test_custom_pass_used_by_name_in_compile(llama):
    compiled = fxforge.compile(llama.model, llama.args, llama.kwargs, passes="negate_twice(targets=['mlp.*'])")
    report = compiled.report["negate_twice"]
    assert report.sites == 6  # gate, up, down in each of 2 layers
    negs = [n for n in compiled.graph_module.graph.nodes if n.target == aten.neg.default]
    assert len(negs) == 12 + 4  # ours, plus rotate_half's two per layer
    assert report.max_error <= 1e-6


def test_wrong_pass_is_rolled_back_and_named(llama):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    with torch.no_grad():
        expected = llama.model(*llama.args, **llama.kwargs).logits
    with pytest.raises(PassError) as info:
        fxforge.compile(llama.model, llama.args, llama.kwargs, passes="fuse_rms_norm,break_weights(factor=3.0)")
    error = info.value
    assert error.pass_name == "break_weights"
    assert "break_weights" in str(error) and "rolled back" in str(error)
    assert "output 0" in str(error)  # the largest-error output
    assert error.node is not None and "first diverging node" in str(error)
    # the user's model is untouched: parameters and outputs
    for k, v in llama.model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        assert torch.equal(llama.model(*llama.args, **llama.kwargs).logits, expected)


def test_pipeline_leaves_its_input_graph_alone():
    zoo, gm = traced_zoo("tiny-llama")
    snapshot = copy.deepcopy(gm)
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()))
    with pytest.raises(PassError):
        Pipeline("break_weights").run(gm, ctx)
    assert gm.code == snapshot.code
    for (k, v), (_, w) in zip(gm.state_dict().items(), snapshot.state_dict().items()):
        assert torch.equal(v, w)


def test_crashing_pass_is_named():
    zoo, gm = traced_zoo("mlp")
    with pytest.raises(PassError, match="pass 'crash' failed and was rolled back: RuntimeError: boom"):
        Pipeline("crash").run(gm, PassContext(example_inputs=zoo.args))


def test_report_rows_and_dump(tmp_path, monkeypatch):
    zoo, gm = traced_zoo("tiny-llama")
    monkeypatch.setenv("FXFORGE_DUMP", str(tmp_path))
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()))
    out, report = Pipeline("negate_twice,fuse_rms_norm").run(gm, ctx)
    assert [r.name for r in report.records] == ["negate_twice", "fuse_rms_norm"]
    first, second = report.records
    assert first.nodes_after == first.nodes_before + 2 * first.sites
    assert second.sites == 5 and second.nodes_after < second.nodes_before
    assert first.bytes_before == first.bytes_after > 0
    text = str(report)
    assert "negate_twice" in text and "fuse_rms_norm" in text
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["01_negate_twice.py", "02_fuse_rms_norm.py"]
    assert "fxforge.rms_norm" in (tmp_path / "02_fuse_rms_norm.py").read_text()


def test_register_pass_requires_frozen_dataclass():
    class NotADataclass(Pass):
        name = "not_a_dataclass"

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass(NotADataclass)


@pytest.mark.parametrize("make", [
    lambda: __import__("fxforge.passes.quantize", fromlist=["Quantize"]).Quantize(bits=99),
    lambda: __import__("fxforge.passes.quantize", fromlist=["Quantize"]).Quantize(group_size=-7),
    lambda: fxforge.Pipeline("quantize(bits=99)"),
])
def test_a_bad_option_is_a_pass_spec_error_in_python_and_in_strings(make):
    with pytest.raises(fxforge.PassSpecError, match="bits|group_size"):
        make()
