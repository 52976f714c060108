"""EVA and LoRA-GA: data-driven inits checked against their definitions and against PEFT's EVA."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fxforge.errors import PassError
from fxforge.passes.adapters.add_adapters import AddAdapters
from fxforge.passes.adapters.eva import redistribute_ranks
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass

TARGETS = ("fc1", "fc2")


def _calibration(n=8):
    return [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _layer_inputs(model, batches):
    """The inputs fc1 and fc2 see, computed by hand from the eager model."""
    fc1 = torch.cat(batches)
    fc2 = model.act(model.norm1(model.fc1(fc1)))
    return {"fc1": fc1.detach(), "fc2": fc2.detach()}


def _top_components(x, k):
    centered = x.double() - x.double().mean(0)
    return torch.linalg.svd(centered, full_matrices=False)[2][:k]


def _principal_cosines(a, b):
    """Cosines of the principal angles between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.double().t())[0], torch.linalg.qr(b.double().t())[0]
    return torch.linalg.svdvals(qa.t() @ qb)


def test_eva_rows_span_the_top_principal_directions(mlp, adapt):
    zoo, gm = mlp
    calibration = _calibration()
    out = adapt(gm, zoo.args, calibration=calibration, method="eva", rank=4, targets=TARGETS,
                calibration_limit=8, eva_tau=1.0)  # tau=1: use every batch, so the PCA is the full one
    inputs = _layer_inputs(zoo.model, calibration)
    for layer in TARGETS:
        a = getattr(out, layer).lora_A
        assert a.shape[0] >= 1 and torch.count_nonzero(getattr(out, layer).lora_B) == 0
        cosines = _principal_cosines(a, _top_components(inputs[layer], a.shape[0]).float())
        assert cosines.min() > 0.999, (layer, cosines)
        torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0]), atol=1e-5, rtol=0)  # orthonormal rows


def test_eva_redistributes_ranks_like_peft(mlp, adapt):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    zoo, gm = mlp
    calibration = _calibration()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=2.0, tau=0.99))
    reference = peft.get_peft_model(copy.deepcopy(zoo.model), config)
    initialize_lora_eva_weights(reference, calibration, forward_fn=lambda model, x: model(x),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    ctx = PassContext(example_inputs=tuple(zoo.args), calibration=calibration)
    out = run_pass(AddAdapters(method="eva", rank=4, targets=TARGETS), gm, ctx)
    theirs = dict(reference.named_parameters())
    for layer in TARGETS:
        ours_a = getattr(out, layer).lora_A
        their_a = theirs[f"base_model.model.{layer}.lora_A.default.weight"]
        assert ours_a.shape == their_a.shape  # the same global rank redistribution
        assert _principal_cosines(ours_a, their_a).min() > 0.85  # PEFT's truncated incremental PCA is approximate
    assert sum(getattr(out, layer).lora_A.shape[0] for layer in TARGETS) == 8  # the budget is kept


def test_redistribute_ranks_follows_explained_variance():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.4, 0.2, 0.01, 0.0])}
    assert redistribute_ranks(ratios, budget=4) == {"a": 2, "b": 2}
    ratios = {"a": torch.tensor([0.9, 0.05, 0.04, 0.01]), "b": torch.tensor([0.6, 0.3, 0.2, 0.05])}
    assert redistribute_ranks(ratios, budget=4) == {"a": 1, "b": 3}


def test_eva_without_calibration_is_a_clear_error(mlp, adapt):
    zoo, gm = mlp
    with pytest.raises(PassError, match=r"\(method='eva'\) needs calibration data"):
        adapt(gm, zoo.args, method="eva", rank=4, targets=TARGETS)


def _labels(x):
    teacher = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    return (x @ teacher.t()).argmax(-1)


def test_lora_ga_aligns_with_the_averaged_gradient(mlp, adapt):
    zoo, gm = mlp
    batches = _calibration(4)
    loss_fn = lambda outputs, inputs: F.cross_entropy(outputs[0], _labels(inputs[0]))  # noqa: E731
    out = adapt(gm, zoo.args, calibration=batches, extras={"loss_fn": loss_fn}, method="lora_ga", rank=4,
                alpha=8, targets=TARGETS, ga_batches=4)
    model = copy.deepcopy(zoo.model)
    for x in batches:
        F.cross_entropy(model(x), _labels(x)).div(len(batches)).backward()
    for layer in TARGETS:
        grad = getattr(model, layer).weight.grad
        u, _, vh = torch.linalg.svd(grad)
        mine = getattr(out, layer)
        assert _principal_cosines(mine.lora_A, vh[:4]).min() > 0.999
        stable = grad.shape[0] ** 0.25 / 16 ** 0.5
        assert _principal_cosines(mine.lora_B.t(), u[:, 4:8].t()).min() > 0.999
        torch.testing.assert_close(mine.lora_B.norm(dim=0), torch.full((4,), stable), atol=1e-5, rtol=1e-5)
        # the residual keeps the initial output: W_res + s·B·A == W
        torch.testing.assert_close(mine.weight + 2.0 * mine.lora_B @ mine.lora_A, getattr(zoo.model, layer).weight,
                                   atol=1e-5, rtol=1e-5)


def test_lora_ga_needs_a_loss(mlp, adapt):
    zoo, gm = mlp
    with pytest.raises(PassError, match="needs a loss to take gradients of"):
        adapt(gm, zoo.args, calibration=_calibration(1), method="lora_ga", rank=4, targets=TARGETS)


def test_lora_ga_default_loss_is_next_token_cross_entropy():
    from fxforge.ir.trace import INPUT_NAMES
    from fxforge.passes.adapters.lora_ga import default_loss

    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.meta[INPUT_NAMES] = ["attention_mask", "input_ids"]
    ids = torch.randint(0, 7, (2, 5))
    logits = torch.randn(2, 5, 7)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(default_loss(gm)([logits], [torch.ones(2, 5), ids]), expected)
    gm.meta[INPUT_NAMES] = ["x"]
    assert default_loss(gm) is None  # no token ids: the user must give a loss
