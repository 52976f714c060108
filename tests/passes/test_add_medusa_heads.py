"""Pass add_medusa_heads: graph structure, frozen backbone, exact base logits, errors, composition."""
import copy

import pytest
import torch

from fxforge.errors import PassError
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import get_attr
from fxforge.ir.trace import trace
from fxforge.passes.add_medusa_heads import AddMedusaHeads, find_lm_head, head_parameter_names
from fxforge.runtime.layouts import MedusaLayout
from fxforge.runtime.meta_keys import MEDUSA_META
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, run_pass
from runtime.fused_code_lm import fused_graph

aten = torch.ops.aten


@pytest.fixture(scope="module")
def lm_graph():
    gm, ids = fused_graph()
    return gm, ids[:, :10]


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_heads_added_as_resblocks_and_vocab_projections(lm_graph):
    gm, ids = lm_graph
    report = Pipeline([AddMedusaHeads(num_heads=3, num_layers=2)])
    out_gm, rep = report.run(copy.deepcopy(gm), PassContext(example_inputs=(ids,)))
    assert rep["add_medusa_heads"].sites == 3
    # 3 heads x 2 ResBlocks: one SiLU each, on top of the MLP's SiLUs
    assert _count(out_gm, aten.silu.default) - _count(gm, aten.silu.default) == 6
    assert _count(out_gm, aten.linear.default) - _count(gm, aten.linear.default) == 3 * 3
    layout = out_gm.meta[MEDUSA_META]
    assert isinstance(layout, MedusaLayout) and not layout.heads_apart and not layout.verifies_in_graph
    assert (layout.num_heads, layout.num_layers, layout.logits_output, layout.heads_output, layout.lm_head) == \
        (3, 2, 0, 1, "lm_head.weight")
    logits, heads = out_gm(ids)
    assert heads.shape == (3, *logits.shape)
    # fresh heads: ResBlocks are identities (zero weights), projections copy the LM head
    for k in range(3):
        torch.testing.assert_close(heads[k], logits, rtol=0, atol=0)
        assert not get_attr(out_gm, f"medusa_heads.{k}.0.linear.weight").any()
        assert torch.equal(get_attr(out_gm, f"medusa_heads.{k}.2.weight"), get_attr(out_gm, "lm_head.weight"))


def test_base_logits_unchanged_and_only_heads_trainable(lm_graph):
    gm, ids = lm_graph
    ref = gm(ids)[0]
    out_gm = run_pass(AddMedusaHeads(num_heads=2), gm, PassContext(example_inputs=(ids,)))
    torch.testing.assert_close(out_gm(ids)[0], ref, rtol=0, atol=0)
    trainable = {n for n, p in out_gm.named_parameters() if p.requires_grad}
    assert trainable == set(head_parameter_names(out_gm))
    assert len(trainable) == 2 * 3  # per head: ResBlock weight, bias, projection
    assert all(name.startswith("medusa_heads.") for name in trainable)


def test_verify_checks_base_logits_still_match(lm_graph):
    gm, ids = lm_graph
    p = AddMedusaHeads(num_heads=1)
    ctx = PassContext(example_inputs=(ids,))
    after = run_pass(p, gm, ctx)
    assert p.verify(gm, after, ctx).ok
    broken = copy.deepcopy(after)
    with torch.no_grad():
        get_attr(broken, "lm_head.weight").add_(0.5)  # the base logits move: must be reported
    comparison = p.verify(gm, broken, ctx)
    assert not comparison.ok and "output 0" in comparison.describe()


def test_pipeline_string_and_options():
    assert Pipeline("add_medusa_heads(num_heads=2,num_layers=0)").passes[0] == AddMedusaHeads(2, 0)
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        AddMedusaHeads(num_heads=0)
    with pytest.raises(ValueError, match="num_layers"):
        AddMedusaHeads(num_layers=-1)
    assert Pipeline("add_medusa_heads(share_lm_head=True)").passes[0].share_lm_head is True
    with pytest.raises(ValueError, match="share_lm_head must be True or False"):
        AddMedusaHeads(share_lm_head="yes")


def test_graph_without_lm_head_is_refused_saying_what_was_looked_for():
    from fxforge.models import get_model

    zoo = get_model("mlp")
    gm = trace(zoo.model, zoo.args, zoo.kwargs)
    canonicalize(gm)
    with pytest.raises(PassError, match="found no LM head.*lm_head.*tied to the token embedding"):
        find_lm_head(gm)
    with pytest.raises(PassError, match="no LM head"):
        run_pass(AddMedusaHeads(), gm, PassContext(example_inputs=tuple(zoo.args)))


