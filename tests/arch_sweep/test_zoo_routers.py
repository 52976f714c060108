"""The sweep zoo re-draws MoE routers that a family initializes to zero (`zoo.untie_routers`).

A zero router scores every expert equally, and top-k over a tie is implementation-defined
(torch's CPU topk and ONNX TopK pick different experts), so AFMoE's ONNX cell measured
tie-breaking (1.1e-01 off) instead of the backend. These tests are cheap: no tracing.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from arch_sweep.zoo import build, untie_routers


class _TinyMoe(nn.Module):
    def __init__(self, experts: int = 4, hidden: int = 8):
        super().__init__()
        self.config = SimpleNamespace(num_experts=experts, initializer_range=0.02)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.trained_router = nn.Linear(hidden, experts, bias=False)
        self.zero_proj = nn.Linear(hidden, hidden, bias=False)  # not one row per expert
        for layer in (self.router, self.zero_proj):
            nn.init.zeros_(layer.weight)


def test_only_zero_expert_row_weights_are_redrawn():
    model = _TinyMoe()
    kept = model.trained_router.weight.clone()
    assert untie_routers(model, seed=0) == ["router.weight"]
    assert model.router.weight.any()
    assert not model.zero_proj.weight.any()  # a zero projection that is no router stays zero
    assert torch.equal(model.trained_router.weight, kept)
    again = _TinyMoe()
    untie_routers(again, seed=0)
    assert torch.equal(again.router.weight, model.router.weight)  # seeded: the sweep is reproducible


def test_model_without_experts_is_untouched():
    model = _TinyMoe()
    model.config = SimpleNamespace(initializer_range=0.02)
    assert untie_routers(model) == []
    assert not model.router.weight.any()


def test_afmoe_router_scores_do_not_tie():
    model = build("afmoe", "decoder").model
    assert model is not None
    gates = [m.gate for name, m in model.named_modules() if name.endswith("mlp.router")]
    assert gates, "AFMoE's MoE layer has a router.gate"
    hidden = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for gate in gates:
        scores = torch.sigmoid(gate(hidden)).sort(dim=-1).values
        assert (scores.diff(dim=-1) > 0).all(), "tied expert scores: top-k would be ambiguous"
