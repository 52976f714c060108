"""Every quantization pass is registered under its file's name and parses from a pipeline string."""
import pytest

from fxforge.passes.pipeline import Pipeline
from fxforge.passes.registry import registered_passes

PASSES = {"quantize": "fxforge.passes.quantize", "llm_int8": "fxforge.passes.quantize.llm_int8",
          "quantize_fp": "fxforge.passes.quantize.quantize_fp",
          "quantize_dynamic": "fxforge.passes.quantize.quantize_dynamic",
          "bitdelta": "fxforge.passes.quantize.bitdelta"}


@pytest.mark.parametrize("name,module", sorted(PASSES.items()))
def test_registered_under_file_name(name, module):
    cls = registered_passes()[name]
    assert cls.name == name and cls.__module__ == module


@pytest.mark.parametrize("spec", ["quantize(bits=4,group_size=128,method=gptq)", "llm_int8(threshold=5.0)",
                                  "quantize_fp(fmt=e2m1,group_size=32,act_fmt=e4m3)", "quantize_dynamic"])
def test_pipeline_strings_round_trip(spec):
    (p,) = Pipeline(spec).passes
    assert Pipeline(p.spec()).passes[0] == p
