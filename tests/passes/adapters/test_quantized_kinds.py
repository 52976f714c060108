"""Adapters beside every quantized linear kind (QLoRA style), and their merge: a branch next to
linear_wq_ic, linear_fp, linear_w8a8, linear_int8_mixed, shift_add_linear; merged into a float
linear where the base is weight-only, kept (with the reason) where the base quantizes activations."""
import pytest
import torch

from fxforge.ir.graph import get_attr, set_attr, summarize
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, run_pass
from fxforge.passes.spec import parse_pass

KINDS = [  # (quantizing pass, the op it leaves, whether merging folds it back into a float linear)
    ("quantize(group_size=-1,group_axis=out)", "linear_wq_ic", True),
    ("quantize_fp", "linear_fp", True),
    ("shift_add(group_size=32)", "shift_add_linear", True),
    ("quantize_dynamic", "linear_w8a8", False),
    ("llm_int8", "linear_int8_mixed", False),
]


@pytest.mark.parametrize("quantizer,op,merges", KINDS, ids=[k[1] for k in KINDS])
def test_adapters_sit_beside_each_quantized_kind_and_merge_where_exact(mlp, quantizer, op, merges):
    zoo, gm = mlp
    ctx = PassContext(example_inputs=tuple(zoo.args))
    quantized, report = Pipeline(f"{quantizer},add_adapters(rank=4,targets=[fc2,fc3])").run(gm, ctx)
    assert report["add_adapters"].sites == 2 and report["add_adapters"].skipped == []
    ops = summarize(quantized).ops
    assert ops[f"fxforge.{op}"] == 3 and ops.get("fxforge.lora_linear", 0) == 0  # the base stays quantized
    assert {n for n, p in quantized.named_parameters() if p.requires_grad} == \
        {"fc2.lora_A", "fc2.lora_B", "fc3.lora_A", "fc3.lora_B"}
    for name in ("fc2.lora_B", "fc3.lora_B"):  # move the update off zero so merging has work to do
        set_attr(quantized, name, torch.randn_like(get_attr(quantized, name)) * 0.1, trainable=True)
    # verified against the branch form within 1e-4: checks the dequantized weight the merge reads
    merged = run_pass(parse_pass("merge_adapters"), quantized, ctx)
    record_ops = summarize(merged).ops
    if merges:
        assert record_ops[f"fxforge.{op}"] == 1 and record_ops["aten.linear"] == 2
    else:
        assert record_ops[f"fxforge.{op}"] == 3 and record_ops.get("aten.linear", 0) == 0
