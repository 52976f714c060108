"""The model zoo: registry behaviour, and that every randomly initialized model builds, runs at
its example size and at other sizes, is reproducible, and exports with its dynamic shapes.
(The pretrained minilm has its own file, test_minilm.py.)"""
import pytest
import torch

from fxforge.errors import FxforgeError
from fxforge.models import zoo
from fxforge.models.base import ZooModel
from fxforge.models.zoo import UnknownModelError, get_model, list_models, register_model

BUILTIN = ["cnn", "minilm", "mlp", "tiny-bert", "tiny-gpt2", "tiny-llama"]
RANDOM_INIT = ["tiny-gpt2", "tiny-llama", "tiny-bert", "mlp", "cnn"]
TEXT = ["tiny-gpt2", "tiny-llama", "tiny-bert"]


def run(zoo_model: ZooModel, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """Call the model the way the tracer does and return its outputs as a tuple of tensors."""
    extra = {"return_dict": False} if zoo_model.name in TEXT else {}
    with torch.no_grad():
        out = zoo_model.model(*args, **kwargs, **extra)
    return (out,) if torch.is_tensor(out) else tuple(out)


def expected_shapes(name: str, batch: int, seq: int) -> list[tuple[int, ...]]:
    return {
        "tiny-gpt2": [(batch, seq, 256)],
        "tiny-llama": [(batch, seq, 256)],
        "tiny-bert": [(batch, seq, 64), (batch, 64)],
        "mlp": [(batch, 10)],
        "cnn": [(batch, 10)],
    }[name]


def example_size(zoo_model: ZooModel) -> tuple[int, int]:
    first = next(iter(zoo_model.kwargs.values())) if zoo_model.kwargs else zoo_model.args[0]
    return first.shape[0], (first.shape[1] if zoo_model.name in TEXT else 0)


@pytest.fixture(scope="module")
def built() -> dict[str, ZooModel]:
    return {name: get_model(name) for name in RANDOM_INIT}


def test_list_models_has_every_builtin_sorted():
    names = list_models()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModelError) as info:
        get_model("tiny-gpt3")
    message = str(info.value)
    assert "'tiny-gpt3'" in message
    assert all(name in message for name in BUILTIN)
    assert isinstance(info.value, FxforgeError) and isinstance(info.value, LookupError)


def test_register_model_adds_and_refuses_shadowing(monkeypatch, built):
    monkeypatch.setattr(zoo, "_FACTORIES", dict(zoo._FACTORIES))
    mlp = built["mlp"]

    def factory(seed: int) -> ZooModel:
        return ZooModel("my-mlp", mlp.model, mlp.args, {}, None, "test", mlp.make_inputs)

    register_model("my-mlp", factory)
    register_model("my-mlp", factory)  # the same factory again is a no-op
    assert "my-mlp" in list_models()
    assert get_model("my-mlp").model is mlp.model
    with pytest.raises(ValueError, match="already registered"):
        register_model("my-mlp", lambda seed: factory(seed))
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", factory)


def test_factory_returning_wrong_type_is_reported(monkeypatch):
    monkeypatch.setattr(zoo, "_FACTORIES", dict(zoo._FACTORIES))
    register_model("broken", lambda seed: torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="'broken'.*Linear"):
        get_model("broken")


@pytest.mark.parametrize("name", RANDOM_INIT)
def test_builds_in_eval_mode_and_runs_example_inputs(built, name):
    zoo_model = built[name]
    assert zoo_model.name == name and zoo_model.description
    assert not any(module.training for module in zoo_model.model.modules())
    batch, seq = example_size(zoo_model)
    outputs = run(zoo_model, zoo_model.args, zoo_model.kwargs)
    assert [tuple(o.shape) for o in outputs] == expected_shapes(name, batch, seq)
    assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("name", RANDOM_INIT)
@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 24)])
def test_make_inputs_at_other_sizes(built, name, batch, seq):
    zoo_model = built[name]
    args, kwargs = zoo_model.make_inputs(batch=batch, seq=seq)
    outputs = run(zoo_model, args, kwargs)
    want_seq = seq if name in TEXT else 0
    assert [tuple(o.shape) for o in outputs] == expected_shapes(name, batch, want_seq)
    assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("name", TEXT)
def test_text_inputs_are_right_padded_in_row_one(built, name):
    kwargs = built[name].kwargs
    assert set(kwargs) == {"input_ids", "attention_mask"}
    mask = kwargs["attention_mask"]
    assert tuple(mask.shape) == (2, 16) and mask.dtype == torch.long
    assert mask[0].all()
    assert mask[1, :12].all() and not mask[1, 12:].any()
    assert (kwargs["input_ids"] < 256).all() and (kwargs["input_ids"] >= 0).all()


@pytest.mark.parametrize("name", TEXT)
def test_text_models_refuse_sequences_past_their_positions(built, name):
    with pytest.raises(ValueError, match="seq must be between 1 and 128"):
        built[name].make_inputs(batch=1, seq=129)


@pytest.mark.parametrize("name", RANDOM_INIT)
def test_same_seed_same_weights_other_seed_other_weights(built, name):
    first = built[name].model.state_dict()
    again = get_model(name, seed=0).model.state_dict()
    other = get_model(name, seed=1).model.state_dict()
    float_keys = [k for k, v in first.items() if v.is_floating_point()]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in float_keys)


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_model("mlp", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_module_paths_read_like_transformers(built):
    paths = {name: dict(built[name].model.named_modules()) for name in TEXT}
    assert "transformer.h.0.attn.c_attn" in paths["tiny-gpt2"]
    assert "model.layers.0.self_attn.q_proj" in paths["tiny-llama"]
    assert "encoder.layer.0.attention.self.query" in paths["tiny-bert"]
    for name in TEXT:
        assert built[name].model.config._attn_implementation == "eager"


def test_tiny_llama_uses_grouped_query_attention(built):
    attention = built["tiny-llama"].model.model.layers[0].self_attn
    head_dim = 64 // 4
    assert attention.q_proj.out_features == 4 * head_dim
    assert attention.k_proj.out_features == attention.v_proj.out_features == 2 * head_dim


def test_cnn_batch_norms_are_not_identities(built):
    norms = [m for m in built["cnn"].model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6  # stem, block1 x2, block2 x2 + projection shortcut
    for norm in norms:
        assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


def test_cnn_and_mlp_ignore_seq(built):
    for name in ("cnn", "mlp"):
        args_a, _ = built[name].make_inputs(batch=3, seq=5)
        args_b, _ = built[name].make_inputs(batch=3)
        assert torch.equal(args_a[0], args_b[0])


@pytest.mark.parametrize("name", RANDOM_INIT)
def test_exports_with_its_dynamic_shapes(built, name):
    zoo_model = built[name]
    exported = torch.export.export(
        zoo_model.model,
        zoo_model.args,
        zoo_model.kwargs,
        dynamic_shapes=zoo_model.dynamic_shapes,
        strict=False,
    )
    args, kwargs = zoo_model.make_inputs(batch=3, seq=9)
    with torch.no_grad():
        got = exported.module()(*args, **kwargs)
    got = got if torch.is_tensor(got) else got[0]
    torch.testing.assert_close(got, run(zoo_model, args, kwargs)[0])
