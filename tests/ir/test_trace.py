"""Tracing and canonicalization keep every zoo model's outputs, at the example and other sizes."""
import pytest
import torch
import torch.utils._pytree as pytree
from testing_utils import traced_zoo

from fxforge.errors import TraceError
from fxforge.ir.graph import linear_sites
from fxforge.ir.trace import flatten_inputs, trace, unflatten_outputs
from fxforge.models.zoo import get_model

ZOO = ["tiny-gpt2", "tiny-llama", "tiny-bert", "mlp", "cnn", "minilm"]


def run_original(zoo, args, kwargs):
    with torch.no_grad():
        if hasattr(zoo.model, "config"):  # transformers: plain tuples, no cache
            kwargs = {**kwargs, "use_cache": False, "return_dict": False} if "gpt2" in zoo.name or "llama" in zoo.name \
                else {**kwargs, "return_dict": False}
        return zoo.model(*args, **kwargs)


def first_tensor(out):
    return pytree.tree_leaves(out)[0]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("canonical", [False, True])
def test_trace_matches_model_at_other_sizes(name, canonical):
    zoo, gm = traced_zoo(name, canonical=canonical)
    for batch, seq in [(3, 9), (1, 21)]:
        args, kwargs = zoo.make_inputs(batch=batch, seq=seq)
        expected = run_original(zoo, args, kwargs)
        got = unflatten_outputs(gm, gm(*flatten_inputs(gm, args, kwargs)))
        exp_leaves, got_leaves = pytree.tree_leaves(expected), pytree.tree_leaves(got)
        assert len(got_leaves) == len(exp_leaves)
        for e, g in zip(exp_leaves, got_leaves):
            assert g.shape == e.shape
            assert (g - e).abs().max() <= 1e-6


def test_parameters_are_get_attr_nodes_named_like_the_model():
    zoo, gm = traced_zoo("tiny-llama")
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "model.layers.0.self_attn.q_proj.weight" in targets
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    names = dict(zoo.model.named_parameters())
    for target in targets & set(names):
        assert torch.equal(gm.get_parameter(target), names[target])


def test_module_paths_recorded_for_layer_targeting():
    _, gm = traced_zoo("tiny-llama")
    paths = {n.meta.get("module_path") for n in gm.graph.nodes if n.op == "call_function"}
    assert "model.layers.0.self_attn.q_proj" in paths
    sites = linear_sites(gm, targets="layers.*.self_attn.q_proj")
    assert [s.module_path for s in sites] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_tracing_shares_the_models_tensors_without_touching_the_model():
    """No clone of the weights (a second copy of a large model): the graph's tensors are new
    objects over the model's storage, recorded as borrowed; flags on them stay the graph's."""
    from fxforge.ir.trace import borrowed_storages

    zoo = get_model("mlp")
    zoo.model.train()  # eval semantics come from a view, not from a deep copy or from flipping the model
    gm = trace(zoo.model, zoo.args, zoo.kwargs)
    assert zoo.model.training and all(m.training for m in zoo.model.modules())
    model_ptrs = {p.untyped_storage().data_ptr() for p in zoo.model.parameters()}
    graph_params = list(gm.parameters())
    assert graph_params and all(p.untyped_storage().data_ptr() in model_ptrs for p in graph_params)
    assert borrowed_storages(gm) == model_ptrs
    graph_params[0].requires_grad_(False)
    assert all(p.requires_grad for p in zoo.model.parameters())


def test_transformers_outputs_are_plain_tensors():
    zoo, gm = traced_zoo("tiny-gpt2")
    out = unflatten_outputs(gm, gm(*flatten_inputs(gm, zoo.args, zoo.kwargs)))
    assert isinstance(out, torch.Tensor) and out.shape[-1] == zoo.model.config.vocab_size


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor's value: torch.export cannot capture it
            return x * 2
        return x


def test_untraceable_model_names_the_construct_and_the_fix():
    with pytest.raises(TraceError) as info:
        trace(DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "DataDependent" in message
    assert "torch.where" in message or "torch.cond" in message


def test_not_a_module_is_rejected():
    with pytest.raises(TraceError, match="nn.Module"):
        trace(lambda x: x, (torch.randn(2),))
