"""save_adapters / load_adapters: only adapter tensors, metadata checked on load, nothing changed on error."""
import json

import pytest
import torch
from safetensors import safe_open

from fxforge.adapters_io import AdapterLoadError, load_adapters, save_adapters


def test_round_trip_moves_exactly_the_adapter_tensors(mlp, adapt, randomize, tmp_path):
    zoo, gm = mlp
    trained = adapt(gm, zoo.args, rank=4, targets=("fc1", "fc2"))
    randomize(trained, roles=("lora_A", "lora_B"))
    path = save_adapters(trained, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
        layers = json.loads(f.metadata()["layers"])
    assert layers["fc1"]["method"] == "lora" and layers["fc1"]["rank"] == 4
    fresh = adapt(mlp[1], zoo.args, rank=4, targets=("fc1", "fc2"))
    assert not torch.equal(fresh(zoo.args[0])[0], trained(zoo.args[0])[0])
    assert load_adapters(fresh, path) == ["fc1", "fc2"]
    torch.testing.assert_close(fresh(zoo.args[0])[0], trained(zoo.args[0])[0], atol=0, rtol=0)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == \
        ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]


def test_loading_into_other_shapes_or_layers_fails_and_changes_nothing(mlp, adapt, tmp_path):
    zoo, gm = mlp
    path = save_adapters(adapt(gm, zoo.args, rank=4, targets=("fc1", "fc2")), tmp_path / "a.safetensors")
    other_rank = adapt(mlp[1], zoo.args, rank=2, targets=("fc1", "fc2"))
    before = {n: p.clone() for n, p in other_rank.named_parameters()}
    with pytest.raises(AdapterLoadError, match=r"(?s)fc1: rank is 4 in the file but 2 in the graph.*fc1.lora_A: shape \(4, 32\) in the file but \(2, 32\)"):
        load_adapters(other_rank, path)
    assert all(torch.equal(before[n], p) for n, p in other_rank.named_parameters())
    other_layers = adapt(mlp[1], zoo.args, rank=4, targets=("fc2", "fc3"))
    with pytest.raises(AdapterLoadError, match=r"(?s)without an adapter in the graph: fc1.*missing from the file: fc3"):
        load_adapters(other_layers, path)


def test_save_without_adapters_and_foreign_files_are_refused(mlp, tmp_path):
    from safetensors.torch import save_file

    from fxforge.errors import FxforgeError

    zoo, gm = mlp
    with pytest.raises(FxforgeError, match="has no adapters"):
        save_adapters(gm, tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(AdapterLoadError, match="not an fxforge adapter file"):
        load_adapters(gm, tmp_path / "foreign.safetensors")
