"""Initializations against their definitions (SORSA, SVFit, LoLDU, LoRA-SB, Bone), the SORSA
regularizer, unmerge for every invertible method, and saving residual methods' base weights."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fxforge.adapters_io import load_adapters, save_adapters
from fxforge.errors import PassError
from fxforge.ir.verify import run_graph
from fxforge.passes.adapters.common import adapter_records, known_methods
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.adapters.unmerge_adapters import UnmergeAdapters
from fxforge.passes.adapters.sorsa import sorsa_regularizer
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass


def _trainable(gm):
    return {n: p for n, p in gm.named_parameters() if p.requires_grad}


def test_sorsa_factors_are_the_principal_triplets_and_the_regularizer_bites(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="sorsa", rank=4, targets=("fc2",))
    u, s, vh = torch.linalg.svd(gm.fc2.weight.detach())
    assert set(_trainable(out)) == {"fc2.sorsa_A", "fc2.sorsa_S", "fc2.sorsa_B"}
    torch.testing.assert_close(out.fc2.sorsa_S, s[:4])
    torch.testing.assert_close((out.fc2.sorsa_A @ vh[:4].t()).abs(), torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.fc2.weight, gm.fc2.weight - (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=0)
    assert sorsa_regularizer(out).item() < 1e-4  # orthonormal at init
    with torch.no_grad():
        out.fc2.sorsa_A.mul_(1.5)
    penalty = sorsa_regularizer(out)
    assert penalty.item() > 1.0
    penalty.backward()
    assert out.fc2.sorsa_A.grad.abs().sum() > 0


def test_svfit_trains_only_the_singular_values(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="svfit", rank=4, targets=("fc1",))
    assert list(_trainable(out)) == ["fc1.sigma"]
    torch.testing.assert_close(out.fc1.sigma, torch.linalg.svdvals(gm.fc1.weight.detach())[:4])


def test_loldu_trains_r_plus_one_numbers_and_rebuilds_w(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="loldu", rank=4, alpha=8, targets=("fc2",))
    assert sum(p.numel() for p in _trainable(out).values()) == 4 + 1
    layer = out.fc2
    rebuilt = layer.weight + 2.0 * (layer.loldu_PL * layer.loldu_z * layer.loldu_scale) @ layer.loldu_U
    torch.testing.assert_close(rebuilt, gm.fc2.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.diagonal(layer.loldu_U[:, :4]), torch.ones(4))  # unit-diagonal U_r


def test_lora_sb_trains_only_r_by_r_and_aligns_with_the_gradient(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="lora_sb", rank=4, targets=("fc1",))  # no data: LoRA-XS (SVD of W)
    assert {n: tuple(p.shape) for n, p in _trainable(out).items()} == {"fc1.lora_R": (4, 4)}
    _, _, vh = torch.linalg.svd(gm.fc1.weight.detach())
    torch.testing.assert_close((out.fc1.lora_A @ vh[:4].t()).abs(), torch.eye(4), atol=1e-5, rtol=0)
    teacher = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    loss_fn = lambda outputs, inputs: F.cross_entropy(outputs[0], (inputs[0] @ teacher.t()).argmax(-1))  # noqa
    with_data = adapt(mlp[1], zoo.args, calibration=batches, extras={"loss_fn": loss_fn}, method="lora_sb",
                      rank=4, targets=("fc1",))
    model = copy.deepcopy(zoo.model)
    for x in batches:
        loss_fn([model(x)], [x]).backward()
    _, _, gvh = torch.linalg.svd(model.fc1.weight.grad)
    torch.testing.assert_close((with_data.fc1.lora_A @ gvh[:4].t()).abs(), torch.eye(4), atol=1e-3, rtol=0)


def test_bone_block_affine_rank_must_divide_the_layer(mlp, adapt):
    zoo, gm = mlp
    with pytest.raises(PassError, match=r"rank 6 must divide both dimensions of layer 'fc1' \(64x32\)"):
        adapt(gm, zoo.args, method="bone", bone_form="bat", rank=6, targets=("fc1",))


@pytest.mark.parametrize("method", sorted(set(known_methods()) - {"dora"}))
def test_unmerge_restores_the_adapted_model(method, mlp, adapt):
    zoo, gm = mlp
    calibration = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    loss_fn = lambda outputs, inputs: outputs[0].square().mean()  # noqa: E731
    out = adapt(gm, zoo.args, calibration=calibration, extras={"loss_fn": loss_fn}, method=method, rank=4,
                targets=("fc2",))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ctx = PassContext(example_inputs=tuple(zoo.args))
    restored = run_pass(UnmergeAdapters(), run_pass(MergeAdapters(), out, ctx), ctx)
    assert adapter_records(restored)["fc2"]["method"] == method
    assert set(_trainable(restored)) == set(_trainable(out))
    x = torch.randn(3, 32)
    torch.testing.assert_close(run_graph(restored, (x,))[0], run_graph(out, (x,))[0], atol=1e-4, rtol=1e-4)


def test_dora_merge_is_not_undone(mlp, adapt):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, method="dora", rank=4, targets=("fc2",))
    ctx = PassContext(example_inputs=tuple(zoo.args))
    report = PipelineReport()
    run_pass(UnmergeAdapters(), run_pass(MergeAdapters(), out, ctx), ctx, report=report)
    assert report.records[0].sites == 0 and "not invertible" in report.records[0].skipped[0][1]


def test_residual_methods_ship_their_base_weight(mlp, adapt, tmp_path):
    zoo, gm = mlp
    trained = adapt(gm, zoo.args, method="pissa", rank=4, targets=("fc1",))
    with torch.no_grad():
        trained.fc1.lora_B.add_(0.1)
    path = save_adapters(trained, tmp_path / "pissa.safetensors")
    fresh = adapt(mlp[1], zoo.args, method="pissa", rank=4, targets=("fc1",))
    with torch.no_grad():
        fresh.fc1.weight.mul_(0.5)  # a different residual: loading must replace it too
    load_adapters(fresh, path)
    torch.testing.assert_close(fresh(zoo.args[0])[0], trained(zoo.args[0])[0], atol=0, rtol=0)


def test_a_module_called_twice_shares_one_adapter_and_tied_weights_are_left_alone():
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.passes.adapters.add_adapters import AddAdapters

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.twice = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            y = self.head(self.twice(torch.relu(self.twice(x))))  # one weight, two linear nodes
            return y + self.head.weight.mean()  # head's weight also feeds a non-linear node

    x = torch.randn(3, 16)
    gm = trace(Shared().eval(), (x,))
    canonicalize(gm)
    ctx = PassContext(example_inputs=(x,))
    report = PipelineReport()
    out = run_pass(AddAdapters(method="pissa", rank=2), gm, ctx, report=report)
    assert report.records[0].sites == 2 and list(adapter_records(out)) == ["twice"]
    assert len(adapter_records(out)["twice"]["nodes"]) == 2
    assert report.records[0].skipped == [
        ("head", "pissa rewrites the base weight, which is shared with other nodes (tied weights)")]
    with torch.no_grad():
        out.twice.lora_B.add_(0.05)
    merged = run_pass(MergeAdapters(), out, ctx)
    torch.testing.assert_close(merged(x)[0], out(x)[0], atol=1e-5, rtol=1e-5)
    restored = run_pass(UnmergeAdapters(), merged, ctx)
    assert len(adapter_records(restored)["twice"]["nodes"]) == 2
    torch.testing.assert_close(restored(x)[0], out(x)[0], atol=1e-5, rtol=1e-5)
    report = PipelineReport()
    lora = run_pass(AddAdapters(method="lora", rank=2, exclude=("head",)), gm, ctx, report=report)
    assert report.records[0].sites == 2 and list(adapter_records(lora)) == ["twice"]
