"""Parity with Hugging Face PEFT: same base model, same adapter weights copied into both ->
outputs within 1e-5 before training and after 10 identical SGD steps; merged weights agree.

Each row of PARITY says how PEFT spells the method (its config) and how its tensors map to
fxforge's roles. Residual methods (PiSSA, OLoRA, ...) also copy PEFT's rewritten base weight.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from fxforge.passes.adapters.common import adapter_records
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass

peft = pytest.importorskip("peft")

TARGETS = ("fc1", "fc2")
RANK, ALPHA = 4, 8


def lora_config(**kw):
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, **kw)


def eva_config(ranks):
    """EVA's adapted layers are LoRA layers of the ranks EVA chose, with α scaled to keep α/r (PEFT's
    adjust_scaling_factors); its init is compared with PEFT's in test_eva_lora_ga.py."""
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                           rank_pattern=ranks, alpha_pattern={k: ALPHA * r / RANK for k, r in ranks.items()})


LORA_ROLES = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}

# method: (PEFT config, {our role: PEFT parameter suffix}, our pass options, copy base weight)
PARITY = {
    "lora": (lambda: lora_config(), LORA_ROLES, {}, False),
    "rslora": (lambda: lora_config(use_rslora=True), LORA_ROLES, {}, False),
    "dora": (lambda: lora_config(use_dora=True),
             {**LORA_ROLES, "magnitude": "lora_magnitude_vector.default.weight"}, {}, False),
    "pissa": (lambda: lora_config(init_lora_weights="pissa"), LORA_ROLES, {}, True),
    "olora": (lambda: lora_config(init_lora_weights="olora"), LORA_ROLES, {}, True),
    "eva": (eva_config, LORA_ROLES, {}, False),
    "lora_ga": (lambda: lora_config(), LORA_ROLES, {}, True),
    "bone": (lambda: peft.MissConfig(r=RANK, target_modules=list(TARGETS)), {"miss_D": "miss_block.default"},
             {}, False),
    "bone-bat": (lambda: peft.MissConfig(r=RANK, target_modules=list(TARGETS), init_weights="bat"),
                 {"bone_B": "miss_block.default"}, {"bone_form": "bat"}, False),
}


def _peft_tensor(peft_model, layer, suffix):
    return dict(peft_model.named_parameters())[f"base_model.model.{layer}.{suffix}"]


def _train(forward, params, inputs, targets, steps=10, lr=0.1):
    opt = torch.optim.SGD(params, lr=lr)
    for x, t in zip(inputs[:steps], targets[:steps]):
        loss = F.mse_loss(forward(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", sorted(PARITY))
def test_matches_peft_before_and_after_training_and_merged(method, mlp, adapt):
    zoo, gm = mlp
    make_config, roles, options, copy_base = PARITY[method]
    torch.manual_seed(0)
    calibration = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    extras = {"loss_fn": lambda outputs, inputs: outputs[0].square().mean()}
    ours = adapt(gm, zoo.args, calibration=calibration, extras=extras, method=method.split("-")[0], rank=RANK,
                 alpha=ALPHA, targets=TARGETS, **options)
    ranks = {layer: rec["rank"] for layer, rec in adapter_records(ours).items()}
    config = make_config(ranks) if method == "eva" else make_config()
    peft_model = peft.get_peft_model(copy.deepcopy(zoo.model), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in TARGETS:
            for role, suffix in roles.items():
                theirs = _peft_tensor(peft_model, layer, suffix)
                theirs.add_(torch.randn(theirs.shape, generator=g) * 0.1)  # off the init: B = 0 hides bugs
                getattr(getattr(ours, layer), role).copy_(theirs)
            if copy_base:
                getattr(ours, layer).weight.copy_(_peft_tensor(peft_model, layer, "base_layer.weight"))
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(ours_params) == len(peft_params) == len(roles) * len(TARGETS)
    x = zoo.args[0]
    torch.testing.assert_close(ours(x)[0], peft_model(x), atol=1e-5, rtol=1e-5)

    inputs = [torch.randn(4, 32, generator=g) for _ in range(10)]
    targets = [torch.randn(4, 10, generator=g) for _ in range(10)]
    _train(lambda v: ours(v)[0], ours_params, inputs, targets)
    _train(peft_model, peft_params, inputs, targets)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], peft_model(x), atol=1e-5, rtol=1e-5)
        merged = run_pass(MergeAdapters(), ours, PassContext(example_inputs=(x,)))
        reference = peft_model.merge_and_unload()
        for layer in TARGETS:
            torch.testing.assert_close(getattr(merged, layer).weight, getattr(reference, layer).weight,
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(x)[0], reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_residual_init_matches_peft(method, mlp, adapt):
    zoo, gm = mlp
    peft_model = peft.get_peft_model(copy.deepcopy(zoo.model), PARITY[method][0]())
    ours = adapt(gm, zoo.args, method=method, rank=RANK, alpha=ALPHA, targets=TARGETS)
    for layer in TARGETS:
        mine = getattr(ours, layer)
        torch.testing.assert_close(mine.lora_A, _peft_tensor(peft_model, layer, "lora_A.default.weight"),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B, _peft_tensor(peft_model, layer, "lora_B.default.weight"),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.weight, _peft_tensor(peft_model, layer, "base_layer.weight"),
                                   atol=1e-5, rtol=1e-4)


def test_dora_magnitude_init_matches_peft(mlp, adapt):
    zoo, gm = mlp
    peft_model = peft.get_peft_model(copy.deepcopy(zoo.model), PARITY["dora"][0]())
    ours = adapt(gm, zoo.args, method="dora", rank=RANK, alpha=ALPHA, targets=TARGETS)
    for layer in TARGETS:
        torch.testing.assert_close(getattr(ours, layer).magnitude,
                                   _peft_tensor(peft_model, layer, "lora_magnitude_vector.default.weight"))