def test_running_twice_is_refused(lm_graph):
    gm, ids = lm_graph
    once = run_pass(AddMedusaHeads(num_heads=1), gm, PassContext(example_inputs=(ids,)))
    with pytest.raises(PassError, match="already has Medusa heads"):
        run_pass(AddMedusaHeads(num_heads=1), once, PassContext(example_inputs=(ids,)))


def test_heads_on_a_quantized_backbone_read_its_hidden_states(lm_graph):
    from fxforge.passes.registry import get_pass_class

    gm, ids = lm_graph
    ctx = PassContext(example_inputs=(ids,))
    # the heads copy a float LM head (Medusa keeps it in full precision)
    quantized = run_pass(get_pass_class("quantize")(bits=4, group_size=16, include_lm_head=False), gm, ctx)
    with_heads = run_pass(AddMedusaHeads(num_heads=2), quantized, ctx)
    assert any("linear_wq" in str(n.target) for n in with_heads.graph.nodes)
    q_logits, heads = with_heads(ids)
    float_logits = gm(ids)[0]
    assert not torch.allclose(q_logits, float_logits, atol=1e-4)  # quantization did change the model
    # fresh heads reproduce the *quantized* model's logits: they read its hidden state
    torch.testing.assert_close(heads[0], q_logits, rtol=0, atol=0)
    torch.testing.assert_close(q_logits, quantized(ids)[0], rtol=0, atol=0)


def test_heads_sharing_the_lm_head_train_resblocks_only_and_project_once(lm_graph):
    gm, ids = lm_graph
    pipeline = Pipeline([AddMedusaHeads(num_heads=3, num_layers=2, share_lm_head=True)])
    out_gm, rep = pipeline.run(copy.deepcopy(gm), PassContext(example_inputs=(ids,)))
    assert rep["add_medusa_heads"].sites == 3
    # 3 heads x 2 ResBlocks, then ONE vocab projection of the stacked ResBlock outputs
    assert _count(out_gm, aten.linear.default) - _count(gm, aten.linear.default) == 3 * 2 + 1
    projection = out_gm.graph.output_node().args[0][1]
    assert projection.target == aten.linear.default and projection.args[0].target == aten.stack.default
    assert projection.args[1].target == "lm_head.weight"  # the LM head itself, not a copy
    assert out_gm.meta[MEDUSA_META].share_lm_head is True
    names = head_parameter_names(out_gm)
    assert len(names) == 3 * 2 * 2 and all(".linear." in n for n in names)  # ResBlock weights and biases
    assert {n for n, p in out_gm.named_parameters() if p.requires_grad} == set(names)
    logits, heads = out_gm(ids)
    assert heads.shape == (3, *logits.shape)
    for k in range(3):  # fresh ResBlocks are identities: every head reproduces the base logits
        torch.testing.assert_close(heads[k], logits, rtol=0, atol=0)


def test_shared_lm_head_heads_split_from_the_backbone_and_train(lm_graph):
    import fxforge.medusa as medusa
    from fxforge.api import CompiledModel

    gm, ids = lm_graph
    with_heads = run_pass(AddMedusaHeads(num_heads=2, share_lm_head=True), gm, PassContext(example_inputs=(ids,)))
    backbone, heads = medusa.split_backbone_and_heads(with_heads)
    torch.testing.assert_close(heads(backbone(ids)[0])[0], with_heads(ids)[1], rtol=0, atol=0)
    assert get_attr(heads, "lm_head.weight") is get_attr(with_heads, "lm_head.weight")
    lm_head = get_attr(with_heads, "lm_head.weight").clone()
    compiled = CompiledModel(with_heads, "eager", example_inputs=(ids,))
    report = medusa.train_heads(compiled, None, steps=60, lr=3e-3, seq_len=24, batch_size=8,
                                self_distill_sequences=24, progress=False)
    assert sum(report.losses[-10:]) < sum(report.losses[:10])
    assert torch.equal(get_attr(with_heads, "lm_head.weight"), lm_head)  # the shared projection stays frozen
    assert get_attr(with_heads, "medusa_heads.0.0.linear.weight").abs().sum() > 0


def test_a_quantized_lm_head_is_refused_with_the_fix(lm_graph):
    from fxforge.passes.registry import get_pass_class

    gm, ids = lm_graph
    ctx = PassContext(example_inputs=(ids,))
    quantized = run_pass(get_pass_class("quantize")(bits=4, group_size=16), gm, ctx)  # LM head included
    with pytest.raises(PassError, match="include_lm_head=False"):
        run_pass(AddMedusaHeads(num_heads=2), quantized, ctx)
