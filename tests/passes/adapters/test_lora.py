"""add_adapters(method=lora|rslora) and merge/unmerge: graph structure, trainability, numerics, errors."""
import copy

import pytest
import torch

from fxforge.errors import PassError, PassSpecError
from fxforge.ir.graph import summarize
from fxforge.ir.verify import run_graph
from fxforge.passes.adapters.add_adapters import AddAdapters
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.adapters.unmerge_adapters import UnmergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, run_pass

LORA = torch.ops.fxforge.lora_linear.default


def test_lora_replaces_targeted_linears_and_freezes_the_rest(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="lora", rank=4, alpha=8, targets=("fc1", "fc2"))
    ops = summarize(out).ops
    assert ops["fxforge.lora_linear"] == 2 and ops["aten.linear"] == 1  # fc3 untouched
    trainable = sorted(n for n, p in out.named_parameters() if p.requires_grad)
    assert trainable == ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    assert out.fc1.lora_A.shape == (4, 32) and out.fc1.lora_B.shape == (64, 4)
    assert torch.count_nonzero(out.fc1.lora_B) == 0 and torch.count_nonzero(out.fc1.lora_A) > 0
    node = next(n for n in out.graph.nodes if n.target == LORA)
    assert node.args[-1] == 2.0  # s = alpha / r
    for ref, got in zip(run_graph(gm, zoo.args), run_graph(out, zoo.args)):
        assert torch.equal(ref, got)  # B = 0: exactly the base model


def test_rslora_scale_is_alpha_over_sqrt_rank(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="rslora", rank=4, alpha=8, targets=("fc2",))
    node = next(n for n in out.graph.nodes if n.target == LORA)
    assert node.args[-1] == pytest.approx(8 / 2)


def test_lora_output_matches_formula_with_nonzero_b(mlp, adapt, randomize):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, rank=4, alpha=8, targets=("fc1",))
    randomize(out)
    x = zoo.args[0]
    a, b = out.fc1.lora_A, out.fc1.lora_B
    hidden = torch.nn.functional.linear(x, gm.fc1.weight, gm.fc1.bias) + 2.0 * (x @ a.t()) @ b.t()
    model = copy.deepcopy(zoo.model)
    expected = model.fc3(model.act(model.norm2(model.fc2(model.act(model.norm1(hidden))))))
    torch.testing.assert_close(out(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapter(mlp, adapt, randomize):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, rank=4, targets=("fc1", "fc2"))
    randomize(out)
    out(zoo.args[0])[0].square().mean().backward()
    for name, p in out.named_parameters():
        if "lora" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_folds_every_adapter_and_unmerge_restores_it(mlp, adapt, randomize):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, rank=4, alpha=8, targets=("fc1", "fc2"))
    randomize(out)
    ctx = PassContext(example_inputs=tuple(zoo.args))
    expected_w = out.fc1.weight + 2.0 * out.fc1.lora_B @ out.fc1.lora_A
    merged = run_pass(MergeAdapters(), out, ctx)
    assert summarize(merged).ops["fxforge.lora_linear"] == 0 and summarize(merged).ops["aten.linear"] == 3
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged.fc1.weight, expected_w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged(zoo.args[0])[0], out(zoo.args[0])[0], atol=1e-5, rtol=1e-5)
    restored = run_pass(UnmergeAdapters(), merged, ctx)
    assert summarize(restored).ops["fxforge.lora_linear"] == 2
    torch.testing.assert_close(restored.fc1.weight, gm.fc1.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(restored.fc1.lora_B, out.fc1.lora_B)
    assert sorted(n for n, p in restored.named_parameters() if p.requires_grad) == \
        ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]


def test_pipeline_string_and_report(mlp):
    zoo, gm = mlp
    pipeline = Pipeline("add_adapters(method=rslora,rank=2,targets=['fc*'])")
    out, report = pipeline.run(gm, PassContext(example_inputs=tuple(zoo.args)))
    assert report["add_adapters"].sites == 3
    assert report["add_adapters"].notes["ranks"] == {"fc1": 2, "fc2": 2, "fc3": 2}


def test_unknown_target_lists_close_matches(mlp, adapt):
    zoo, gm = mlp
    before = copy.deepcopy(gm)
    with pytest.raises(PassError, match=r"'fc4' matches no linear layer.*Close matches: .*fc"):
        adapt(gm, zoo.args, targets=("fc4",))
    assert summarize(gm).ops == summarize(before).ops  # nothing changed


def test_rank_larger_than_layer_allows(mlp, adapt):
    zoo, gm = mlp
    with pytest.raises(PassError, match=r"rank 16 is larger than layer 'fc3' allows.*10x64.*exclude"):
        adapt(gm, zoo.args, rank=16, targets=("fc3",))
    assert all(n.target != LORA for n in gm.graph.nodes)


def test_default_targets_skip_layers_narrower_than_the_rank(mlp):
    """targets=None (every linear): fc3 (10 wide) is narrower than rank 16, so it is skipped with a
    reason that names the limit; fc1/fc2 are adapted (a MoE router must not fail the whole pass)."""
    from fxforge.passes.pipeline import PipelineReport

    zoo, gm = mlp
    report = PipelineReport()
    ctx = PassContext(example_inputs=tuple(zoo.args))
    out = run_pass(AddAdapters(rank=16, include_lm_head=True), gm, ctx, report=report)
    record = report.records[-1]
    assert record.sites == 2 and summarize(out).ops["fxforge.lora_linear"] == 2
    assert [where for where, _ in record.skipped] == ["fc3"]
    assert "narrower than the rank" in record.skipped[0][1] and "rank <= 10" in record.skipped[0][1]


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="unknown adapter method 'lroa'.*Did you mean 'lora'"):
        AddAdapters(method="lroa")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        AddAdapters(rank=0)
    with pytest.raises(PassSpecError, match="has no option 'rnak'"):
        Pipeline("add_adapters(rnak=4)")


def test_second_pass_skips_adapted_layers(mlp, adapt):
    zoo, gm = mlp
    once = adapt(gm, zoo.args, rank=2, targets=("fc1",))
    ctx = PassContext(example_inputs=tuple(zoo.args))
    twice = run_pass(AddAdapters(rank=2, targets=("fc1", "fc2")), once, ctx)
    assert summarize(twice).ops["fxforge.lora_linear"] == 2
    assert sum(p.requires_grad for p in twice.parameters()) == 4
