"""fxforge.train.fit: trains exactly the trainable parameters of a compiled model and lowers the loss."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.errors import FxforgeError
from fxforge.models import get_model
from fxforge.train import fit


@pytest.fixture(scope="module")
def compiled_mlp():
    zoo = get_model("mlp")
    return zoo, fxforge.compile(zoo.model, zoo.args, passes="add_adapters(rank=4,alpha=8,targets=['fc1','fc2'])")


def _task(n_batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 32, generator=g)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(16, 32, generator=g)
        batches.append((x, (x @ teacher.t()).argmax(-1)))  # a linear 10-class labelling
    return batches


def test_fit_lowers_the_loss_and_updates_only_adapters(compiled_mlp):
    zoo, compiled = compiled_mlp
    frozen = {n: p.clone() for n, p in compiled.graph_module.named_parameters() if not p.requires_grad}
    losses = fit(compiled, _task(), F.cross_entropy, steps=60, lr=3e-2, progress=False)
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    for name, p in compiled.graph_module.named_parameters():
        if name in frozen:
            assert torch.equal(frozen[name], p), f"frozen {name} moved"
    assert [n for n, p in compiled.graph_module.named_parameters() if p.requires_grad] == \
        ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    assert len(compiled.trainable_parameters()) == 4


def test_fit_refuses_models_without_trainable_parameters(compiled_mlp):
    from fxforge.api import CompiledModel

    zoo, compiled = compiled_mlp
    gm = copy.deepcopy(compiled.graph_module)
    for p in gm.parameters():
        p.requires_grad_(False)
    plain = CompiledModel(gm, "eager", example_inputs=compiled.example_inputs)
    with pytest.raises(FxforgeError, match="no trainable parameters"):
        fit(plain, _task(1), F.cross_entropy, steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit(plain, _task(1), F.cross_entropy, steps=0)
