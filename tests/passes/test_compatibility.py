"""The pipeline's up-front pair check (fxforge/passes/compatibility.py): a pass that would find no
layer it rewrites, because an earlier pass turned every one into another form, is refused before
anything runs, with both passes named; partial coverage or a form the later pass reads is not."""
import pytest

from fxforge.errors import PassSpecError
from fxforge.passes.pipeline import Pipeline


@pytest.mark.parametrize("spec,first,second", [
    ("quantize_dynamic,sparsify", "quantize_dynamic", "sparsify"),
    ("llm_int8,prune", "llm_int8", "prune"),
    ("quantize(group_axis=out),sparsify", "quantize", "sparsify"),  # linear_wq_ic: codes sparsify cannot mask
    ("add_adapters,quantize(include_lm_head=False)", "add_adapters", "quantize"),  # the LM head alone is left
    ("quantize,fuse_attention,shift_add", "quantize", "shift_add"),  # passes in between change nothing
    ("quantize_fp,merge_adapters", "quantize_fp", "merge_adapters"),
])
def test_a_pair_that_cannot_compose_is_refused_naming_both(spec, first, second):
    with pytest.raises(PassSpecError) as info:
        Pipeline(spec)
    message = str(info.value)
    assert f"{second} cannot follow {first}" in message
    assert f"Run {second} before {first}" in message


def test_running_a_converting_pass_twice_is_refused():
    with pytest.raises(PassSpecError, match=r"pass 'quantize_dynamic' runs twice.*run it once"):
        Pipeline("quantize_dynamic,quantize_dynamic")


@pytest.mark.parametrize("spec", [
    "sparsify,quantize",                          # the other order
    "quantize,sparsify",                          # sparsify masks linear_wq codes
    "quantize_fp,add_adapters,merge_adapters",    # adapters on every quantized kind, merged back to float
    "quantize,add_adapters,merge_adapters,sparsify",  # merged: float again
    "quantize(targets=[q_proj]),sparsify",        # partial: the other layers are float
    "quantize(exclude=[q_proj]),prune",
    "sparsify(include_lm_head=True),quantize,sparsify(include_lm_head=True)",  # quantize leaves the head float
    "fuse_attention,add_kv_cache,quantize",       # passes that select no linear layer
])
def test_pairs_that_compose_or_may_are_accepted(spec):
    Pipeline(spec)


def test_every_pass_declares_what_it_consumes_as_linear_forms():
    from fxforge.passes.registry import registered_passes

    for name, cls in registered_passes().items():
        assert isinstance(cls.consumes, frozenset), name
        assert all(isinstance(form, str) and form for form in cls.consumes), name
